"""quantkit's pruning table on the bundled target: magnitude, Wanda and SparseGPT at 50% unstructured,
2:4 and 4:8, and SparseGPT 2:4 with 4-bit GPTQ in the same pass.

Each run prunes the bundled target with the same calibration samples as every other quantkit and
peer run (128 x 512 tokens of the Wikipedia calibration cut, seed 0), writes the checkpoint, and
evaluates it beside the dense model with `quantkit eval`'s code: WikiText-2 test and held-out
Wikipedia perplexity (first --max-windows windows of 512 tokens), top-1 agreement and mean KL
against the dense model. Prints a table and writes JSON; wall times are of the whole `compress`
call (load, calibration, layers, write) on this machine's CPU.

    python scripts/bench_sparsity.py [--max-windows 64] [--runs sparsegpt-50,wanda-50] [--threads 1]
        [--json scripts/results/sparsity_bundled.json]

The peers (llm-compressor's SparseGPTModifier and WandaPruningModifier) run in their own virtualenv:
scripts/peers/run_peers_sparsity.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import torch

from quantkit.compress import compress
from quantkit.eval.evaluate import evaluate_model, evaluate_pair
from quantkit.recipe import recipe_from_dict

CALIBRATION = {"dataset": "wikipedia", "num_samples": 128, "seq_len": 512, "seed": 0}
DATASETS = ("wikitext2", "wikipedia-heldout")
# label -> the recipe step
RUNS = {
    "magnitude-50": {"method": "magnitude", "sparsity": 0.5},
    "magnitude-50-row": {"method": "magnitude", "sparsity": 0.5, "comparison": "row"},
    "wanda-50": {"method": "wanda", "sparsity": 0.5},
    "sparsegpt-50": {"method": "sparsegpt", "sparsity": 0.5},
    "sparsegpt-50-not-sequential": {"method": "sparsegpt", "sparsity": 0.5, "true_sequential": False},
    "magnitude-2of4": {"method": "magnitude", "mask_structure": "2:4"},
    "wanda-2of4": {"method": "wanda", "mask_structure": "2:4"},
    "sparsegpt-2of4": {"method": "sparsegpt", "mask_structure": "2:4"},
    "sparsegpt-2of4-not-sequential": {"method": "sparsegpt", "mask_structure": "2:4", "true_sequential": False},
    "sparsegpt-2of4-diagonal": {"method": "sparsegpt", "mask_structure": "2:4", "nm_selection": "diagonal"},
    "sparsegpt-2of4-diagonal-not-sequential": {"method": "sparsegpt", "mask_structure": "2:4",
                                               "nm_selection": "diagonal", "true_sequential": False},
    "wanda-2of4-sequential": {"method": "wanda", "mask_structure": "2:4", "true_sequential": True},
    "wanda-4of8": {"method": "wanda", "mask_structure": "4:8"},
    "sparsegpt-4of8": {"method": "sparsegpt", "mask_structure": "4:8"},
    "sparsegpt-2of4-w4a16": {"method": "sparsegpt", "mask_structure": "2:4", "scheme": "w4a16", "group_size": 128},
}


def recipe_for(step: dict):
    quantizes = "scheme" in step
    return recipe_from_dict({"name": "bench", "format": "gptq" if quantizes else "dense", "calibration": CALIBRATION,
                             "steps": [step]})


def run(label: str, step: dict, workdir: Path, windows: int, keep: Path | None) -> dict:
    out = (keep / label) if keep else workdir / label
    start = time.perf_counter()
    result = compress(None, recipe_for(step), out, overwrite=True)
    seconds = time.perf_counter() - start
    evaluated, _base = evaluate_pair(str(out), "quantkit-target", datasets=DATASETS, max_windows=windows,
                                     progress=False)
    row = {"label": label, "step": step, "compress_seconds": round(seconds, 2),
           "targets_sparsity": result.sparsity.targets_sparsity, "global_sparsity": result.sparsity.global_sparsity,
           "follows_structure": result.sparsity.follows_structure}
    for name in DATASETS:
        row[f"{name}_ppl"] = evaluated.perplexity[name].perplexity
        row[f"{name}_top1"] = evaluated.extra["agreement"][name]["top1_agreement"]
        row[f"{name}_kl"] = evaluated.extra["agreement"][name]["mean_kl"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steady timings on a shared machine)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the checkpoints under this folder")
    ap.add_argument("--json", default="scripts/results/sparsity_bundled.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = Path(args.json)
    previous = json.loads(path.read_text()) if path.exists() else {}
    dense = evaluate_model(None, datasets=DATASETS, max_windows=args.max_windows, progress=False)
    rows = {"dense": {"label": "dense", **{f"{n}_ppl": dense.perplexity[n].perplexity for n in DATASETS}}}
    if previous.get("eval_windows_of_512") == args.max_windows:  # add to the same table
        rows.update({row["label"]: row for row in previous.get("rows", [])})
    print(f"dense: wt2 {rows['dense']['wikitext2_ppl']:.3f} heldout {rows['dense']['wikipedia-heldout_ppl']:.3f}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.runs.split(","):
            row = run(label, RUNS[label], Path(tmp), args.max_windows, args.keep)
            rows[label] = row
            print(f"{label:30s} wt2 {row['wikitext2_ppl']:8.3f}  heldout {row['wikipedia-heldout_ppl']:7.3f}  "
                  f"top1 {100 * row['wikitext2_top1']:6.2f}%  KL {row['wikitext2_kl']:.4f}  "
                  f"sparsity {row['targets_sparsity']:.3f}  {row['compress_seconds']:6.1f}s", flush=True)
            payload = {"model": "quantkit-target", "calibration": CALIBRATION, "eval_windows_of_512": args.max_windows,
                       "threads": args.threads, "load_average": os.getloadavg(),
                       "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                       "rows": list(rows.values())}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
