"""The experimental packed-unpacking GEMV against the current default GEMV and bf16, M=1, Llama-3-8B.

For each (K, N): bf16 ``x @ W`` (cuBLAS), ``quantized_linear_triton`` with its default config and
``quantized_linear_gemv_packed`` (kernels/w4a16_gemv_packed_triton.py) over a small tile sweep
(bench_kernels' weights have group 128, so block_k is 128: the packed kernel needs
group_size % block_k == 0; num_stages 2/3 is swept instead),
each timed as a CUDA graph over rotating weight copies (nothing from L2) with CUDA events. Prints
us, GB/s of weight + activation traffic and max |error| vs the dequantize + matmul reference.

    python scripts/gpu/bench_w4a16_gemv_packed.py --json out.json [--shapes qkv,o,gate_up,down] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import LLAMA3_8B_FUSED_LINEARS, linear_weights
from device_timing import graph_time_us

from quantkit.kernels import quantized_linear_reference
from quantkit.kernels.w4a16_gemv_packed_triton import quantized_linear_gemv_packed
from quantkit.kernels.w4a16_triton import quantized_linear_triton

SHAPES = {name.removesuffix("_proj"): shape for name, shape in LLAMA3_8B_FUSED_LINEARS.items()}  # (K, N)


def configs(quick: bool) -> list[dict]:
    if quick:
        return [
            {"block_n": bn, "block_k": 128, "split_k": None, "num_warps": w, "num_stages": 2}
            for bn, w in ((128, 4), (256, 8))
        ]
    return [
        {"block_n": bn, "block_k": 128, "split_k": sk, "num_warps": w, "num_stages": st}
        for bn, sk, w, st in itertools.product((64, 128, 256), (None, 1), (4, 8), (2, 3))
    ]


def label(kw: dict) -> str:
    return f"n{kw['block_n']} k{kw['block_k']} s{kw['split_k']} w{kw['num_warps']} st{kw['num_stages']}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--quick", action="store_true", help="two packed configs per shape")
    args = ap.parse_args()
    device = "cuda"
    start = time.perf_counter()
    print(torch.cuda.get_device_name(), flush=True)
    rows = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        packed, dense = linear_weights((k, n), device)
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        want = quantized_linear_reference(x, packed[0]).float()
        scale = want.abs().max().item()
        traffic = packed[0].nbytes() + 2 * (k + n)

        def gbs(us: float) -> float:
            return traffic / us / 1e3

        bf16 = graph_time_us([lambda w=w, x=x: x @ w for w in dense], device)
        current = graph_time_us([lambda p=p, x=x: quantized_linear_triton(x, p) for p in packed], device)
        current_err = (quantized_linear_triton(x, packed[0]).float() - want).abs().max().item()
        print(
            f"{name:8s} K={k} N={n}  bf16 {bf16:7.1f} us  current {current:6.1f} us "
            f"({gbs(current):5.0f} GB/s, err {current_err:.3g}, |y|max {scale:.3g})",
            flush=True,
        )
        results = {}
        for kw in configs(args.quick):
            try:
                got = quantized_linear_gemv_packed(x, packed[0], **kw).float()
                err = (got - want).abs().max().item()
                if not err <= 2e-2 * scale:
                    results[label(kw)] = {"error": f"wrong (max err {err:.3g})"}
                    print(f"    packed {label(kw):18s} WRONG max err {err:.3g}", flush=True)
                    continue
                us = graph_time_us(
                    [lambda p=p, kw=kw, x=x: quantized_linear_gemv_packed(x, p, **kw) for p in packed], device
                )
                results[label(kw)] = {"us": us, "gbs": gbs(us), "max_err": err}
                print(
                    f"    packed {label(kw):18s} {us:6.1f} us {gbs(us):5.0f} GB/s  err {err:.3g}  "
                    f"({current / us:.2f}x current)",
                    flush=True,
                )
            except Exception as exc:  # noqa: BLE001 - a config that fails to compile is a result too
                results[label(kw)] = {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
                print(f"    packed {label(kw):18s} error {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        timed = {key: v["us"] for key, v in results.items() if "us" in v}
        best = min(timed, key=timed.get) if timed else None
        if best:
            print(
                f"  best packed {best}: {timed[best]:.1f} us vs current {current:.1f} us "
                f"({current / timed[best]:.2f}x), bf16 {bf16:.1f} us   [{time.perf_counter() - start:.0f} s]",
                flush=True,
            )
        rows.append(
            {
                "shape": name,
                "k": k,
                "n": n,
                "m": 1,
                "traffic_bytes": traffic,
                "bf16_us": bf16,
                "current_us": current,
                "current_gbs": gbs(current),
                "current_max_err": current_err,
                "packed": results,
                "best": best,
                "best_us": timed.get(best),
            }
        )
        Path(args.json).write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )
        del packed, dense


if __name__ == "__main__":
    main()
