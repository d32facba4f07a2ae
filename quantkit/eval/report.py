"""Evaluation results side by side: a rich table for people, JSON for machines, same content.

Rows are metrics (perplexity per dataset, parameters, size on disk and in memory, sizes in MB of
10^6 bytes); columns are the baseline, then each model with its change against the baseline:
perplexity as an absolute and relative difference, sizes as a ratio ("3.62x smaller").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quantkit.eval.footprint import Footprint
from quantkit.eval.perplexity import PerplexityResult

DATASET_LABELS = {"wikitext2": "WikiText-2", "wikipedia-heldout": "Wikipedia held-out"}
SIZE_METRICS = (
    ("parameters", "parameters"),
    ("bytes_on_disk", "size on disk (MB)"),
    ("bytes_in_memory", "size in memory (MB)"),
)
MISSING = "—"


@dataclass
class EvalResult:
    model: str
    path: str | None = None
    perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    footprint: Footprint | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "path": self.path,
            "perplexity": {name: r.to_dict() for name, r in self.perplexity.items()},
            "footprint": None if self.footprint is None else self.footprint.to_dict(),
            "extra": dict(self.extra),
        }


@dataclass
class Metric:
    key: str  # "ppl:<dataset>" or a Footprint field
    label: str


def metrics_of(results: list[EvalResult]) -> list[Metric]:
    """Perplexity rows (WikiText-2 first, then datasets in order of appearance), then sizes."""
    datasets: list[str] = []
    for result in results:
        datasets += [name for name in result.perplexity if name not in datasets]
    datasets.sort(key=lambda name: name != "wikitext2")
    rows = []
    for name in datasets:
        label = DATASET_LABELS.get(name, name)
        rows.append(Metric(f"ppl:{name}", f"{label} ppl"))
        if any(name in result.extra.get("agreement", {}) for result in results):
            rows.append(Metric(f"agree:{name}", f"{label} top-1 agreement"))
            rows.append(Metric(f"kl:{name}", f"{label} mean KL (nats)"))
    return rows + [Metric(key, label) for key, label in SIZE_METRICS]


def metric_value(result: EvalResult, key: str) -> float | None:
    if key.startswith("ppl:"):
        found = result.perplexity.get(key.removeprefix("ppl:"))
        return None if found is None else found.perplexity
    if key.startswith(("agree:", "kl:")):
        kind, name = key.split(":", 1)
        found = result.extra.get("agreement", {}).get(name)
        return None if found is None else found["top1_agreement" if kind == "agree" else "mean_kl"]
    return None if result.footprint is None else getattr(result.footprint, key)


def metric_change(key: str, baseline: float | None, value: float | None) -> dict | None:
    """Perplexity: {"delta", "delta_percent"}; sizes: {"ratio" (baseline / model), "text"}."""
    if baseline is None or value is None:
        return None
    if key.startswith("ppl:"):
        delta = value - baseline
        return {"delta": delta, "delta_percent": 100.0 * delta / baseline}
    if value == 0 or baseline == 0:
        return None
    return {"ratio": baseline / value, "text": ratio_text(baseline, value)}


def ratio_text(baseline: float, value: float) -> str:
    if value == baseline:
        return "same"
    if value < baseline:
        return f"{baseline / value:.2f}x smaller"
    return f"{value / baseline:.2f}x larger"


def format_value(key: str, value: float | None) -> str:
    if value is None:
        return MISSING
    if key.startswith("ppl:"):
        return f"{value:.2f}"
    if key.startswith("agree:"):
        return f"{100 * value:.2f}%"
    if key.startswith("kl:"):
        return f"{value:.4f}"
    if key == "parameters":
        return f"{value:,}"
    return f"{value / 1e6:.2f}"


def format_change(change: dict | None) -> str:
    if change is None:
        return MISSING
    if "delta" in change:
        return f"{change['delta']:+.2f} ({change['delta_percent']:+.1f}%)"
    return change["text"]


def render_eval_table(results: list[EvalResult], baseline: EvalResult | None = None, console=None):
    """Print the comparison table to `console` (a new rich Console when None); return the Table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="quantkit eval")
    table.add_column("metric")
    for result in [baseline] if baseline else []:
        table.add_column(f"{result.model} (baseline)", justify="right")
    for result in results:
        table.add_column(result.model, justify="right")
        if baseline is not None:
            table.add_column("change", justify="right")
    for metric in metrics_of(([baseline] if baseline else []) + results):
        table.add_row(metric.label, *_table_cells(metric.key, results, baseline))
    (console or Console()).print(table)
    return table


def _table_cells(key: str, results: list[EvalResult], baseline: EvalResult | None) -> list[str]:
    if baseline is None:
        return [format_value(key, metric_value(result, key)) for result in results]
    base = metric_value(baseline, key)
    cells = [format_value(key, base)]
    for result in results:
        value = metric_value(result, key)
        cells += [format_value(key, value), format_change(metric_change(key, base, value))]
    return cells


def results_to_json(results: list[EvalResult], baseline: EvalResult | None = None) -> dict:
    """The table's content as a JSON-ready dict (``json.dumps`` it): every result in full, and
    with a baseline each model's change per metric (None where a value is missing)."""
    metrics = metrics_of(([baseline] if baseline else []) + results)
    models = []
    for result in results:
        entry = result.to_dict()
        if baseline is not None:
            entry["change"] = {m.key: _change_of(m.key, baseline, result) for m in metrics}
        models.append(entry)
    return {
        "metrics": [{"key": m.key, "label": m.label} for m in metrics],
        "baseline": None if baseline is None else baseline.to_dict(),
        "models": models,
    }


def _change_of(key: str, baseline: EvalResult, result: EvalResult) -> dict | None:
    return metric_change(key, metric_value(baseline, key), metric_value(result, key))
