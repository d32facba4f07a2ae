"""GPTQ's column loop per block: the one-launch Triton kernel against the CUDA graph it replaces.

For a block of 128 columns over 1024, 8192 and 28672 rows (Llama-3-70B's k/v, q/o and gate/up
widths), times one ``_BlockRunner.run``, what GPTQ pays per block (the graph path's copies into
its buffers included), on the kernel path and on the CUDA-graph path, launched one block after
another as GPTQ does; then the kernel alone replayed in a CUDA graph (its device time without
Python's launch). Also prints the share of codes on which the two paths agree.

    python scripts/gpu/bench_gptq_block.py [--sweep] [--json out.json]
    TRITON_INTERPRET=1 python scripts/gpu/bench_gptq_block.py --tiny    # a dry run on the CPU

``--sweep`` also times the kernel alone at other (BLOCK_R, num_warps), to tune
``block_config`` in ``quantkit/kernels/gptq_block_triton.py``. ``--tiny`` runs small blocks on the
CPU, the kernel under the Triton interpreter and the reference loop in place of the graph.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from device_timing import eager_time_us, graph_time_us

from quantkit.quant import gptq
from quantkit.quant.qdq import compute_qparams

ROWS, SIZE = [1024, 8192, 28672], 128
TINY_ROWS, TINY_SIZE = [16, 40], 32
BITS = 4
CALLS = 10  # blocks per timed run (2 under --tiny: the interpreter takes a fraction of a second each)
SWEEP = [(block_r, warps) for block_r in (8, 16, 32, 64) for warps in (1, 2, 4, 8)]


def block_inputs(size: int, rows: int, device: str) -> dict:
    """A block as GPTQ hands it to its runner: weights (size, rows), hinv, per-channel params."""
    gen = torch.Generator().manual_seed(0)
    weight_t = (torch.randn(size, rows, generator=gen) * 0.02).to(device)
    x = torch.randn(4 * size, size, generator=gen)
    h = (x.t() @ x).double()
    h.diagonal().add_(0.01 * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    scales, zeros = compute_qparams(weight_t.t(), BITS, -1, True, min_zero=1, fp16_scales=True)
    return {
        "weight_t": weight_t,
        "hinv": hinv.to(device),
        "params": gptq._params_from(scales.t().contiguous(), zeros.t().contiguous(), BITS),
        "group_index": torch.zeros(size, dtype=torch.long, device=device),
    }


def runner(size: int, rows: int, device: str, kernel: bool) -> gptq._BlockRunner:
    """A block runner on the kernel path or on the graph path (eager on the CPU)."""
    gptq.GPTQ_BLOCK_KERNEL = kernel
    try:
        made = gptq._BlockRunner(size, rows, torch.device(device))
    finally:
        gptq.GPTQ_BLOCK_KERNEL = True
    if made._kernel != kernel:
        sys.exit("the kernel path needs CUDA and triton, or --tiny under TRITON_INTERPRET=1")
    return made


def time_runner(block: dict, made: gptq._BlockRunner, device: str) -> tuple[float, torch.Tensor]:
    """Microseconds per ``run`` (after the warm-up and capture runs) and the codes it writes."""
    codes = torch.empty_like(block["weight_t"])

    def call():
        made.run(block["weight_t"], block["hinv"], block["params"], block["group_index"], out_codes=codes)

    call()
    call()  # the graph path captures on its second run
    return eager_time_us([call] * calls(device), device), codes


def time_kernel(block: dict, device: str, **config) -> float:
    """Microseconds per kernel launch replayed in a CUDA graph (wall time on the CPU)."""
    from quantkit.kernels.gptq_block_triton import gptq_block_triton

    params, weight = block["params"], block["weight_t"]
    codes, errors = torch.empty_like(weight), torch.empty_like(weight)

    def call():
        gptq_block_triton(weight, block["hinv"], params.scales, params.low, params.high, block["group_index"],
                          codes=codes, errors=errors, **config)

    return graph_time_us([call] * calls(device), device)


def calls(device: str) -> int:
    return CALLS if device == "cuda" else 2


def sweep(block: dict, device: str) -> dict[str, float | str]:
    times: dict[str, float | str] = {}
    for block_r, warps in SWEEP:
        try:
            times[f"r{block_r} w{warps}"] = time_kernel(block, device, block_r=block_r, num_warps=warps)
        except Exception as exc:  # noqa: BLE001 - a tile that does not compile is a result too
            times[f"r{block_r} w{warps}"] = f"error {type(exc).__name__}: {str(exc)[:80]}"
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.tiny:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--tiny runs the kernel on the CPU: set TRITON_INTERPRET=1")
        os.environ["QUANTKIT_KERNELS"] = "triton"
    device = "cpu" if args.tiny else "cuda"
    size, all_rows = (TINY_SIZE, TINY_ROWS) if args.tiny else (SIZE, ROWS)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    print(f"GPTQ column loop, blocks of {size} columns, {BITS}-bit, {name}: microseconds per block")
    results = []
    for rows in all_rows:
        block = block_inputs(size, rows, device)
        graph_us, graph_codes = time_runner(block, runner(size, rows, device, kernel=False), device)
        kernel_us, kernel_codes = time_runner(block, runner(size, rows, device, kernel=True), device)
        alone_us = time_kernel(block, device)
        agree = float((kernel_codes == graph_codes).double().mean())
        entry = {"rows": rows, "size": size, "graph_us": graph_us, "kernel_us": kernel_us,
                 "kernel_alone_us": alone_us, "codes_agree": agree}
        print(f"  rows {rows:6d}: graph {graph_us:9.1f}  kernel {kernel_us:9.1f} ({graph_us / kernel_us:5.1f}x)  "
              f"kernel alone {alone_us:9.1f}  codes agree {agree:.6f}", flush=True)
        if args.sweep:
            entry["sweep_us"] = sweep(block, device)
            numeric = {k: v for k, v in entry["sweep_us"].items() if isinstance(v, float)}
            best = min(numeric, key=numeric.get)
            print(f"    sweep best {best}: {numeric[best]:.1f}  " +
                  "  ".join(f"{k} {v:.1f}" for k, v in numeric.items()), flush=True)
        results.append(entry)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "blocks": results}, indent=1))


if __name__ == "__main__":
    main()
