"""What ``quantkit distill`` shows: a progress bar with the loss and tokens/s, then the report."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table


class DistillProgress:
    """A rich progress bar fed by the trainer's callback; phases (loading, evaluating) show as its description."""

    def __init__(self, console: Console, enabled: bool = True) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description}[/]"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=console, disable=not enabled, transient=False)
        self.task = None

    def __enter__(self) -> DistillProgress:
        self.progress.__enter__()
        self.task = self.progress.add_task("loading", total=None, detail="")
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def callback(self, kind: str, payload) -> None:
        if kind == "phase":
            self.progress.update(self.task, description=payload)
        elif kind == "start":
            first, total = payload
            self.progress.update(self.task, description="distilling", completed=first, total=total)
        elif kind == "sized":
            self.progress.update(self.task, total=payload)
        elif kind == "step":
            parts = " ".join(f"{k} {v:.4f}" for k, v in payload.parts.items() if v)
            detail = f"loss {payload.loss:.4f} ({parts}) lr {payload.lr:.2e} {payload.tokens_per_second:,.0f} tok/s"
            self.progress.update(self.task, completed=payload.step, total=payload.total_steps, detail=detail)


def render_report(report: dict, console: Console) -> None:
    table = Table(title=f"perplexity, first {report['eval_windows_of_512'] or 'all'} windows of 512 tokens")
    for column in ("text", "teacher", "student before", "student after", "gap recovered"):
        table.add_column(column, justify="right" if column != "text" else "left")
    for name, row in report["perplexity"].items():
        recovered = row["recovered_fraction"]
        table.add_row(name, f"{row['teacher']:.2f}", f"{row['student_before']:.2f}", f"{row['student_after']:.2f}",
                      "-" if recovered is None else f"{recovered:.0%}")
    console.print(table)
    mask = report.get("mask")
    kept = f"; mask held: {mask['linears']} linears at {mask['sparsity']:.1%} zeros, {mask['violations']} changed" if mask else ""
    console.print(f"{report['steps']} steps, {report['tokens']:,} tokens in {report['train_seconds']:.0f} s of training "
                  f"({report['tokens_per_second']:,.0f} tok/s on {report['device']}), {report['total_seconds']:.0f} s in all"
                  f"{kept}", soft_wrap=True)
    console.print(f"wrote {report['output']}", soft_wrap=True)
