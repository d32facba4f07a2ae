"""Print the README's accuracy table (markdown) from the benchmark results in scripts/results/.

    python scripts/accuracy_table.py

Reads accuracy_bundled.json (RTN, RTN asym, reference GPTQ without clip search, AWQ),
accuracy_bundled_gptq.json (quantkit's default GPTQ, with clip search) and peers_accuracy.json
(llm-compressor and GPTQModel on the same model, calibration samples and evaluation).
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMES = ("W4 g128", "W3 g128", "W8 per-channel")
OURS = ("RTN", "RTN asym", "GPTQ", "GPTQ act-order", "GPTQ no-clip", "GPTQ act-order no-clip", "AWQ")
PEERS = {  # peers_accuracy.json run name -> (scheme, label)
    "lc-gptq-w4g128": ("W4 g128", "llm-compressor GPTQ (W4A16 preset, actorder static)"),
    "lc-gptq-w4g128-noact": ("W4 g128", "llm-compressor GPTQ, actorder off"),
    "lc-awq-w4g128": ("W4 g128", "llm-compressor AWQ (W4A16_ASYM)"),
    "gm-gptq-w4g128": ("W4 g128", "GPTQModel GPTQ (defaults)"),
    "gm-gptq-w4g128-desc": ("W4 g128", "GPTQModel GPTQ, desc_act"),
    "gm-gptq-w4g128-plain": ("W4 g128", "GPTQModel GPTQ, no reordering, damp 0.01"),
    "lc-gptq-w3g128": ("W3 g128", "llm-compressor GPTQ"),
    "lc-awq-w3g128": ("W3 g128", "llm-compressor AWQ"),
    "gm-gptq-w3g128": ("W3 g128", "GPTQModel GPTQ"),
    "lc-gptq-w8ch": ("W8 per-channel", "llm-compressor GPTQ"),
    "gm-gptq-w8ch": ("W8 per-channel", "GPTQModel GPTQ"),
}


def main() -> None:
    rows = json.loads((RESULTS / "accuracy_bundled.json").read_text())["rows"]
    rows += json.loads((RESULTS / "accuracy_bundled_gptq.json").read_text())["rows"][1:]
    by_label = {row["label"]: row for row in rows}
    peers = {run["spec"]["name"]: run for run in json.loads((RESULTS / "peers_accuracy.json").read_text())["runs"]}
    float_row = by_label["float"]
    print("| scheme | method | WikiText-2 ppl | held-out Wikipedia ppl | top-1 agreement (WT2 / held-out) | mean KL (WT2 / held-out) |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| float | | {float_row['wikitext2_ppl']:.2f} | {float_row['wikipedia-heldout_ppl']:.2f} | | |")
    for scheme in SCHEMES:
        for method in OURS:
            row = by_label.get(f"{method} {scheme}")
            if row is None:
                continue
            print(f"| {scheme} | quantkit {method} | {row['wikitext2_ppl']:.2f} | {row['wikipedia-heldout_ppl']:.2f} | "
                  f"{100 * row['wikitext2_top1']:.2f}% / {100 * row['wikipedia-heldout_top1']:.2f}% | "
                  f"{row['wikitext2_kl']:.4f} / {row['wikipedia-heldout_kl']:.4f} |")
        for name, (peer_scheme, label) in PEERS.items():
            if peer_scheme == scheme and name in peers:
                ppl = peers[name]["perplexity"]
                print(f"| {scheme} | {label} | {ppl['wikitext2']['perplexity']:.2f} | "
                      f"{ppl['wikipedia-heldout']['perplexity']:.2f} | | |")


if __name__ == "__main__":
    main()
