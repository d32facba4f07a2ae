"""The per-layer sparsity table that ``quantkit quantize`` prints after a pruning recipe."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from quantkit.sparsity.targets import SparsityReport


def render_sparsity(report: SparsityReport, console: Console) -> None:
    """One row per decoder layer, one column per pruned linear (share of zeros), then the totals."""
    per_layer = report.per_layer()
    names = list(dict.fromkeys(name for row in per_layer.values() for name in row))
    table = Table(title=f"sparsity per layer ({report.structure}, target {report.target_sparsity:.0%})")
    table.add_column("layer", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    for index, row in per_layer.items():
        table.add_row(str(index), *(f"{row[name]:.1%}" if name in row else "-" for name in names))
    console.print(table)
    structure = ""
    if report.structure != "unstructured":
        structure = f"; every pruned linear follows {report.structure}: {'yes' if report.follows_structure else 'NO'}"
    console.print(f"pruned linears {report.targets_sparsity:.2%} zeros; whole model {report.global_sparsity:.2%} "
                  f"(left dense: {', '.join(report.ignored) or 'none'}){structure}", soft_wrap=True)
