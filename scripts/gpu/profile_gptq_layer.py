"""Where GPTQ's time goes on one decoder layer of a large model, and how the column solve scales
with the rows a rank keeps (what data-parallel quantization can and cannot share).

    python scripts/gpu/profile_gptq_layer.py [--layers 2] [--json out.json]   # Llama-3-70B shape, one GPU
    python scripts/gpu/profile_gptq_layer.py --tiny                           # a dry run on the CPU

Runs the real pipeline (``quantize_model``, GPTQ W4 g128) on the first ``--layers`` layers of the
random 70B-shaped model of ``bench_quantize_multi_gpu.py`` with timers (synchronising the device)
around its parts: the Hessian passes (forward passes, ``XᵀX``), the Cholesky inverse, the group
scales (clip search), the column loop, the lazy block updates, recording the result, and the
layer's output pass. The last layer run is reported (the first carries the warm-up). Then each
linear shape of the layer is solved alone with a random positive-definite Hessian, with all its
rows and with 1/2 and 1/4 of them (one rank's share under the row split), to show how much of the
solve the ranks divide. The timers add synchronisations, so parts sum to a little more than an
untimed run.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quantize_multi_gpu import LLAMA3_70B, TINY, lazy_random_model

from quantkit.models.adapters import get_adapter
from quantkit.pipeline import context, driver, gptq_step, quantize_model
from quantkit.quant import gptq
from quantkit.quant.gptq import GPTQConfig, gptq_quantize
from quantkit.quant.scheme import QuantScheme
from quantkit.recipe import weight_quant_recipe

TIMES: dict[str, float] = defaultdict(float)
COUNTS: dict[str, int] = defaultdict(int)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(owner, attribute: str, label: str, device: torch.device) -> None:
    """Wrap ``owner.attribute`` so its calls add their synchronised wall time to ``TIMES[label]``."""
    original = getattr(owner, attribute)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            _sync(device)
            TIMES[label] += time.perf_counter() - start
            COUNTS[label] += 1

    setattr(owner, attribute, wrapper)


def install_timers(device: torch.device) -> None:
    timed(driver, "run_layer", "reference output (one batch)", device)
    timed(gptq_step, "_collect_hessians", "Hessian passes (forwards, XtX, all-reduce)", device)
    timed(gptq_step, "gptq_quantize", "GPTQ solve, all linears", device)
    timed(gptq, "_inverse_cholesky_upper", "  Cholesky inverse", device)
    timed(gptq, "_set_group_params", "  group scales (clip search)", device)
    timed(gptq, "_quantize_columns", "  column loop + lazy updates + scales", device)
    timed(gptq._BlockRunner, "run", "    column loop (block runner)", device)
    timed(context.LayerContext, "record", "record (dequantize, error, copy to CPU)", device)
    timed(context.LayerContext, "advance", "layer outputs for the next layer", device)


def solve_scaling(shape: dict, device: torch.device, fractions: list[int], repeats: int) -> list[dict]:
    """Seconds of one GPTQ solve per linear shape, with all rows and with 1/N of them."""
    hidden, mlp = shape["hidden_size"], shape["intermediate_size"]
    kv = hidden // shape["num_attention_heads"] * shape["num_key_value_heads"]
    shapes = {"q/o": (hidden, hidden), "k/v": (kv, hidden), "gate/up": (mlp, hidden), "down": (hidden, mlp)}
    scheme = QuantScheme(bits=4, group_size=128, symmetric=True)
    gen = torch.Generator(device=device).manual_seed(0)
    rows_out = []
    for name, (rows, cols) in shapes.items():
        x = torch.randn(4 * cols, cols, device=device, generator=gen)
        hessian = x.t() @ x / x.shape[0]
        del x
        weight = torch.randn(rows, cols, device=device, generator=gen) * 0.02
        entry = {"linear": name, "rows": rows, "cols": cols}
        for n in fractions:
            part = weight[: rows // n]
            gptq_quantize(part, hessian, scheme, GPTQConfig())  # warm-up (graph capture)
            _sync(device)
            start = time.perf_counter()
            for _ in range(repeats):
                gptq_quantize(part, hessian, scheme, GPTQConfig())
            _sync(device)
            entry[f"seconds_rows_1/{n}"] = round((time.perf_counter() - start) / repeats, 4)
        rows_out.append(entry)
        del hessian, weight
    return rows_out


def cholesky_variants(sizes: list[int], device: torch.device) -> list[dict]:
    """The upper Cholesky factor of H⁻¹ two ways: GPTQ's (factor, invert, factor again) and by
    reversal (U = J L⁻¹ J with L the lower factor of J H J, J the reversal: one factorisation and
    one triangular solve), timed, with their largest difference relative to the largest entry."""
    out = []
    for n in sizes:
        gen = torch.Generator(device=device).manual_seed(n)
        x = torch.randn(2 * n, n, device=device, generator=gen)
        h = x.t() @ x / x.shape[0]
        del x
        h.diagonal().add_(0.01 * h.diagonal().mean())

        def reference():
            lower = torch.linalg.cholesky(h)
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)

        def reversal():
            lower = torch.linalg.cholesky(h.flip(0, 1))
            eye = torch.eye(n, device=device, dtype=h.dtype)
            return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1)

        entry = {"n": n}
        results = {}
        for name, fn in (("reference", reference), ("reversal", reversal)):
            results[name] = fn()
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            entry[f"{name}_s"] = round(time.perf_counter() - start, 4)
        entry["max_rel_diff"] = float((results["reference"] - results["reversal"]).abs().max()
                                      / results["reference"].abs().max())
        out.append(entry)
        del h, results
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    shape = TINY if args.tiny else LLAMA3_70B
    if args.tiny:
        args.samples, args.seq_len = min(args.samples, 8), min(args.seq_len, 32)
    device = torch.device("cpu" if args.tiny else "cuda")

    model = lazy_random_model(args.layers, shape, device)
    samples = torch.randint(0, shape["vocab_size"], (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    recipe = weight_quant_recipe("w4a16", group_size=128, method="gptq", symmetric=True)
    install_timers(device)
    per_layer = []

    def snapshot(report):
        per_layer.append({"layer": report.index, "seconds": round(report.seconds, 3),
                          "parts": {k: round(v, 3) for k, v in TIMES.items()}, "calls": dict(COUNTS)})
        TIMES.clear()
        COUNTS.clear()

    result = quantize_model(model, get_adapter(model), recipe, device=device, samples=samples,
                            batch_size=args.batch_size, on_layer=snapshot)
    last = per_layer[-1]
    print(f"GPTQ W4 g128, {'tiny' if args.tiny else 'Llama-3-70B'} shape, {args.samples} x {args.seq_len} tokens, "
          f"batch {args.batch_size}, device {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"layer {last['layer']}: {last['seconds']:.2f} s in all")
    for label, seconds in last["parts"].items():
        print(f"  {label:<48} {seconds:8.3f} s  ({last['calls'][label]} calls)")
    scaling = solve_scaling(shape, device, [1, 2, 4], 1 if args.tiny else args.repeats)
    print("\none GPTQ solve (random SPD Hessian), seconds by the share of rows kept:")
    for entry in scaling:
        cells = "  ".join(f"{k.split('_')[-1]}: {v:.3f}" for k, v in entry.items() if k.startswith("seconds"))
        print(f"  {entry['linear']:<8} {entry['rows']:>6} x {entry['cols']:<6} {cells}")
    variants = cholesky_variants([256, 768] if args.tiny else [8192, 28672], device)
    print("\nupper Cholesky factor of H^-1 (seconds): GPTQ's three steps against reversal + one triangular solve")
    for entry in variants:
        print(f"  n={entry['n']:<6} reference {entry['reference_s']:.3f}  reversal {entry['reversal_s']:.3f}  "
              f"max |diff| / max |U| {entry['max_rel_diff']:.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"layers": per_layer, "solve_scaling": scaling, "cholesky": variants,
                                               "peak_gpu_gib": (result.peak_device_bytes or 0) / 2**30}, indent=2))


if __name__ == "__main__":
    main()
