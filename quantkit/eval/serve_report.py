"""``quantkit bench serve`` results: a rich table (one column per request rate) and a PNG of
throughput and latency against the request rate. Only measured figures are shown."""

from __future__ import annotations

import textwrap
from pathlib import Path

from quantkit.eval.bench_report import MISSING, check_plot_available


def _stat(summary: dict | None, scale: float = 1e3) -> str:
    if summary is None:
        return MISSING
    return f"{scale * summary['mean']:.1f} / {scale * summary['median']:.1f} / {scale * summary['p99']:.1f}"


def _rate_label(run: dict) -> str:
    rate = run["request_rate"]
    label = "all at once" if rate is None else f"{rate:g} req/s"
    if run.get("max_concurrency"):
        label += f", concurrency {run['max_concurrency']}"
    return label


ROWS = (
    ("completed / failed", lambda r: f"{r['completed']} / {r['failed']}"),
    ("duration (s)", lambda r: f"{r['duration_s']:.2f}"),
    ("requests/s", lambda r: f"{r['requests_per_s']:.2f}"),
    ("output tokens/s", lambda r: f"{r['output_tokens_per_s']:,.1f}"),
    ("total tokens/s", lambda r: f"{r['total_tokens_per_s']:,.1f}"),
    ("TTFT mean / median / p99 (ms)", lambda r: _stat(r["ttft_s"])),
    ("TPOT mean / median / p99 (ms)", lambda r: _stat(r["tpot_s"])),
    ("ITL mean / median / p99 (ms)", lambda r: _stat(r["itl_s"])),
    ("end-to-end mean / median / p99 (ms)", lambda r: _stat(r["e2e_s"])),
)


def caption(payload: dict) -> str:
    workload = payload["workload"]
    lo_in, hi_in = workload["input_len_range"]
    lo_out, hi_out = workload["output_len_range"]
    server = payload.get("server") or {}
    lines = [f"{payload['model']} at {payload['url']} (context {server.get('max_model_len', '?')})",
             (f"{workload['num_requests']} requests per rate, prompts {lo_in}-{hi_in} tokens "
              f"({workload['prompts']}), outputs {lo_out}-{hi_out} tokens, seed {workload['seed']}, "
              f"{workload['sampling']}, {workload['streaming']}")]
    for run in payload["runs"]:
        if run["errors"]:
            lines.append(f"errors at {_rate_label(run)}: " + "; ".join(run["errors"]))
    return "\n".join(lines)


def render_serve_bench(payload: dict, console=None):
    from rich.console import Console
    from rich.table import Table

    table = Table(title="quantkit bench serve", caption=caption(payload), caption_justify="left")
    table.add_column("metric")
    for run in payload["runs"]:
        table.add_column(_rate_label(run), justify="right")
    for label, cell in ROWS:
        table.add_row(label, *[cell(run) for run in payload["runs"]])
    (console or Console()).print(table)
    return table


def plot_serve_bench(payload: dict, path: str | Path) -> None:
    """Output tokens/s (top) and median/p99 TTFT and TPOT (bottom) at each request rate."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = payload["runs"]
    labels = ["inf" if run["request_rate"] is None else f"{run['request_rate']:g}" for run in runs]
    xs = list(range(len(runs)))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    top.plot(xs, [run["output_tokens_per_s"] for run in runs], "o-", label="output tokens/s")
    top.set_ylabel("output tokens/s")
    top.legend()

    def series(key: str, stat: str) -> list[float]:
        return [1e3 * run[key][stat] if run.get(key) else float("nan") for run in runs]

    for key, name, color in (("ttft_s", "TTFT", "tab:blue"), ("tpot_s", "TPOT", "tab:orange")):
        bottom.plot(xs, series(key, "median"), "o-", color=color, label=f"{name} median")
        bottom.plot(xs, series(key, "p99"), "s--", color=color, label=f"{name} p99")
    bottom.set_ylabel("ms")
    bottom.set_yscale("log")
    bottom.set_xlabel("request rate (requests/s; inf: all at once)")
    bottom.legend(fontsize=8)
    for axis in (top, bottom):
        axis.set_xticks(xs, labels)
        axis.grid(True, alpha=0.3)
    head = caption(payload).split("\n")[:2]
    fig.suptitle("\n".join([head[0], *textwrap.wrap(head[1], 110)]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
