"""quantkit's accuracy table on the bundled target: RTN, GPTQ, GPTQ act-order and AWQ at several widths.

Each run quantizes the bundled target with the same calibration samples (128 x 512 tokens of the
Wikipedia calibration cut, seed 0), writes the checkpoint, and evaluates it beside the float model
with `quantkit eval`'s code: WikiText-2 test and held-out Wikipedia perplexity, top-1 agreement and
mean KL against the float model. Prints a table and writes JSON. Wall times are of the quantization
call (load, calibration, layers, write) on this machine's CPU.

    python scripts/bench_accuracy.py [--max-windows 64] [--json scripts/results/accuracy_bundled.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from quantkit.compress import compress
from quantkit.eval.evaluate import evaluate_pair
from quantkit.recipe import weight_quant_recipe

SCHEMES = {"W4 g128": ("w4a16", 128), "W3 g128": ("w3a16", 128), "W8 per-channel": ("w8a16", -1)}
# label -> (method, options, symmetric); AWQ is asymmetric by design (its recipe and layout), so
# RTN asym is its like-for-like baseline
METHODS = {"RTN": ("rtn", {}, True), "RTN asym": ("rtn", {}, False), "GPTQ": ("gptq", {}, True),
           "GPTQ act-order": ("gptq", {"act_order": True}, True), "AWQ": ("awq", {}, False),
           # the reference algorithm, without quantkit's per-group clip search (an ablation)
           "GPTQ no-clip": ("gptq", {"clip_search": False}, True),
           "GPTQ act-order no-clip": ("gptq", {"act_order": True, "clip_search": False}, True)}
DEFAULT_METHODS = ("RTN", "RTN asym", "GPTQ", "GPTQ act-order", "AWQ")
DATASETS = ("wikitext2", "wikipedia-heldout")


def run(label: str, scheme: str, group: int, method: str, options: dict, symmetric: bool, workdir: Path,
        windows: int) -> dict:
    recipe = weight_quant_recipe(scheme, group_size=group, method=method, symmetric=symmetric, options=options,
                                 calibration={"dataset": "wikipedia", "num_samples": 128, "seq_len": 512, "seed": 0})
    out = workdir / f"{method}-{scheme}-{group}-{len(options)}-{symmetric}"
    start = time.perf_counter()
    compress(None, recipe, out, overwrite=True)
    seconds = time.perf_counter() - start
    result, _base = evaluate_pair(str(out), "quantkit-target", datasets=DATASETS, max_windows=windows, progress=False)
    row = {"label": label, "method": method, "scheme": scheme, "group_size": group, "symmetric": symmetric,
           "options": options, "quantize_seconds": round(seconds, 2)}
    for name in DATASETS:
        row[f"{name}_ppl"] = result.perplexity[name].perplexity
        row[f"{name}_top1"] = result.extra["agreement"][name]["top1_agreement"]
        row[f"{name}_kl"] = result.extra["agreement"][name]["mean_kl"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--json", default="scripts/results/accuracy_bundled.json")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    args = ap.parse_args()
    from quantkit.eval.evaluate import evaluate_model

    float_result = evaluate_model(None, datasets=DATASETS, max_windows=args.max_windows, progress=False)
    rows = [{"label": "float", **{f"{n}_ppl": float_result.perplexity[n].perplexity for n in DATASETS}}]
    with tempfile.TemporaryDirectory() as tmp:
        for scheme_label in args.schemes.split(","):
            scheme, group = SCHEMES[scheme_label]
            for method_label in args.methods.split(","):
                method, options, symmetric = METHODS[method_label]
                row = run(f"{method_label} {scheme_label}", scheme, group, method, options, symmetric, Path(tmp),
                          args.max_windows)
                rows.append(row)
                print(f"{row['label']:28s} wt2 {row['wikitext2_ppl']:8.3f}  heldout {row['wikipedia-heldout_ppl']:7.3f}"
                      f"  top1 {100 * row['wikitext2_top1']:6.2f}%  KL {row['wikitext2_kl']:.4f}"
                      f"  {row['quantize_seconds']:6.1f}s", flush=True)
    payload = {"model": "quantkit-target", "eval_windows_of_512": args.max_windows, "threads": torch.get_num_threads(),
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"float wt2 {rows[0]['wikitext2_ppl']:.3f} heldout {rows[0]['wikipedia-heldout_ppl']:.3f}; wrote {args.json}")


if __name__ == "__main__":
    main()
