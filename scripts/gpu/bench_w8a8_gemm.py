"""INT8 and FP8 GEMM throughput against bf16 at the Llama-3-8B linear shapes, 1 to 8192 tokens.

For each linear shape (K x N: 4096x4096 q/o_proj, 4096x14336 gate/up_proj, 14336x4096 down_proj,
4096x1024 k/v_proj) and M rows of x, on one GPU, in one run:

* ``bf16``: ``torch.nn.functional.linear`` with bf16 x and weight (cuBLAS);
* ``int8 triton``: quantkit's W8A8 INT8 linear as the runtime runs it — the Triton per-token
  activation quantization, then the Triton INT8 GEMM with the scales and the bf16 store in its
  epilogue (``quantkit/kernels/int8_linear.py``);
* ``int8 _int_mm``: the same quantization, ``torch._int_mm`` (cuBLASLt) to int32, scales in torch;
* ``fp8``: quantkit's FP8 W8A8 linear — Triton per-token quantization to e4m3, then
  ``torch._scaled_mm`` with row-wise scales (cuBLASLt, scales and bf16 store in its epilogue);
* ``... gemm``: the INT8 Triton GEMM and ``torch._scaled_mm`` alone, on x already quantized (what
  the activation quantization costs is the difference); ``int8 tma gemm``: the persistent
  tensor-descriptor variant of the INT8 kernel; ``fp8 fast-accum gemm`` with ``use_fast_accum=True``;
* ``... block``: the linear with the operation that produces its input, as the runtime runs them:
  residual add + RMSNorm before the K=4096 linears, SiLU-and-mul of the fused gate/up output before
  down_proj. ``bf16 block``: the 16-bit producer then the bf16 GEMM; ``int8 block`` / ``fp8 block``:
  the producer writing 8-bit activations and their scales (``kernels/quant_fused.py``) then the
  8-bit GEMM. Block ratios are bf16 block / 8-bit block.

Each time is the median over 5 repetitions of the mean device time per call, measured with CUDA
events over a CUDA graph of calls that cycle through enough copies of x and the weight
(>= 256 MiB) that nothing is served from L2. Ratios are bf16 time / quantized time, measured in
the same run; TFLOPS count 2·M·N·K. The memory limit is the bytes one call must move (weight, x,
y) over the device-to-device copy bandwidth measured in the same run. The issue's target: from
4096 tokens, INT8 and FP8 at least 1.6x bf16.

    python scripts/gpu/bench_w8a8_gemm.py --out results.json [--sweep [--warp-specialize]] [--tokens 1,16,4096] [--dry-run]

``--sweep`` also times other tiles of the INT8 Triton kernel and, from 1024 rows, of its
persistent TMA variant (with and without epilogue subtiling and loop flattening; with
``--warp-specialize`` also with Triton's automatic warp specialization), recording every time and
the fastest per case;
``--dry-run`` runs tiny shapes on the CPU (float32, the CPU implementations): a smoke test.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from device_timing import copy_bandwidth_gbs, graph_time_us

from quantkit.kernels.w8a8 import pack_w8a8_weights
from quantkit.quant.w8a8 import quantize_activation, quantize_weight

LLAMA3_8B_LINEARS = {  # name: (K, N)
    "q/o_proj 4096x4096": (4096, 4096),
    "gate/up_proj 4096x14336": (4096, 14336),
    "down_proj 14336x4096": (14336, 4096),
    "k/v_proj 4096x1024": (4096, 1024),
}
TINY_LINEARS = {"tiny 256x512": (256, 512), "down_proj tiny 512x256": (512, 256)}
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
ROTATION_BYTES = 256 * 2**20
TARGET_RATIO, TARGET_FROM_TOKENS = 1.6, 4096


def device_time_us(calls: list[Callable[[], object]], device: str, repeats: int = 5) -> float:
    """Median microseconds per call of ``calls`` replayed in a CUDA graph."""
    return graph_time_us(calls, device, repeats)


def bench_shape(name: str, k: int, n: int, tokens: list[int], device: str, dtype: torch.dtype, bandwidth: float,
                sweep: bool, warp_specialize: bool = False) -> list[dict]:
    from quantkit.kernels.fp8_linear import fp8_linear_scaled_mm, fp8_supported
    from quantkit.kernels.int8_linear import int8_linear_int_mm, int8_linear_reference

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen) / math.sqrt(k)
    records = {kind: quantize_weight(w, kind, "channel", "dynamic") for kind in ("int", "float")}
    packed = {kind: pack_w8a8_weights([r.weight], [r.weight_scale], [None], kind, "dynamic", device)
              for kind, r in records.items()}
    w16 = w.to(device, dtype)
    has_fp8 = device == "cuda" and fp8_supported(torch.device(device))
    on_gpu = device == "cuda"
    rows = []
    for m in tokens:
        x_bytes, w_bytes = m * k * 2, n * k * 2
        copies = max(2, math.ceil(ROTATION_BYTES / (x_bytes + w_bytes))) if on_gpu else 2
        xs = [torch.randn(m, k, generator=gen).to(device, dtype) for _ in range(copies)]
        w16s = [w16] + [w16.clone() for _ in range(copies - 1)]
        int8s = [packed["int"]] + [_clone(packed["int"]) for _ in range(copies - 1)]
        fp8s = [packed["float"]] + [_clone(packed["float"]) for _ in range(copies - 1)]
        q_int = [quantize_activation(x, "int") for x in xs]
        row = {"shape": name, "K": k, "N": n, "M": m, "times_us": {}}
        times = row["times_us"]
        times["bf16"] = device_time_us(
            [lambda x=x, w=w_: torch.nn.functional.linear(x, w) for x, w_ in zip(xs, w16s)], device)
        if on_gpu:
            from quantkit.kernels.int8_gemm_triton import int8_gemm_triton
            from quantkit.kernels.int8_linear import int8_linear_triton

            times["int8 triton"] = device_time_us(
                [lambda x=x, p=p: int8_linear_triton(x, p) for x, p in zip(xs, int8s)], device)
            times["int8 triton gemm"] = device_time_us(
                [lambda q=q, p=p: int8_gemm_triton(q[0], q[1], p.weight, p.weight_scale, None, dtype)
                 for q, p in zip(q_int, int8s)], device)
            try:
                from quantkit.kernels.int8_gemm_triton import int8_gemm_tma_triton

                times["int8 tma gemm"] = device_time_us(
                    [lambda q=q, p=p: int8_gemm_tma_triton(q[0], q[1], p.weight, p.weight_scale, None, dtype)
                     for q, p in zip(q_int, int8s)], device)
            except Exception as exc:  # noqa: BLE001 - an experimental kernel must not stop the run
                print(f"  int8 tma gemm failed: {type(exc).__name__}: {exc}", flush=True)
            if sweep:
                row["sweep"] = _sweep_int8(q_int, int8s, dtype, device, m, n, warp_specialize)
        else:
            times["int8 reference"] = device_time_us(
                [lambda x=x, p=p: int8_linear_reference(x, p) for x, p in zip(xs, int8s)], device)
        times["int8 _int_mm"] = device_time_us(
            [lambda x=x, p=p: int8_linear_int_mm(x, p) for x, p in zip(xs, int8s)], device)
        if has_fp8 or not on_gpu:
            q_fp8 = [quantize_activation(x, "float") for x in xs]
            times["fp8"] = device_time_us(
                [lambda x=x, p=p: fp8_linear_scaled_mm(x, p) for x, p in zip(xs, fp8s)], device)
            times["fp8 gemm"] = device_time_us(
                [lambda q=q, p=p, x=xs[0]: fp8_linear_scaled_mm(x, p, quantized=q) for q, p in zip(q_fp8, fp8s)],
                device)
            if on_gpu:
                times["fp8 fast-accum gemm"] = device_time_us(
                    [lambda q=q, p=p, x=xs[0]: fp8_linear_scaled_mm(x, p, quantized=q, use_fast_accum=True)
                     for q, p in zip(q_fp8, fp8s)], device)
        del q_int
        times.update(_blocks(name.startswith("down_proj"), xs, w16s, int8s, fp8s if (has_fp8 or not on_gpu) else None,
                             dtype, device, gen))
        flops = 2 * m * n * k
        row["tflops"] = {key: flops / (t * 1e-6) / 1e12 for key, t in times.items() if "block" not in key}
        row["speedup_vs_bf16"] = {key: (times["bf16 block"] if "block" in key else times["bf16"]) / t
                                  for key, t in times.items() if key not in ("bf16", "bf16 block")}
        row["memory_limit_us"] = {
            "bf16": (w_bytes + x_bytes + m * n * 2) / (bandwidth * 1e3),
            "8-bit": (n * k + m * k * 2 + m * n * 2) / (bandwidth * 1e3),
        }
        rows.append(row)
        _print_row(row)
        del xs, w16s, int8s, fp8s
        if on_gpu:
            torch.cuda.empty_cache()
    return rows


def _blocks(after_mlp: bool, xs, w16s, int8s, fp8s, dtype, device, gen) -> dict:
    """Producer + linear, 16-bit against 8-bit with the quantization fused into the producer."""
    from quantkit.kernels.dispatch import add_rms_norm, silu_and_mul
    from quantkit.kernels.fp8_linear import fp8_gemm
    from quantkit.kernels.int8_linear import int8_gemm
    from quantkit.kernels.quant_fused import add_rms_norm_quant, silu_and_mul_quant

    m, k = xs[0].shape
    if not after_mlp:  # after the residual add + RMSNorm: q/k/v, o (as a stand-in), gate/up
        residuals = [torch.randn(m, k, generator=gen).to(device, dtype) for _ in xs]
        norm_w = (torch.rand(k, generator=gen) + 0.5).to(device, dtype)

        def produce16(i):
            return add_rms_norm(xs[i], residuals[i], norm_w, 1e-5)[0]

        def produce8(i, kind):
            return add_rms_norm_quant(xs[i], residuals[i], norm_w, 1e-5, kind)[0]
    else:  # down_proj: after SiLU-and-mul of the fused gate/up output
        gate_ups = [torch.randn(m, 2 * k, generator=gen).to(device, dtype) for _ in xs]

        def produce16(i):
            return silu_and_mul(gate_ups[i][:, :k], gate_ups[i][:, k:])

        def produce8(i, kind):
            return silu_and_mul_quant(gate_ups[i][:, :k], gate_ups[i][:, k:], kind)

    count = len(xs)
    times = {"bf16 block": device_time_us(
        [lambda i=i: torch.nn.functional.linear(produce16(i), w16s[i]) for i in range(count)], device)}
    times["int8 block"] = device_time_us(
        [lambda i=i: _gemm(int8_gemm, produce8(i, "int"), int8s[i], dtype) for i in range(count)], device)
    if fp8s is not None:
        times["fp8 block"] = device_time_us(
            [lambda i=i: _gemm(fp8_gemm, produce8(i, "float"), fp8s[i], dtype) for i in range(count)], device)
    return times


def _gemm(gemm, quantized, packed, dtype):
    return gemm(quantized.codes, quantized.scale, packed, None, dtype)


def _clone(packed):
    from quantkit.kernels.w8a8 import W8A8Weight

    return W8A8Weight(packed.weight.clone(), packed.weight_scale.clone(), packed.type, packed.activations,
                      packed.input_scale)


TILED_CANDIDATES = (  # (block_m, block_n, block_k, num_warps, num_stages, group_m)
    (16, 32, 256, 4, 4, 1), (16, 64, 256, 4, 4, 1), (16, 128, 128, 4, 4, 1), (32, 64, 256, 4, 4, 8),
    (64, 64, 128, 4, 4, 8), (64, 128, 128, 4, 4, 8), (64, 256, 128, 8, 3, 8), (128, 128, 128, 8, 3, 8),
    (128, 128, 128, 8, 4, 8), (128, 256, 128, 8, 3, 8), (128, 256, 128, 8, 4, 8), (256, 128, 128, 8, 3, 8),
    (256, 128, 128, 8, 4, 8), (128, 256, 64, 8, 4, 8), (128, 256, 64, 8, 5, 8), (256, 128, 64, 8, 5, 8),
    (128, 128, 256, 8, 3, 8), (256, 256, 64, 8, 3, 8), (128, 256, 128, 8, 3, 16),
)
# the persistent TMA kernel from PERSISTENT_FROM_TOKENS rows: (block_m, block_n, block_k, num_warps,
# num_stages, group_m, epilogue_subtile, flatten[, warp_specialize]); the sixth and second are the
# defaults (``choose_int8_tma_config``: the fastest of the second H100 sweep, 256 x 128 for gate/up
# and down_proj, 128 x 256 for q/o_proj); WARP_SPECIALIZED ones Triton's automatic warp specialization
# (Hopper: without flattening, as Triton's 09-persistent-matmul tutorial does), not yet measured and
# timed only with ``--warp-specialize`` (a compiler crash in that pass must not cost the whole sweep)
PERSISTENT_CANDIDATES = (
    (128, 256, 128, 8, 3, 8, True, True), (128, 256, 128, 8, 4, 8, True, True),
    (128, 256, 128, 8, 3, 8, False, True), (128, 256, 128, 8, 3, 8, True, False),
    (128, 256, 128, 8, 3, 8, False, False), (256, 128, 128, 8, 4, 8, True, True),
    (256, 128, 128, 8, 3, 8, True, True), (128, 128, 128, 8, 4, 8, False, True),
    (128, 128, 128, 4, 4, 8, False, True), (128, 128, 128, 8, 5, 8, True, True),
    (128, 256, 64, 8, 5, 8, True, True), (128, 128, 256, 8, 3, 8, True, True),
    (128, 256, 128, 8, 3, 16, True, True), (256, 128, 64, 8, 5, 8, True, True),
)
WARP_SPECIALIZED = (
    (128, 256, 128, 8, 3, 8, True, False, True), (256, 128, 128, 8, 3, 8, True, False, True),
    (128, 256, 64, 8, 4, 8, True, False, True), (128, 128, 128, 4, 4, 8, False, False, True),
    (128, 128, 128, 8, 4, 8, True, False, True),
)
PERSISTENT_FROM_TOKENS = 1024


def _sweep_label(kernel: str, config) -> str:
    extras = ("" if not config.epilogue_subtile else " subtile") + ("" if not config.flatten else " flat") + (
        " ws" if config.warp_specialize else "")
    return (f"{kernel} {config.block_m}x{config.block_n}x{config.block_k} g{config.group_m} w{config.num_warps} "
            f"s{config.num_stages}{extras}")


def _sweep_int8(q_int, int8s, dtype, device, m, n, warp_specialize: bool = False) -> dict:
    """Every candidate's time (``all_us``) and the fastest: the tiled kernel's tiles that fit the
    rows, and from PERSISTENT_FROM_TOKENS rows the persistent TMA kernel's."""
    from quantkit.kernels.int8_gemm_triton import (
        Int8GemmConfig,
        int8_gemm_tma_triton,
        int8_gemm_triton,
    )

    candidates = [("tiled", int8_gemm_triton, Int8GemmConfig(bm, bn, bk, group_m=g, num_warps=w, num_stages=s))
                  for bm, bn, bk, w, s, g in TILED_CANDIDATES if bm <= max(16, 2 * m)]
    if m >= PERSISTENT_FROM_TOKENS:
        candidates += [("tma", int8_gemm_tma_triton, Int8GemmConfig(bm, bn, bk, group_m=g, num_warps=w, num_stages=s,
                                                                    epilogue_subtile=sub, flatten=flat,
                                                                    warp_specialize=bool(ws and ws[0])))
                       for bm, bn, bk, w, s, g, sub, flat, *ws in
                       PERSISTENT_CANDIDATES + (WARP_SPECIALIZED if warp_specialize else ())]
    best, every = {}, {}
    for kernel, gemm, config in candidates:
        label = _sweep_label(kernel, config)
        try:
            t = device_time_us([lambda q=q, p=p, c=config, f=gemm: f(q[0], q[1], p.weight, p.weight_scale, None,
                                                                      dtype, c)
                                for q, p in zip(q_int, int8s)], device)
        except Exception as exc:  # noqa: BLE001 - a tile that does not fit shared memory on this device
            print(f"  sweep {label}: {type(exc).__name__}", flush=True)
            continue
        every[label] = t
        if not best or t < best["us"]:
            best = {"us": t, "kernel": kernel, "config": dataclasses.asdict(config)}
    if best:
        best["label"] = min(every, key=every.get)
        best["all_us"] = every
        print(f"  sweep best {best['label']}: {best['us']:.1f}us", flush=True)
    return best


def _print_row(row: dict) -> None:
    times = row["times_us"]
    parts = [f"{key} {t:9.1f}us ({row['speedup_vs_bf16'].get(key, 1.0):4.2f}x)" for key, t in times.items()]
    print(f"{row['shape']:24s} M={row['M']:5d}  " + "  ".join(parts), flush=True)


def summary(rows: list[dict]) -> list[str]:
    """Per shape: the worst speed-up from TARGET_FROM_TOKENS tokens, for the INT8 and FP8 paths."""
    lines = []
    for shape in dict.fromkeys(row["shape"] for row in rows):
        big = [row for row in rows if row["shape"] == shape and row["M"] >= TARGET_FROM_TOKENS]
        if not big:
            continue
        for key in ("int8 triton", "int8 _int_mm", "fp8", "int8 triton gemm", "int8 tma gemm", "fp8 gemm",
                    "fp8 fast-accum gemm", "int8 block", "fp8 block"):
            ratios = [row["speedup_vs_bf16"][key] for row in big if key in row["speedup_vs_bf16"]]
            if ratios:
                verdict = "meets" if min(ratios) >= TARGET_RATIO else "misses"
                lines.append(f"{shape:24s} {key:19s} min speed-up at M >= {TARGET_FROM_TOKENS}: {min(ratios):.2f}x "
                             f"({verdict} the {TARGET_RATIO}x target)")
        swept = [row["times_us"]["bf16"] / row["sweep"]["us"] for row in big if row.get("sweep")]
        if swept:
            verdict = "meets" if min(swept) >= TARGET_RATIO else "misses"
            labels = sorted({row["sweep"]["label"] for row in big if row.get("sweep")})
            lines.append(f"{shape:24s} {'int8 best swept':19s} min speed-up at M >= {TARGET_FROM_TOKENS}: "
                         f"{min(swept):.2f}x ({verdict} the {TARGET_RATIO}x target; {', '.join(labels)})")
    return lines + single_config_summary(rows)


def single_config_summary(rows: list[dict], top: int = 6) -> list[str]:
    """The swept candidates that do best as one default for all shapes from TARGET_FROM_TOKENS
    rows: each one's worst ratio to bf16 over those rows (candidates timed in all of them)."""
    big = [row for row in rows if row["M"] >= TARGET_FROM_TOKENS and row.get("sweep", {}).get("all_us")]
    if not big:
        return []
    labels = set.intersection(*(set(row["sweep"]["all_us"]) for row in big))
    worst = {label: min(row["times_us"]["bf16"] / row["sweep"]["all_us"][label] for row in big) for label in labels}
    ranked = sorted(worst, key=worst.get, reverse=True)[:top]
    return [f"one config for every shape at M >= {TARGET_FROM_TOKENS}: {label:48s} worst {worst[label]:.2f}x bf16"
            for label in ranked]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--warp-specialize", action="store_true",
                    help="with --sweep: also the TMA kernel with Triton's automatic warp specialization")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of: " + "; ".join(LLAMA3_8B_LINEARS))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    args = ap.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for a CPU smoke test")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    shapes = TINY_LINEARS if args.dry_run else LLAMA3_8B_LINEARS
    if args.shapes:
        shapes = {key: value for key, value in shapes.items() if key.split()[0] in args.shapes.split(",")}
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.dry_run:
        tokens = [t for t in tokens if t <= 64]
    bandwidth = copy_bandwidth_gbs(device)
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch."), "copy_bandwidth_gbs": bandwidth,
            "weights": "per-output-channel scales", "activations": "dynamic per-token scales"}
    if device == "cuda":
        import triton

        info["triton"] = triton.__version__
        info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    print(json.dumps(info), flush=True)
    rows = []
    for name, (k, n) in shapes.items():
        rows += bench_shape(name, k, n, tokens, device, dtype, bandwidth, args.sweep and device == "cuda",
                            args.warp_specialize)
    lines = summary(rows)
    print("\n".join(lines))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"info": info, "rows": rows, "summary": lines}, indent=2) + "\n")


if __name__ == "__main__":
    main()
