"""Quantize quantkit's bundled target with llm-compressor and GPTQModel; evaluate as quantkit does.

Run it with the peers virtualenv (make it with scripts/peers/setup_peers_env.sh):

    .venv-peers/bin/python scripts/peers/run_peers.py            # default runs, 64 windows each
    .venv-peers/bin/python scripts/peers/run_peers.py --quick    # 8 windows: a quick try
    .venv-peers/bin/python scripts/peers/run_peers.py --full --only lc-gptq-w4g128
    .venv-peers/bin/python scripts/peers/run_peers.py --list

Each run is its own child process, so its peak RSS is its own and no peer's global state leaks into
the next run. Both peers calibrate on the same tokens (quantkit.data.calibration_samples(tokenizer,
"wikipedia", num_samples=128, seq_len=512, seed=0)) and are scored with quantkit's perplexity
(seq_len 512, the first --max-windows windows of each text). Checkpoints go under --out-root; the
results go to scripts/results/peers_accuracy.json (a --quick run writes beside the checkpoints
instead, so it never replaces real figures).

Torch runs with one thread by default: on a small shared machine, two OpenMP threads competing
with other processes made some ops (cholesky_inverse) ~30x slower, which buried the timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import peer_runs
from peer_runs import RunSpec

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "scripts" / "results" / "peers_accuracy.json"
DEFAULT_OUT_ROOT = Path("/tmp/peers-out")
DEFAULT_WINDOWS = 64
QUICK_WINDOWS = 8
PACKAGES = (
    "torch", "transformers", "llmcompressor", "compressed-tensors", "gptqmodel", "accelerate",
    "datasets", "numpy", "safetensors", "tokenizers", "quantkit",
)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child_main(args)
    elif args.list:
        for spec in peer_runs.RUNS:
            print(f"{spec.name:24} {'default' if spec.default else 'extra  '} {spec.note}")
    else:
        parent_main(args)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only these (repeatable); see --list")
    parser.add_argument("--all", action="store_true", help="also the runs not in the default set")
    parser.add_argument("--list", action="store_true", help="list the runs and exit")
    windows = parser.add_mutually_exclusive_group()
    windows.add_argument("--quick", action="store_true", help=f"{QUICK_WINDOWS} windows per text")
    windows.add_argument("--full", action="store_true", help="every window of each text")
    windows.add_argument("--max-windows", type=int, default=DEFAULT_WINDOWS,
                         help=f"windows per text (default {DEFAULT_WINDOWS})")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads (default 1)")
    parser.add_argument("--out-root", type=Path, default=DEFAULT_OUT_ROOT,
                        help="checkpoints and logs go under this folder")
    parser.add_argument("--results", type=Path, default=None, help="the JSON to write")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--record", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.windows = None if args.full else QUICK_WINDOWS if args.quick else args.max_windows
    if args.results is None:
        args.results = args.out_root / "peers_accuracy_quick.json" if args.quick else RESULTS
    return args


# ---------------------------------------------------------------- parent: one child per run


def parent_main(args: argparse.Namespace) -> None:
    specs = selected_runs(args)
    args.out_root.mkdir(parents=True, exist_ok=True)
    report = starting_report(args)
    for spec in specs:
        print(f"== {spec.name} ({spec.tool} {spec.method}) ...", flush=True)
        record = run_child(spec, args)
        merge_run(report, record)
        write_report(report, args.results)
        print(f"   {summary_line(record)}", flush=True)
    print()
    print(table(report["runs"]))
    print(LEGEND.format(windows="all" if args.windows is None else args.windows))
    print(f"wrote {args.results}")


def selected_runs(args: argparse.Namespace) -> list[RunSpec]:
    if args.only:
        return [peer_runs.run_named(name) for name in args.only]
    return list(peer_runs.RUNS) if args.all else peer_runs.default_runs()


def child_environment(threads: int) -> dict[str, str]:
    """What every child runs under: offline, `threads` OpenMP threads, no CUDA."""
    return {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        # GPTQModel 7.6.0 sizes its CPU pool as (cores + 1) // 2, then asks that pool for a 2-worker
        # loader: on 2 cores that is 1 < 2 and quantize() raises; 2 workers avoids it.
        "GPTQMODEL_CPU_WORKERS": str(max(2, threads)),
    }


def run_child(spec: RunSpec, args: argparse.Namespace) -> dict:
    record_path = args.out_root / f"{spec.name}.record.json"
    log_path = args.out_root / f"{spec.name}.log"
    record_path.unlink(missing_ok=True)
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", spec.name,
        "--record", str(record_path), "--out-root", str(args.out_root),
        "--threads", str(args.threads),
    ]
    command += ["--full"] if args.windows is None else ["--max-windows", str(args.windows)]
    start = time.perf_counter()
    with log_path.open("w") as log:
        finished = subprocess.run(
            # GPTQModel writes a logs/ folder into the working directory: keep it out of the repo
            command, check=False, cwd=args.out_root, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **child_environment(args.threads)},
        )
    total = round(time.perf_counter() - start, 2)
    if finished.returncode == 0 and record_path.exists():
        record = json.loads(record_path.read_text())
    else:
        record = {"spec": spec.to_dict(), "ok": False, "error": log_tail(log_path)}
    record.update(total_process_wall_s=total, log=str(log_path), command=command_line())
    return record


def log_tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def starting_report(args: argparse.Namespace) -> dict:
    """The report to add runs to: the existing file's when its settings match, else a new one."""
    settings = run_settings(args)
    if args.results.exists():
        existing = json.loads(args.results.read_text())
        if existing.get("settings") == settings:
            existing["commands"] = [*existing.get("commands", []), command_line()]
            existing["versions"] = package_versions()
            return existing
    return {
        "commands": [command_line()],
        "versions": package_versions(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "settings": settings,
        "runs": [],
    }


def run_settings(args: argparse.Namespace) -> dict:
    import peer_common as common

    return {
        "target": str(common.TARGET.relative_to(REPO)),
        "model_dtype": "float32 on CPU",
        "calibration": dict(common.CALIBRATION),
        "evaluation": {"datasets": list(common.EVAL_DATASETS), "seq_len": common.EVAL_SEQ_LEN,
                       "max_windows": args.windows, "protocol": "quantkit.eval.perplexity.perplexity"},
        "threads": args.threads,
        "child_environment": child_environment(args.threads),
    }


def command_line() -> str:
    return " ".join([sys.executable, *sys.argv])


def package_versions() -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def merge_run(report: dict, record: dict) -> None:
    name = record["spec"]["name"]
    report["runs"] = [run for run in report["runs"] if run["spec"]["name"] != name] + [record]
    order = [spec.name for spec in peer_runs.RUNS]
    report["runs"].sort(key=lambda run: order.index(run["spec"]["name"]))


def write_report(report: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


# ---------------------------------------------------------------- the table


COLUMNS = (
    ("run", 22), ("wikitext2", 9), ("wiki-held", 9), ("rt16 fp16/fp32", 15), ("quant s", 8), ("quant cpu", 9),
    ("job s", 7), ("total s", 7), ("peakMB", 7), ("ckptMB", 7), ("reload", 14),
)


LEGEND = """
wikitext2, wiki-held: perplexity, seq_len 512, first {windows} windows, float32 activations
rt16 fp16/fp32: WikiText-2, first 16 windows: GPTQModel's own runtime (float16, TorchLinear) /
        its dequantized weights in the float32 target (the figure the wikitext2 column uses)
quant s / quant cpu: wall / CPU seconds of the quantization call alone (oneshot, quantize)
job s: load + calibration samples + quantization + save; total s: the whole child process
peakMB: the child's peak RSS; ckptMB: checkpoint folder size
reload: llm-compressor: reloaded checkpoint vs in-memory model, max |logit diff|;
        GPTQModel: its float16 runtime vs the float32 dequantized copy, max |logit diff|
"""


def table(runs: list[dict]) -> str:
    header = " ".join(f"{title:>{width}}" for title, width in COLUMNS)
    rows = [header, "-" * len(header)]
    for run in runs:
        cells = table_cells(run)
        rows.append(" ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, COLUMNS)))
    return "\n".join(rows)


def table_cells(run: dict) -> list[str]:
    name = run["spec"]["name"]
    if not run.get("ok"):
        return [name, "FAILED", "", "", "", "", "", _num(run.get("total_process_wall_s")), "", "", ""]
    ppl = run["perplexity"]
    wall, cpu = run["phases"]["wall_s"], run["phases"]["cpu_s"]
    return [
        name,
        _num(ppl["wikitext2"]["perplexity"], 3),
        _num(ppl["wikipedia-heldout"]["perplexity"], 3),
        runtime_cell(run.get("peer_runtime")),
        _num(wall.get("quantize")),
        _num(cpu.get("quantize")),
        _num(run.get("quantize_job_wall_s")),
        _num(run.get("total_process_wall_s")),
        _num(run.get("peak_rss_mb_total"), 0),
        _num(run.get("reload_check", {}).get("checkpoint_mb")),
        reload_cell(run.get("reload_check")),
    ]


def runtime_cell(runtime: dict | None) -> str:
    if not runtime:
        return "-"
    fp16, fp32 = (runtime[key]["perplexity"] for key in ("gptqmodel_float16", "dequantized_float32"))
    return f"{fp16:.2f}/{fp32:.2f}"


def reload_cell(check: dict | None) -> str:
    if not check:
        return "-"
    if check.get("ok") is False:
        return "FAILED"
    diff = check.get("max_abs_logit_diff", check.get("max_abs_logit_diff_runtime_fp16_vs_dequantized_fp32"))
    return "n/a" if diff is None else f"ok d={diff:.1e}"


def _num(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary_line(record: dict) -> str:
    if not record.get("ok"):
        return f"FAILED after {record['total_process_wall_s']} s; see {record['log']}"
    ppl = record["perplexity"]
    return (
        f"wikitext2 {ppl['wikitext2']['perplexity']:.3f}, "
        f"heldout {ppl['wikipedia-heldout']['perplexity']:.3f}, "
        f"quantize {record['phases']['wall_s'].get('quantize', 0):.1f} s, "
        f"total {record['total_process_wall_s']} s, peak {record['peak_rss_mb_total']} MB"
    )


# ---------------------------------------------------------------- child: one run


def child_main(args: argparse.Namespace) -> None:
    import peer_common as common
    import torch

    torch.set_num_threads(args.threads)
    spec = peer_runs.run_named(args.child)
    out_dir = args.out_root / spec.name
    shutil.rmtree(out_dir, ignore_errors=True)
    if spec.tool != "baseline":
        out_dir.mkdir(parents=True)
    phases = common.Phases()
    load_before = common.load_average()
    result = run_spec(spec, out_dir, args.windows, phases)
    job_phases = ("load", "calibration_samples", "quantize", "save")
    record = {
        "spec": spec.to_dict(),
        "ok": True,
        "checkpoint": str(out_dir) if spec.tool != "baseline" else None,
        **result,
        "phases": phases.to_dict(),
        "quantize_job_wall_s": round(sum(phases.wall_s.get(p, 0.0) for p in job_phases), 3),
        "peak_rss_mb_quantize": phases.peak_rss_mb_after.get("quantize"),
        "peak_rss_mb_total": common.peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
        "load_average_before_after": [load_before, common.load_average()],
    }
    args.record.write_text(json.dumps(record, indent=2) + "\n")


def run_spec(spec: RunSpec, out_dir: Path, windows: int | None, phases) -> dict:
    if spec.tool == "llmcompressor":
        import llmcompressor_peer

        return llmcompressor_peer.run(spec, out_dir, windows, phases)
    if spec.tool == "gptqmodel":
        import gptqmodel_peer

        return gptqmodel_peer.run(spec, out_dir, windows, phases)
    return run_baseline(windows, phases)


def run_baseline(windows: int | None, phases) -> dict:
    import peer_common as common

    with phases.measure("load"):
        tokenizer = common.load_tokenizer()
        model = common.load_float32_model()
    return {
        "evaluated": "the bundled target loaded with transformers in float32",
        "perplexity": common.evaluate(model, tokenizer, windows, phases),
    }


if __name__ == "__main__":
    main()
