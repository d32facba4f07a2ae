"""W4A16 on the N-major packing against the current kernels and bf16, Llama-3-8B linears, 1-512 rows.

For each shape and row count: bf16 ``x @ W`` (cuBLAS), quantkit's current ``quantized_linear``
(GPTQ-layout kernels) and the N-major GEMV/GEMM kernels (``kernels/w4a16_nmajor_triton.py``) over a
small grid of tiles, each timed as a CUDA graph over rotating weight copies (nothing from L2).
Prints one line per case with the best N-major tile; ``--json`` keeps every time.

    python scripts/gpu/bench_w4a16_nmajor.py --json out.json [--rows 1,4,16] [--shapes qkv,down]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import LLAMA3_8B_FUSED_LINEARS, linear_weights
from device_timing import copy_bandwidth_gbs, graph_time_us

from quantkit.kernels.dispatch import quantized_linear
from quantkit.kernels.w4a16_nmajor_triton import linear_nmajor

SHAPES = {name.removesuffix("_proj"): shape for name, shape in LLAMA3_8B_FUSED_LINEARS.items()}  # (K, N)
ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
SMS = 132


def auto_split(tiles: int, k: int, block_k: int, programs: int) -> int:
    return max(1, min(triton.cdiv(programs, tiles), k // block_k // 2))


def configs(m: int, n: int, k: int):
    """(label, kwargs) of the N-major variants tried at m rows."""
    out = []
    if m <= 4:
        for block_n in (16, 32, 64):
            for warps in (2, 4):
                for programs in (2 * SMS, 4 * SMS):
                    split = auto_split(m * triton.cdiv(n, block_n), k, 128, programs)
                    out.append(
                        (
                            "gemv",
                            {
                                "kernel": "gemv",
                                "block_n": block_n,
                                "block_k": 128,
                                "split_k": split,
                                "num_warps": warps,
                                "num_stages": 3,
                            },
                        )
                    )
    block_ms = [16] if m <= 16 else [32] if m <= 32 else [64] if m <= 64 else [64, 128]
    for block_m in block_ms:
        for block_n in (64, 128):
            for block_k in (64, 128):
                for stages in (3, 4):
                    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
                    split = auto_split(tiles, k, block_k, 2 * SMS)
                    warps = 8 if block_n * block_m >= 128 * 64 else 4
                    out.append(
                        (
                            "gemm",
                            {
                                "kernel": "gemm",
                                "block_n": block_n,
                                "block_m": block_m,
                                "block_k": block_k,
                                "split_k": split,
                                "num_warps": warps,
                                "num_stages": stages,
                            },
                        )
                    )
    return out


def label(kw: dict) -> str:
    return (
        f"{kw['kernel']} n{kw['block_n']} m{kw.get('block_m', 1)} k{kw['block_k']} s{kw['split_k']} "
        f"w{kw['num_warps']} st{kw['num_stages']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--rows", default=",".join(map(str, ROWS)))
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    device = "cuda"
    bandwidth = copy_bandwidth_gbs(device)
    print(f"{torch.cuda.get_device_name()}: copy {bandwidth:.0f} GB/s", flush=True)
    results = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        packed, dense = linear_weights((k, n), device)
        transposed = [p.qweight.t().contiguous() for p in packed]
        for m in map(int, args.rows.split(",")):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            bf16 = graph_time_us([lambda w=w, x=x: x @ w for w in dense], device)
            current = graph_time_us(
                [lambda p=p, x=x: quantized_linear(x, p) for p in packed], device
            )
            want = quantized_linear(x, packed[0]).float()
            limit = (packed[0].nbytes() + 2 * m * (k + n)) / bandwidth / 1e3
            times = {}
            for kind, kw in configs(m, n, k):
                try:
                    got = linear_nmajor(x, packed[0], transposed[0], None, **kw).float()
                    err = float((got - want).abs().max() / want.abs().max())
                    if err > 2e-2:
                        times[label(kw)] = f"wrong ({err:.3g})"
                        continue
                    times[label(kw)] = graph_time_us(
                        [
                            lambda p=p, t=t, x=x, kw=kw: linear_nmajor(
                                x, p, t, None, **kw
                            )
                            for p, t in zip(packed, transposed)
                        ],
                        device,
                    )
                except Exception as exc:  # noqa: BLE001 - a tile that does not compile is a result too
                    times[label(kw)] = f"error {type(exc).__name__}: {str(exc)[:80]}"
            numeric = {key: v for key, v in times.items() if isinstance(v, float)}
            best = min(numeric, key=numeric.get) if numeric else None
            row = {
                "shape": name,
                "k": k,
                "n": n,
                "m": m,
                "bf16_us": bf16,
                "current_us": current,
                "limit_us": limit,
                "nmajor_us": times,
                "best": best,
                "best_us": numeric.get(best),
            }
            results.append(row)
            best_us = numeric.get(best, float("nan"))
            print(
                f"{name:8s} M={m:4d} bf16 {bf16:7.1f}  current {current:7.1f} ({bf16 / current:.2f}x)  "
                f"nmajor {best_us:7.1f} ({bf16 / best_us:.2f}x, {limit / best_us:.0%} of int4 limit "
                f"{limit:.1f})  {best}",
                flush=True,
            )
            Path(args.json).write_text(
                json.dumps(
                    {
                        "device": torch.cuda.get_device_name(),
                        "bandwidth_gbs": bandwidth,
                        "rows": results,
                    },
                    indent=1,
                )
            )


if __name__ == "__main__":
    main()
