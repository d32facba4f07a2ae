"""Time 2:4 semi-structured sparse linears against dense ones at the Llama-3-8B linear shapes.

For each linear shape (in, out) and each number of tokens M, a random bf16 weight is pruned to
2:4 (the two largest of every four inputs) and ``y = x @ W.T`` is timed

* dense: ``F.linear`` with the pruned weight stored dense (what engines load today);
* sparse: ``F.linear`` with the weight compressed by PyTorch's semi-structured sparse tensors, on
  each backend that works on this GPU (CUTLASS, cuSPARSELt) -- the path quantkit's runtime takes
  for 2:4 checkpoints with ``QUANTKIT_SPARSE_24=1`` (``quantkit/runtime/sparse_linear.py``; off by
  default, since this benchmark measured it slower than dense at decode sizes on an H100). Every backend is first probed with
  the runtime's own check (a small 2:4 linear against the dense product); one that fails (CUTLASS
  on Hopper: its kernels are built for compute capability 8.x) is reported with its error and not
  timed. The JSON says which backend the runtime uses here (``runtime_backend``).

Each figure is the mean device time of one call, measured with CUDA events over a CUDA graph of
many calls (launch and Python dispatch overhead excluded, as in the runtime's decode graphs), and
again eagerly (wall time per call, dispatch included, as in prefill). The calls cycle through
enough copies of the weight (>= 256 MiB) that nothing is served from L2. Beside each time: the
speed ratio against dense measured in the same run, the largest difference from the dense result,
and the memory-bandwidth limit (bytes that must move: weight or compressed weight plus metadata,
x and y, over the device-to-device copy bandwidth measured in the same run).

    python scripts/gpu/bench_sparse_linear.py --out sparse_linear_h100.json [--dtype bf16]
        [--tokens 1,16,64,256,1024,4096,16384] [--dry-run]

``--dry-run`` runs tiny shapes on the CPU with the dense weight standing in for the sparse one
(a smoke test of this script; no sparse kernel runs).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from quantkit.runtime.sparse_linear import (
    BACKEND_CLASSES,
    backend_class,
    chosen_backend,
    cusparselt_available,
    probe_backend,
)

LLAMA3_8B_LINEARS = {  # (in, out)
    "q/o_proj": (4096, 4096),
    "k/v_proj": (4096, 1024),
    "gate/up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
TINY_LINEARS = {"tiny": (256, 128)}
TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]
ROTATION_BYTES = 256 * 2**20
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
console = Console(width=160)


def prune_2of4(weight: torch.Tensor) -> torch.Tensor:
    runs = weight.reshape(weight.shape[0], -1, 4)
    keep = torch.zeros_like(runs, dtype=torch.bool).scatter_(-1, runs.abs().topk(2, dim=-1).indices, True)
    return (runs * keep).reshape(weight.shape)


def probe_backends(dtype, dry_run: bool) -> dict[str, str | None]:
    """backend -> None when it computes a small 2:4 linear correctly on this GPU, else the error."""
    if dry_run:
        return {"dense-stand-in": None}
    probes = {}
    for name in BACKEND_CLASSES:
        if name == "cusparselt" and not cusparselt_available():
            probes[name] = "torch.backends.cusparselt.is_available() is False"
        else:
            probes[name] = probe_backend(name, "cuda", dtype)
    return probes


def backends(probes: dict[str, str | None]) -> dict:
    """name -> function compressing a dense 2:4 weight for F.linear, for the backends that work."""
    working = [name for name, error in probes.items() if error is None]
    return {name: (lambda w: w) if name == "dense-stand-in" else backend_class(name).from_dense for name in working}


def copy_bandwidth(device: str) -> float | None:
    """Device-to-device copy bandwidth in bytes/s (read + write), or None on the CPU."""
    if device != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1e3)


def time_calls(fn, device: str, calls: int, graph: bool) -> float:
    """Mean seconds per call of ``fn(i)`` over ``calls`` calls (median of 5 repeats)."""
    if device != "cuda":
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            for i in range(calls):
                fn(i)
            samples.append((time.perf_counter() - start) / calls)
        return statistics.median(samples)
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn(0)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(calls):
                fn(i)
        run = g.replay
    else:
        def run():
            for i in range(calls):
                fn(i)
    samples = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / calls)
    return statistics.median(samples)


def bench_shape(name: str, in_f: int, out_f: int, tokens: list[int], dtype, device: str, compressors: dict,
                bandwidth: float | None) -> list[dict]:
    generator = torch.Generator(device="cpu").manual_seed(0)
    dense = prune_2of4(torch.randn(out_f, in_f, generator=generator).to(device, dtype))
    copies = max(1, min(64, ROTATION_BYTES // dense.numel() // dense.element_size()))
    weights = {"dense": [dense.clone() for _ in range(copies)]}
    for backend, compress in compressors.items():
        try:
            weights[backend] = [compress(w) for w in weights["dense"]]
        except Exception as error:  # noqa: BLE001 -- report it, time the others
            console.print(f"[yellow]{backend} unavailable for {name}: {str(error).splitlines()[0]}[/]")
    rows = []
    for m in tokens:
        x = torch.randn(m, in_f, generator=generator).to(device, dtype)
        want = F.linear(x, dense)
        row = {"linear": name, "in": in_f, "out": out_f, "tokens": m, "weight_copies": copies}
        calls = max(copies, 32 if m <= 256 else 8)
        for label, ws in weights.items():
            try:
                out = F.linear(x, ws[0])
            except Exception as error:  # noqa: BLE001 -- a backend failing at this shape: report it
                row[label] = {"error": str(error).splitlines()[0], "graph_s": None, "eager_s": None}
                continue
            entry = {"max_abs_diff_vs_dense": (out.float() - want.float()).abs().max().item()}
            for mode, graph in (("graph", True), ("eager", False)):
                try:
                    entry[f"{mode}_s"] = time_calls(lambda i, ws=ws, x=x: F.linear(x, ws[i % len(ws)]), device, calls,
                                                    graph and device == "cuda")
                except RuntimeError as error:  # e.g. a backend that cannot be captured in a graph
                    entry[f"{mode}_s"], entry[f"{mode}_error"] = None, str(error).splitlines()[0]
            weight_bytes = dense.numel() * dense.element_size() * (1 if label == "dense" else 0.5 + 1 / 16)
            moved = weight_bytes + (m * in_f + m * out_f) * dense.element_size()
            entry["bytes_moved"] = moved
            entry["bandwidth_limit_s"] = None if bandwidth is None else moved / bandwidth
            row[label] = entry
        for label in weights:
            if "error" in row[label]:
                continue
            for mode in ("graph", "eager"):
                base, here = row["dense"].get(f"{mode}_s"), row[label].get(f"{mode}_s")
                row[label][f"{mode}_speedup_vs_dense"] = base / here if base and here else None
        rows.append(row)
        console.print(summary_line(row), highlight=False)
    return rows


def summary_line(row: dict) -> str:
    parts = [f"{row['linear']:>12} M={row['tokens']:<6}"]
    for label, entry in row.items():
        if isinstance(entry, dict) and "graph_s" in entry:
            g = entry["graph_s"]
            ratio = entry.get("graph_speedup_vs_dense")
            parts.append(f"{label} {g * 1e6:9.1f} us" + (f" ({ratio:.2f}x)" if ratio and label != "dense" else "")
                         if g else f"{label} n/a")
    return "  ".join(parts)


def render(rows: list[dict]) -> None:
    labels = list(dict.fromkeys(k for row in rows for k in row if isinstance(row[k], dict)))
    table = Table(title="2:4 sparse vs dense F.linear, graph-replayed device time per call (us); ratio = dense / sparse")
    for column in ("linear", "M", *[f"{label} us" for label in labels], *[f"{label} x" for label in labels[1:]],
                   "dense limit us"):
        table.add_column(column, justify="right")
    for row in rows:
        times = [row.get(label, {}).get("graph_s") for label in labels]
        ratios = [row.get(label, {}).get("graph_speedup_vs_dense") for label in labels[1:]]
        limit = row["dense"].get("bandwidth_limit_s")
        table.add_row(row["linear"], str(row["tokens"]), *[f"{t * 1e6:.1f}" if t else "-" for t in times],
                      *[f"{r:.2f}" if r else "-" for r in ratios], f"{limit * 1e6:.1f}" if limit else "-")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts M")
    parser.add_argument("--linears", default=None, help=f"comma-separated subset of {', '.join(LLAMA3_8B_LINEARS)}")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, dense stand-in for sparse")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run on a GPU machine, or pass --dry-run")
    dtype = DTYPES[args.dtype] if device == "cuda" else torch.float32
    shapes = TINY_LINEARS if args.dry_run else LLAMA3_8B_LINEARS
    if args.linears:
        shapes = {name: shapes[name] for name in args.linears.split(",")}
    tokens = [int(t) for t in args.tokens.split(",")] if not args.dry_run else [1, 16]
    probes = probe_backends(dtype, args.dry_run)
    for backend, error in probes.items():
        console.print(f"backend {backend}: " + ("works" if error is None else f"[yellow]fails: {error}[/]"),
                      highlight=False)
    runtime_backend = chosen_backend("cuda", dtype) if device == "cuda" else None
    if device == "cuda":
        console.print(f"quantkit's runtime uses: {runtime_backend or 'dense (no sparse backend works)'}",
                      highlight=False)
    compressors = backends(probes)
    bandwidth = copy_bandwidth(device)
    rows = []
    for name, (in_f, out_f) in shapes.items():
        rows += bench_shape(name, in_f, out_f, tokens, dtype, device, compressors, bandwidth)
    render(rows)
    payload = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "dtype": str(dtype).removeprefix("torch."),
        "dry_run": args.dry_run, "copy_bandwidth_bytes_per_s": bandwidth,
        "capability": list(torch.cuda.get_device_capability()) if device == "cuda" else None,
        "cusparselt_version": torch.backends.cusparselt.version() if cusparselt_available() else None,
        "backends": list(compressors), "backend_probes": {k: v or "ok" for k, v in probes.items()},
        "runtime_backend": runtime_backend,
        "torch_default_backend": "cutlass" if getattr(torch.sparse.SparseSemiStructuredTensor, "_FORCE_CUTLASS",
                                                      True) else "cusparselt",
        "shapes_in_out": {name: list(shape) for name, shape in shapes.items()}, "rows": rows,
    }
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=2)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
