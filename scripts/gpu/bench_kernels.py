"""Time quantkit's runtime kernels against their memory-bandwidth limits on one GPU.

* W4A16 ``quantized_linear`` (group size 128, bf16 activations) against a bf16 ``torch.matmul``
  at the Llama-3-8B linear shapes, for M = 1 .. 4096 rows of x;
* paged decode attention (32 query heads, 8 kv heads, head_dim 128, cache blocks of 16, bf16) at
  batch 1 .. 64 and context 512 .. 8192.

Each figure is the mean device time of one call, measured with CUDA events over a CUDA graph of
many calls (so host launch overhead is excluded, as in the runtime's decode graphs; eager times
are in the JSON). The calls cycle through enough copies of the weights or KV blocks (>= 256 MiB)
that nothing is served from L2. The limit of a call is the bytes it must move (packed weight,
scales and zero points, x and y; or K, V, q and the output) over the device-to-device copy
bandwidth measured in the same run; "% limit" is limit / measured time.

    python scripts/gpu/bench_kernels.py [--json out.json] [--sweep] [--dry-run]

``--sweep`` also times alternative kernel tiles and prints the best per case (to tune the
tables in ``quantkit/kernels/w4a16_triton.py`` and ``attention_decode_triton.py``);
``--dry-run`` runs tiny shapes on the CPU through the reference path (a smoke test of this script).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
import triton
from rich.console import Console
from rich.progress import track
from rich.table import Table

from quantkit.kernels import pack_quantized_weight, paged_attention, quantized_linear

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_timing import copy_bandwidth_gbs, eager_time_us, graph_time_us

LLAMA3_8B_LINEARS = {  # (in, out)
    "q/o_proj": (4096, 4096),
    "k/v_proj": (4096, 1024),
    "gate/up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
LLAMA3_8B_FUSED_LINEARS = {  # (in, out) as the runtime runs them: q/k/v and gate/up fused
    "qkv_proj": (4096, 6144),
    "o_proj": (4096, 4096),
    "gate_up_proj": (4096, 28672),
    "down_proj": (14336, 4096),
}
TINY_LINEARS = {"tiny": (256, 512)}
BATCH_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096]
DECODE_BATCHES = [1, 4, 16, 64]
DECODE_CONTEXTS = [512, 2048, 8192]
LLAMA3_8B_ATTENTION = {"q_heads": 32, "kv_heads": 8, "head_dim": 128, "block_size": 16}
TINY_ATTENTION = {"q_heads": 4, "kv_heads": 2, "head_dim": 32, "block_size": 16}
ROTATION_BYTES = 256 * 2**20  # more than the L2 cache of any current GPU
GROUP_SIZE = 128
console = Console()
if not console.is_terminal:  # a log file: do not squeeze the tables into 80 columns
    console = Console(width=180)


# ---------------------------------------------------------------- timing


def device_time_us(calls: list[Callable[[], object]], device: str, repeats: int = 5) -> tuple[float, float]:
    """(graph, eager) microseconds per call of ``calls`` run in turn."""
    return graph_time_us(calls, device, repeats), eager_time_us(calls, device, repeats)


def copies_for(nbytes: int) -> int:
    return max(2, math.ceil(ROTATION_BYTES / max(nbytes, 1)))


# ---------------------------------------------------------------- W4A16 linear


def random_packed(in_features: int, out_features: int, device: str, gen: torch.Generator):
    groups = in_features // GROUP_SIZE
    codes = torch.randint(0, 16, (out_features, in_features), device=device, generator=gen, dtype=torch.int32)
    scales = torch.rand(out_features, groups, device=device, generator=gen).to(torch.bfloat16) * 0.01
    zeros = torch.randint(0, 16, (out_features, groups), device=device, generator=gen, dtype=torch.int32)
    return pack_quantized_weight(codes, scales, zeros, GROUP_SIZE, 4)


def bench_linear(name: str, shape: tuple[int, int], m: int, device: str, bandwidth: float, weights) -> dict:
    in_features, out_features = shape
    packed_copies, dense_copies = weights
    gen = torch.Generator(device=device).manual_seed(m)
    x = torch.randn(m, in_features, device=device, generator=gen).to(torch.bfloat16)
    q_graph, q_eager = device_time_us([lambda p=p: quantized_linear(x, p) for p in packed_copies], device)
    b_graph, b_eager = device_time_us([lambda w=w: x @ w for w in dense_copies], device)
    activations = 2 * m * (in_features + out_features)
    q_bytes = packed_copies[0].nbytes() + activations
    return {
        "linear": name,
        "in": in_features,
        "out": out_features,
        "m": m,
        "kernel": kernel_for(m, device),
        "w4a16_us": q_graph,
        "bf16_us": b_graph,
        "w4a16_eager_us": q_eager,
        "bf16_eager_us": b_eager,
        "speedup_vs_bf16": b_graph / q_graph,
        "w4a16_gbs": q_bytes / q_graph / 1e3,
        "w4a16_limit_us": q_bytes / bandwidth / 1e3,
        "bf16_limit_us": (2 * in_features * out_features + activations) / bandwidth / 1e3,
    }


def kernel_for(m: int, device: str) -> str:
    if device != "cuda":
        return "reference"
    from quantkit.kernels.w4a16_triton import choose_config

    return choose_config(m).kernel


def linear_weights(shape: tuple[int, int], device: str):
    in_features, out_features = shape
    gen = torch.Generator(device=device).manual_seed(0)
    first = random_packed(in_features, out_features, device, gen)
    packed = [first] + [
        random_packed(in_features, out_features, device, gen) for _ in range(copies_for(first.nbytes()) - 1)
    ]
    dense_bytes = 2 * in_features * out_features
    dense = [
        torch.randn(in_features, out_features, device=device, generator=gen).to(torch.bfloat16)
        for _ in range(copies_for(dense_bytes))
    ]
    return packed, dense


def run_linears(linears: dict, rows: list[int], device: str, bandwidth: float) -> list[dict]:
    results = []
    for name, shape in linears.items():
        weights = linear_weights(shape, device)
        for m in track(rows, description=f"W4A16 {name} {shape}", console=console):
            results.append(bench_linear(name, shape, m, device, bandwidth, weights))
        del weights
    return results


# ---------------------------------------------------------------- paged decode attention


def bench_decode(batch: int, context: int, shape: dict, device: str, bandwidth: float, attend=None) -> dict:
    """``attend(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len)``; default: the dispatcher."""
    q_heads, kv_heads, head_dim, block_size = (shape[k] for k in ("q_heads", "kv_heads", "head_dim", "block_size"))
    blocks_per_seq = math.ceil(context / block_size)
    block_bytes = 2 * block_size * kv_heads * head_dim * 2  # K and V, bf16
    kv_bytes = batch * context * kv_heads * head_dim * 2 * 2
    num_blocks = max(batch * blocks_per_seq, ROTATION_BYTES // block_bytes)
    gen = torch.Generator(device=device).manual_seed(batch * context)
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, device=device, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(cache_shape, device=device, generator=gen).to(torch.bfloat16)
    q = torch.randn(batch, q_heads, head_dim, device=device, generator=gen).to(torch.bfloat16)
    starts = torch.arange(batch + 1, device=device, dtype=torch.int32)
    seq_lens = torch.full((batch,), context, device=device, dtype=torch.int32)
    tables = [
        torch.randperm(num_blocks, device=device, generator=gen)[: batch * blocks_per_seq]
        .view(batch, -1)
        .to(torch.int32)
        for _ in range(max(2, num_blocks // (batch * blocks_per_seq)))
    ]
    scale = head_dim**-0.5

    def call(table):
        if attend is not None:
            return attend(q, k_cache, v_cache, table, seq_lens, scale, context)
        return paged_attention(q, k_cache, v_cache, table, starts, seq_lens, scale, max_seq_len=context)

    graph_us, eager_us = device_time_us([lambda t=t: call(t) for t in tables], device)
    moved = kv_bytes + 2 * q.numel() * 2
    return {
        "batch": batch,
        "context": context,
        "us": graph_us,
        "eager_us": eager_us,
        "gbs": moved / graph_us / 1e3,
        "limit_us": moved / bandwidth / 1e3,
    }


def run_decode(batches, contexts, shape: dict, device: str, bandwidth: float, attend=None, label="") -> list[dict]:
    cases = [(b, c) for b in batches for c in contexts]
    return [
        bench_decode(b, c, shape, device, bandwidth, attend)
        for b, c in track(cases, description=f"paged decode attention {label}", console=console)
    ]


# ---------------------------------------------------------------- tile sweeps


def linear_sweep_configs(m: int):
    """Candidate launches for m rows: GEMV tiles for m <= 2 (and the integer-to-float conversion
    for comparison), tensor-core GEMM tiles from 4 rows, dense from 64."""
    from quantkit.kernels.w4a16_triton import GemmConfig

    configs = []
    if m <= 2:
        for block_n in (32, 64, 128, 256):
            for block_k in (128, 256, 512):
                if block_n * block_k > 65536:
                    continue
                for warps in (4, 8):
                    for split_k in (None, 1, 2, 4):
                        configs.append(GemmConfig("gemv", block_m=1, block_n=block_n, block_k=block_k,
                                                  split_k=split_k, num_warps=warps))
        configs.append(GemmConfig("gemv", block_m=1, block_n=128, block_k=128, fast_codes=False))
    if m >= 4:
        for block_m in (16, 32, 64, 128):
            if block_m > max(16, 2 * m):
                continue
            for block_n, block_k, warps in ((64, 128, 4), (64, 256, 4), (128, 64, 4), (128, 128, 4),
                                            (128, 128, 8), (256, 64, 8)):
                for stages in (3, 4):
                    for split_k in (None, 1):
                        configs.append(GemmConfig("gemm", block_m, block_n, block_k, split_k, warps, stages))
            configs.append(GemmConfig("gemm", block_m, 128, 128, None, 4, 3, fast_codes=False))
    if m >= 64:
        configs.append(GemmConfig("dense"))
    return configs


def sweep_linears(linears: dict, rows: list[int], device: str, on_case=None) -> list[dict]:
    """Best launch per (linear, m); ``on_case(results)`` after each case (a run cut short keeps them)."""
    from quantkit.kernels.w4a16_triton import choose_config, quantized_linear_triton

    results = []
    for name, shape in linears.items():
        packed, _ = linear_weights(shape, device)
        for m in track([r for r in rows if r <= 256], description=f"sweep {name}", console=console):
            x = torch.randn(m, shape[0], device=device).to(torch.bfloat16)
            timed = []
            for config in linear_sweep_configs(m):
                calls = [lambda p=p, c=config, x=x: quantized_linear_triton(x, p, config=c) for p in packed]
                try:
                    timed.append((device_time_us(calls, device)[0], config))
                except triton.runtime.errors.OutOfResources:  # a tile too large for shared memory
                    continue
            default = choose_config(m, torch.bfloat16, shape[1])
            default_us = device_time_us(
                [lambda p=p, c=default, x=x: quantized_linear_triton(x, p, config=c) for p in packed], device
            )[0]
            best_us, best = min(timed, key=lambda t: t[0])
            results.append(
                {
                    "linear": name,
                    "shape": list(shape),
                    "m": m,
                    "default": asdict(default),
                    "default_us": default_us,
                    "best": asdict(best),
                    "best_us": best_us,
                    "all": [{"us": us, **asdict(c)} for us, c in sorted(timed, key=lambda t: t[0])[:12]],
                }
            )
            console.print(f"{name} M={m}: default {default_us:.1f} us, best {best_us:.1f} us "
                          f"({_config_label(asdict(best))})")
            if on_case is not None:
                on_case(results)
        del packed
    return results


def sweep_decode(batches: list[int], contexts: list[int], shape: dict, device: str) -> list[dict]:
    from quantkit.kernels.attention_decode_triton import paged_decode_triton

    results = []
    for block_n, warps in ((16, 4), (32, 4), (64, 4), (64, 8), (128, 8)):

        def attend(q, k, v, table, seq_lens, scale, max_len, _n=block_n, _w=warps):
            return paged_decode_triton(q, k, v, table, seq_lens, scale, max_seq_len=max_len, block_n=_n, num_warps=_w)

        for row in run_decode(batches, contexts, shape, device, 1.0, attend, f"{block_n} keys {warps} warps"):
            results.append(
                {
                    "block_n": block_n,
                    "num_warps": warps,
                    "batch": row["batch"],
                    "context": row["context"],
                    "us": row["us"],
                }
            )
    return results


# ---------------------------------------------------------------- report


def print_linear_table(rows: list[dict]) -> None:
    table = Table(
        title=f"W4A16 (g{GROUP_SIZE}, bf16 x) vs bf16 matmul, Llama-3-8B linears; µs per call in a CUDA graph"
    )
    for column in (
        "linear",
        "M",
        "kernel",
        "w4a16 µs",
        "bf16 µs",
        "speedup",
        "w4a16 GB/s",
        "int4 limit µs",
        "% limit",
        "bf16 limit µs",
    ):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            f"{r['linear']} {r['in']}x{r['out']}",
            str(r["m"]),
            r["kernel"],
            f"{r['w4a16_us']:.1f}",
            f"{r['bf16_us']:.1f}",
            f"{r['speedup_vs_bf16']:.2f}x",
            f"{r['w4a16_gbs']:.0f}",
            f"{r['w4a16_limit_us']:.1f}",
            f"{100 * r['w4a16_limit_us'] / r['w4a16_us']:.0f}%",
            f"{r['bf16_limit_us']:.1f}",
        )
    console.print(table)


def print_decode_table(rows: list[dict], shape: dict) -> None:
    table = Table(title=f"paged decode attention, bf16, {shape}; µs per call in a CUDA graph")
    for column in ("batch", "context", "µs", "GB/s", "KV limit µs", "% limit"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            str(r["batch"]),
            str(r["context"]),
            f"{r['us']:.1f}",
            f"{r['gbs']:.0f}",
            f"{r['limit_us']:.1f}",
            f"{100 * r['limit_us'] / r['us']:.0f}%",
        )
    console.print(table)


def print_sweep(linear: list[dict], decode: list[dict]) -> None:
    table = Table(title="W4A16 tile sweep: default vs best")
    for column in ("linear", "M", "default", "default µs", "best", "best µs"):
        table.add_column(column, justify="right")
    for r in linear:
        table.add_row(
            r["linear"],
            str(r["m"]),
            _config_label(r["default"]),
            f"{r['default_us']:.1f}",
            _config_label(r["best"]),
            f"{r['best_us']:.1f}",
        )
    console.print(table)
    table = Table(title="decode attention sweep (block_n, num_warps)")
    for column in ("batch", "context", "block_n", "warps", "µs"):
        table.add_column(column, justify="right")
    for r in sorted(decode, key=lambda r: (r["batch"], r["context"], r["us"])):
        table.add_row(str(r["batch"]), str(r["context"]), str(r["block_n"]), str(r["num_warps"]), f"{r['us']:.1f}")
    console.print(table)


def _config_label(c: dict) -> str:
    if c["kernel"] == "dense":
        return "dense"
    fast = "" if c.get("fast_codes", True) else " cvt"
    return (f"{c['kernel']} {c['block_m']}x{c['block_n']}x{c['block_k']} s{c['split_k']} w{c['num_warps']} "
            f"st{c['num_stages']}{fast}")


def environment(device: str) -> dict:
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=None, help="write the figures to this path")
    ap.add_argument("--sweep", action="store_true", help="also time alternative kernel tiles")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, reference path")
    ap.add_argument("--linears", default=None, help=f"comma-separated subset of {','.join(LLAMA3_8B_LINEARS)}")
    ap.add_argument("--fused", action="store_true", help="the runtime's fused shapes (qkv, gate_up) instead of "
                    "the separate projections")
    ap.add_argument("--rows", default=None, help="comma-separated row counts M (default: 1..4096)")
    ap.add_argument("--skip-linear", action="store_true")
    ap.add_argument("--skip-attention", action="store_true")
    args = ap.parse_args()
    global ROTATION_BYTES
    if args.dry_run:
        device, linears, rows, attention = "cpu", TINY_LINEARS, [1, 4, 64], TINY_ATTENTION
        batches, contexts = [1, 4], [64, 256]
        ROTATION_BYTES = 2**16
    elif torch.cuda.is_available():
        device, linears, rows, attention = "cuda", LLAMA3_8B_LINEARS, BATCH_ROWS, LLAMA3_8B_ATTENTION
        batches, contexts = DECODE_BATCHES, DECODE_CONTEXTS
    else:
        raise SystemExit("no CUDA device: run with --dry-run for the CPU smoke test")
    if args.fused and not args.dry_run:
        linears = LLAMA3_8B_FUSED_LINEARS
    if args.linears and not args.dry_run:
        unknown = set(args.linears.split(",")) - set(linears)
        if unknown:
            raise SystemExit(f"unknown linears {sorted(unknown)}; choose from {', '.join(linears)}")
        linears = {name: linears[name] for name in args.linears.split(",")}
    if args.rows:
        rows = [int(r) for r in args.rows.split(",")]

    figures = {
        **environment(device),
        "dtype": "bfloat16",
        "group_size": GROUP_SIZE,
        "timing": "CUDA graph replay, CUDA events" if device == "cuda" else "perf_counter",
    }
    figures["copy_bandwidth_gbs"] = bandwidth = copy_bandwidth_gbs(device)
    console.print(f"{figures['device']}: device-to-device copy {bandwidth:.0f} GB/s")
    if not args.skip_linear:
        figures["linear"] = run_linears(linears, rows, device, bandwidth)
        print_linear_table(figures["linear"])
    if not args.skip_attention:
        figures["decode_attention_shape"] = attention
        figures["decode_attention"] = run_decode(batches, contexts, attention, device, bandwidth)
        print_decode_table(figures["decode_attention"], attention)
    if args.sweep and device == "cuda":
        def keep(results, figures=figures):
            figures["sweep_linear"] = results
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(figures, f, indent=2)

        figures["sweep_linear"] = sweep_linears(linears, rows, device, on_case=keep)
        figures["sweep_decode"] = sweep_decode(batches, contexts, attention, device)
        print_sweep(figures["sweep_linear"], figures["sweep_decode"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
