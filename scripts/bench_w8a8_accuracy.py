"""Accuracy of SmoothQuant W8A8, FP8 and KV-cache quantization on the bundled target and on its
outlier version (``quant/smoothquant_outliers.py``: 4 channels of every input norm x64, matching
weight columns /64 — the same float function, with the activation outliers of 6B+ models).

Each configuration is a shipped recipe (calibration: 128 samples of 512 tokens of the Wikipedia
cut, seed 0), written as a checkpoint and evaluated beside its float model with `quantkit eval`'s
code: WikiText-2 test and held-out Wikipedia perplexity, top-1 agreement and mean KL against the
float model, on the first --max-windows windows of 512 tokens (CPU, float32). Also the KV cache's
bytes per token. Prints a markdown table and writes JSON.

    python scripts/bench_w8a8_accuracy.py [--max-windows 64] [--json scripts/results/accuracy_w8a8.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from quantkit.compress import compress
from quantkit.eval.evaluate import evaluate_model, evaluate_pair
from quantkit.models.loading import load_model
from quantkit.quant.smoothquant_outliers import inject_activation_outliers
from quantkit.recipe import load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DATASETS = ("wikitext2", "wikipedia-heldout")
CONFIGS = {  # label -> recipe file
    "naive W8A8 INT8": "w8a8-int8.yaml",
    "SmoothQuant W8A8 INT8": "w8a8-smoothquant.yaml",
    "FP8 dynamic": "fp8-dynamic.yaml",
    "FP8 static": "fp8-static.yaml",
    "W8A16 FP8": "w8a16-fp8.yaml",
    "KV-FP8": "kv-fp8.yaml",
    "KV-INT8": "kv-int8.yaml",
    "SmoothQuant W8A8 + KV-FP8": "w8a8-smoothquant-kv-fp8.yaml",
}


def kv_bytes_per_token(config, kv_dtype_bytes: int) -> int:
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * kv_dtype_bytes


def outlier_target(folder: Path) -> Path:
    loaded = load_model(None, dtype="float32")
    inject_activation_outliers(loaded.model, loaded.adapter, channels=4, factor=64.0)
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-windows", type=int, default=64)
    ap.add_argument("--json", default="scripts/results/accuracy_w8a8.json")
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--models", default="target,outliers")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bases = {"target": "quantkit-target", "outliers": None}
        for model_label in args.models.split(","):
            base = bases[model_label] or str(outlier_target(Path(tmp) / "target-outliers"))
            float_result = evaluate_model(base, datasets=DATASETS, max_windows=args.max_windows, progress=False)
            row = {"model": model_label, "label": "float", "quantize_seconds": None}
            for name in DATASETS:
                row[f"{name}_ppl"] = float_result.perplexity[name].perplexity
            rows.append(row)
            print(f"{model_label:9s} {'float':28s} wt2 {row['wikitext2_ppl']:8.3f}  heldout "
                  f"{row['wikipedia-heldout_ppl']:7.3f}", flush=True)
            for label in args.configs.split(","):
                recipe = load_recipe(RECIPES / CONFIGS[label])
                out = Path(tmp) / f"{model_label}-{CONFIGS[label]}"
                start = time.perf_counter()
                compress(base, recipe, out, overwrite=True)
                seconds = time.perf_counter() - start
                result, _ = evaluate_pair(str(out), base, datasets=DATASETS, max_windows=args.max_windows,
                                          progress=False)
                row = {"model": model_label, "label": label, "recipe": CONFIGS[label],
                       "quantize_seconds": round(seconds, 1)}
                for name in DATASETS:
                    row[f"{name}_ppl"] = result.perplexity[name].perplexity
                    row[f"{name}_top1"] = result.extra["agreement"][name]["top1_agreement"]
                    row[f"{name}_kl"] = result.extra["agreement"][name]["mean_kl"]
                rows.append(row)
                print(f"{model_label:9s} {label:28s} wt2 {row['wikitext2_ppl']:8.3f}  heldout "
                      f"{row['wikipedia-heldout_ppl']:7.3f}  top1 {100 * row['wikitext2_top1']:6.2f}%  "
                      f"KL {row['wikitext2_kl']:.4f}  {seconds:6.1f}s", flush=True)
    config = load_model(None).model.config
    payload = {"model": "quantkit-target", "eval_windows_of_512": args.max_windows, "threads": torch.get_num_threads(),
               "kv_bytes_per_token": {"float16": kv_bytes_per_token(config, 2), "fp8/int8": kv_bytes_per_token(config, 1)},
               "rows": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    print(table(payload))


def table(payload: dict) -> str:
    """The README's markdown table from a payload of this script."""
    header = ("| model | config | WikiText-2 ppl | held-out Wikipedia ppl | top-1 agreement (WT2 / held-out) | "
              "mean KL (WT2 / held-out) |")
    lines = [header, "| --- | --- | --- | --- | --- | --- |"]
    floats = {row["model"]: row for row in payload["rows"] if row["label"] == "float"}
    for row in payload["rows"]:
        base = floats[row["model"]]
        cells = []
        for name in DATASETS:
            change = 100 * (row[f"{name}_ppl"] / base[f"{name}_ppl"] - 1)
            cells.append(f"{row[f'{name}_ppl']:.2f}" + ("" if row["label"] == "float" else f" ({change:+.2f}%)"))
        if row["label"] == "float":
            agreement = kl = ""
        else:
            agreement = " / ".join(f"{100 * row[f'{n}_top1']:.2f}%" for n in DATASETS)
            kl = " / ".join(f"{row[f'{n}_kl']:.4f}" for n in DATASETS)
        model = "bundled target" if row["model"] == "target" else "target + outliers"
        lines.append(f"| {model} | {row['label']} | {cells[0]} | {cells[1]} | {agreement} | {kl} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
