"""The CPU serving figures of the README: `quantkit serve` on the bundled target, the load
generator at several request rates, and the HTTP layer's overhead against the engine alone.

A ``quantkit serve`` process stays up throughout (no restarts). The overhead is measured in
pairs, back to back, on one workload (all requests at once): the engine alone (``quantkit
bench``'s loop, ``run_workload``, on an engine in this process), then ``quantkit bench serve`` at
inf on the same seed (the same prompts token for token, the same lengths). Each pair has its own
seed, so the server's prefix cache never holds a prompt it is measured on. Two ratios per pair:

- throughput: output tokens/s through HTTP over output tokens/s of the engine alone;
- CPU: CPU seconds the server process spent on the run (``/proc/PID/stat``, all its threads), and
  of them its HTTP thread's (the main thread: uvicorn's event loop), against the engine alone's
  (``time.process_time``) on the same workload. On a small machine the load generator shares the
  cores with the server, so its CPU is reported too.

Then the rate sweep on fresh prompts. Both sides run the engine with the same number of torch
threads: ``quantkit serve``'s default on the CPU, all cores but one.

    python scripts/bench_serve_cpu.py --out scripts/results/serve_cpu
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import json
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from quantkit.server.launch import default_cpu_threads

TICKS = os.sysconf("SC_CLK_TCK")


def quantkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "quantkit", *args]


def process_cpu(pid: int, tid: int | None = None) -> float:
    """User + system CPU seconds of a process (all its threads), or of its thread ``tid``."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def start_server(args, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = quantkit("serve", "--port", "0", "--kv-cache-tokens", str(args.kv_cache_tokens), "--log-level", "warning")
    print("$", " ".join(cmd[1:]), flush=True)
    with open(log, "w") as sink:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sink)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = re.search(r"(http://127\.0\.0\.1:\d+)/v1", log.read_text())
        if found:
            try:
                if httpx.get(found.group(1) + "/health", timeout=5).status_code == 200:
                    return process, found.group(1)
            except httpx.TransportError:
                pass
        if process.poll() is not None:
            raise SystemExit(f"the server exited; see {log}")
        time.sleep(0.2)
    process.kill()
    raise SystemExit("the server did not become ready")


def serve_bench(cmd: list[str], server_pid: int) -> tuple[float, float, float]:
    """Run the load generator; the CPU seconds it took: the server's, its HTTP thread's, the
    load generator's."""
    print("$", " ".join(cmd[1:]), flush=True)
    before = process_cpu(server_pid), process_cpu(server_pid, server_pid), children_cpu()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    after = process_cpu(server_pid), process_cpu(server_pid, server_pid), children_cpu()
    return tuple(b - a for a, b in zip(before, after))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len-range", default="32,128")
    ap.add_argument("--output-len-range", default="32,64")
    ap.add_argument("--rates", default="1,2,4,8")
    ap.add_argument("--kv-cache-tokens", type=int, default=32768)
    args = ap.parse_args()

    import torch

    from quantkit.eval.latency import make_clock, open_engine, token_id_limit
    from quantkit.eval.throughput import (
        BenchConfig,
        make_workload,
        parse_len_range,
        run_workload,
        warm_up,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workload_args = ["--num-requests", str(args.num_requests), "--input-len-range", args.input_len_range,
                     "--output-len-range", args.output_len_range]
    results = {"device": "cpu", "cpus": os.cpu_count(), "model": "quantkit-target (float32 on the CPU)",
               "workload": {"num_requests": args.num_requests, "input_len_range": args.input_len_range,
                            "output_len_range": args.output_len_range, "rates": args.rates,
                            "arrivals": "all at once for the pairs"},
               "torch_threads": default_cpu_threads(), "kv_cache_tokens": args.kv_cache_tokens,
               "server_command": f"quantkit serve --kv-cache-tokens {args.kv_cache_tokens}", "pairs": [],
               "commands": []}
    torch.set_num_threads(default_cpu_threads())  # as the server's engine runs
    engine = open_engine(None, kv_cache_tokens=args.kv_cache_tokens)
    limit = token_id_limit(engine)
    server, base = start_server(args, out / "server.log")
    try:
        for repeat in range(args.repeats):
            config = BenchConfig(num_requests=args.num_requests, seed=repeat,
                                 input_len_range=parse_len_range(args.input_len_range, "--input-len-range"),
                                 output_len_range=parse_len_range(args.output_len_range, "--output-len-range"))
            if repeat == 0:
                warm_up(engine, config, limit)
            workload = make_workload(config, limit, None, variant=1)  # what `quantkit bench` runs first
            cpu = time.process_time()
            alone = run_workload(engine, workload, None, make_clock("cpu"))
            alone_cpu = time.process_time() - cpu
            load_alone = os.getloadavg()[0]
            serve_json = out / f"serve_inf_seed{repeat}.json"
            cmd = quantkit("bench", "serve", base, *workload_args, "--seed", str(repeat), "--request-rate", "inf",
                           "--json", str(serve_json))
            server_cpu, http_cpu, client_cpu = serve_bench(cmd, server.pid)
            served = json.loads(serve_json.read_text())["runs"][0]
            pair = {"seed": repeat, "output_tokens": alone["output_tokens"],
                    "engine_output_tokens_per_s": alone["output_tokens_per_s"],
                    "served_output_tokens_per_s": served["output_tokens_per_s"],
                    "engine_requests_per_s": alone["requests_per_s"], "served_requests_per_s": served["requests_per_s"],
                    "served_failed": served["failed"], "served_output_tokens": served["output_tokens"],
                    "engine_cpu_s": alone_cpu, "server_cpu_s": server_cpu, "server_http_thread_cpu_s": http_cpu,
                    "load_generator_cpu_s": client_cpu,
                    "loadavg_after": [load_alone, os.getloadavg()[0]],
                    "engine_ttft_median_s": alone["ttft_s"]["median"], "served_ttft_median_s": served["ttft_s"]["median"],
                    "engine_tpot_median_s": alone["tpot_s"]["median"], "served_tpot_median_s": served["tpot_s"]["median"]}
            pair["throughput_loss"] = 1 - pair["served_output_tokens_per_s"] / pair["engine_output_tokens_per_s"]
            pair["cpu_overhead"] = server_cpu / alone_cpu - 1
            results["pairs"].append(pair)
            results["commands"].append(" ".join(cmd[1:]))
            print(f"pair {repeat}: engine {pair['engine_output_tokens_per_s']:.1f} tok/s ({alone_cpu:.1f} CPU s), "
                  f"HTTP {pair['served_output_tokens_per_s']:.1f} tok/s ({server_cpu:.1f} CPU s, HTTP thread "
                  f"{http_cpu:.2f}, load generator {client_cpu:.1f}), throughput loss {100 * pair['throughput_loss']:.1f}%, CPU overhead "
                  f"{100 * pair['cpu_overhead']:.1f}%, load {pair['loadavg_after'][0]:.1f}/{pair['loadavg_after'][1]:.1f}",
                  flush=True)
            (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
        results["median_throughput_loss"] = statistics.median(p["throughput_loss"] for p in results["pairs"])
        results["median_cpu_overhead"] = statistics.median(p["cpu_overhead"] for p in results["pairs"])
        del engine  # the sweep needs no engine here
        sweep_json = out / "serve_sweep.json"
        cmd = quantkit("bench", "serve", base, *workload_args, "--seed", "100", "--request-rate", args.rates,
                       "--json", str(sweep_json), "--plot", str(out / "serve_sweep.png"))
        results["commands"].append(" ".join(cmd[1:]))
        cpu = serve_bench(cmd, server.pid)
        results["sweep_server_cpu_s"], results["sweep_http_thread_cpu_s"], results["sweep_load_generator_cpu_s"] = cpu
        results["sweep_loadavg_after"] = os.getloadavg()[0]
        results["sweep"] = json.loads(sweep_json.read_text())["runs"]
    finally:
        server.terminate()
        server.wait(60)
    (out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"median over {args.repeats} pairs: throughput loss {100 * results['median_throughput_loss']:.1f}%, "
          f"CPU overhead {100 * results['median_cpu_overhead']:.1f}%")


if __name__ == "__main__":
    main()
