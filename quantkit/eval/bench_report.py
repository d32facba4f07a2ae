"""Speed results for people and machines: rich tables, JSON, and a PNG of throughput against concurrency.

Everything here renders a payload that ``quantkit.eval.latency.run_latency`` or
``quantkit.eval.throughput.run_bench`` measured; nothing is computed that was not measured,
and a figure that could not be measured (the bandwidth limit on the CPU) prints as "n/a".
"""

from __future__ import annotations

import json
from pathlib import Path

from quantkit.errors import QuantkitError

NA = "n/a"
MISSING = "—"


# ---------------------------------------------------------------------- JSON
def to_json(payload: dict) -> str:
    return json.dumps(payload, indent=2, allow_nan=False) + "\n"


def write_json(payload: dict, path: str | Path) -> None:
    """Write the JSON to ``path`` (through a temporary file, so a failure leaves no half file)."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(to_json(payload))
    partial.replace(path)


# ---------------------------------------------------------------------- setup line
def setup_text(setup: dict) -> str:
    shape = setup["shape"]
    text = (f"{setup['model']} on {setup['device_name']} ({setup['device']}): hidden {shape['hidden_size']}, "
            f"{shape['num_layers']} layers, {shape['num_heads']} heads / {shape['num_kv_heads']} KV heads, "
            f"MLP {shape['intermediate_size']}, vocab {shape['vocab_size']}; weights {setup['weights']}, "
            f"compute {setup['compute_dtype']}, KV cache {setup['kv_cache_dtype']} "
            f"({setup['kv_cache_tokens']} tokens)")
    if setup.get("speculative"):
        text += f"; speculative: {setup['speculative']}"
    return text


def workload_text(workload: dict) -> str:
    rate = workload["request_rate"]
    arrival = "all at once" if rate is None else f"Poisson at {rate:g} requests/s"
    lo_in, hi_in = workload["input_len_range"]
    lo_out, hi_out = workload["output_len_range"]
    return (f"{workload['num_requests']} requests, prompts {lo_in}-{hi_in} tokens ({workload['prompts']}), "
            f"outputs {lo_out}-{hi_out} tokens, seed {workload['seed']}, {arrival}, {workload['sampling']}")


def bandwidth_text(bandwidth: float | None) -> str:
    if bandwidth is None:
        return f"device bandwidth: {NA} on the CPU (no bandwidth limit is computed there)"
    return f"device bandwidth: {bandwidth / 1e9:,.0f} GB/s (device-to-device copy, bytes read + written)"


# ---------------------------------------------------------------------- cells
def _ms(summary: dict | None) -> str:
    if summary is None:
        return MISSING
    return f"{1e3 * summary['median']:.1f} / {1e3 * summary['p99']:.1f}"


def _rate(value: float | None) -> str:
    return NA if value is None else f"{value:,.1f}"


def _mb(value: int | None) -> str:
    return MISSING if value is None else f"{value / 1e6:,.0f}"


def _ratio(value: float | None) -> str:
    return MISSING if value is None else f"{value:.2f}x"


# ---------------------------------------------------------------------- bench table
BENCH_ROWS = (
    ("requests", lambda r: str(r["num_requests"])),
    ("duration (s)", lambda r: f"{r['duration_s']:.2f}"),
    ("requests/s", lambda r: f"{r['requests_per_s']:.2f}"),
    ("output tokens/s", lambda r: _rate(r["output_tokens_per_s"])),
    ("total tokens/s", lambda r: _rate(r["total_tokens_per_s"])),
    ("TTFT median / p99 (ms)", lambda r: _ms(r.get("ttft_s"))),
    ("TPOT median / p99 (ms)", lambda r: _ms(r.get("tpot_s"))),
    ("end-to-end median / p99 (ms)", lambda r: _ms(r.get("e2e_s"))),
    ("peak memory (MB)", lambda r: _mb(r.get("peak_memory_bytes"))),
    ("KV cache usage, peak", lambda r: MISSING if "kv_cache_usage_peak" not in r else f"{100 * r['kv_cache_usage_peak']:.1f}%"),
    ("mean batch / context (tokens)", lambda r: MISSING if "mean_batch" not in r
     else f"{r['mean_batch']:.1f} / {r['mean_context']:.0f}"),
    ("decode bandwidth limit (tokens/s)", lambda r: MISSING if "bandwidth" not in r
     else _rate(r["bandwidth"]["limit_tokens_per_s"])),
    ("output tokens/s vs baseline", lambda r: _ratio((r.get("vs_baseline") or {}).get("output_tokens_per_s"))),
)


def render_bench(payload: dict, console=None):
    """Print the bench table (one column per concurrency point, then the baseline); return it."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="quantkit bench", caption=_bench_caption(payload), caption_justify="left")
    table.add_column("metric")
    for run in payload["runs"]:
        cap = run["max_concurrency"]
        table.add_column("engine" + ("" if cap is None else f", concurrency {cap}"), justify="right")
    baseline = payload.get("baseline")
    if baseline:
        table.add_column(f"transformers, batch {baseline['batch_size']}", justify="right")
    for label, cell in BENCH_ROWS:
        row = [cell(run) for run in payload["runs"]]
        if baseline:
            row.append(cell(baseline))
        table.add_row(label, *row)
    (console or Console()).print(table)
    return table


def _bench_caption(payload: dict) -> str:
    bandwidth = payload.get("device_bandwidth_bytes_per_s")
    lines = [setup_text(payload["setup"]), workload_text(payload["workload"]), bandwidth_text(bandwidth),
             "bandwidth limit: decode-only bound at the run's mean batch and context (weights + KV read per step)"]
    baseline = payload.get("baseline")
    if baseline and baseline["num_requests"] != payload["runs"][0]["num_requests"]:
        lines.append(f"baseline ran the first {baseline['num_requests']} requests of the workload; "
                     "ratios compare output tokens/s")
    return "\n".join(lines)


# ---------------------------------------------------------------------- latency table
LATENCY_ROWS = (  # label, cell, key of the speed-up (None: no speed-up for this row)
    ("TTFT median / p99 (ms)", lambda r: _ms(r["ttft_s"]), "ttft"),
    ("TPOT median / p99 (ms)", lambda r: _ms(r["tpot_s"]), "tpot"),
    ("end-to-end median / p99 (ms)", lambda r: _ms(r["e2e_s"]), "e2e"),
    ("decode tokens/s (1 / median TPOT)", lambda r: _rate(r["decode_tokens_per_s"]), "decode_tokens_per_s"),
    ("decode bandwidth limit (tokens/s)", lambda r: _rate(r["bandwidth"]["limit_tokens_per_s"]), None),
    ("end-to-end tokens/s", lambda r: _rate(r["e2e_tokens_per_s"]), None),
)


def render_latency(payload: dict, baseline: dict | None = None, speedup: dict | None = None, console=None):
    """Print the single-request latency table (and the baseline with speed-ups); return it."""
    from rich.console import Console
    from rich.table import Table

    caption = [setup_text(payload["setup"]),
               (f"batch 1, prompt {payload['input_len']} tokens, {payload['output_len']} output tokens (greedy), "
                f"{payload['repetitions']} repetitions after {payload['warmup']} warm-up"),
               bandwidth_text(payload["bandwidth"]["device_bandwidth_bytes_per_s"])
               + f"; bytes per decode step {payload['bandwidth']['bytes_per_step'] / 1e6:,.1f} MB"]
    if baseline is not None:
        caption.append("baseline: " + setup_text(baseline["setup"]))
    table = Table(title="quantkit eval --latency", caption="\n".join(caption), caption_justify="left")
    table.add_column("metric")
    if baseline is not None:
        table.add_column(f"{baseline['setup']['model']} (baseline)", justify="right")
    table.add_column(payload["setup"]["model"], justify="right")
    if baseline is not None:
        table.add_column("speed-up", justify="right")
    for label, cell, key in LATENCY_ROWS:
        row = [cell(payload)]
        if baseline is not None:
            row = [cell(baseline), *row, _ratio(speedup.get(key)) if key else MISSING]
        table.add_row(label, *row)
    (console or Console()).print(table)
    return table


# ---------------------------------------------------------------------- plot
def check_plot_available() -> None:
    """Fail before any work when ``--plot`` cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise QuantkitError("--plot needs matplotlib, which is not installed: pip install 'quantkit[plot]'") from error


def plot_concurrency(payload: dict, path: str | Path) -> None:
    """Output tokens/s and median TPOT against concurrency, the baseline as a dashed line."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = payload["runs"]
    caps = [run["max_concurrency"] or run["num_requests"] for run in runs]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 7), sharex=True)
    top.plot(caps, [run["output_tokens_per_s"] for run in runs], "o-", label="quantkit engine")
    if payload.get("baseline"):
        base = payload["baseline"]
        top.axhline(base["output_tokens_per_s"], linestyle="--", color="gray",
                    label=f"transformers generate, batch {base['batch_size']}")
    top.set_ylabel("output tokens/s")
    top.legend()
    bottom.plot(caps, [1e3 * run["tpot_s"]["median"] if run.get("tpot_s") else float("nan") for run in runs], "o-")
    bottom.set_ylabel("median TPOT (ms)")
    bottom.set_xlabel("max concurrency (requests in flight)")
    for axis in (top, bottom):
        axis.set_xscale("log", base=2)
        axis.set_xticks(caps, [str(c) for c in caps])
        axis.grid(True, alpha=0.3)
    setup = payload["setup"]
    fig.suptitle(f"{setup['model']} on {setup['device_name']}, weights {setup['weights']}, "
                 f"{setup['compute_dtype']}\n{workload_text(payload['workload'])}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
