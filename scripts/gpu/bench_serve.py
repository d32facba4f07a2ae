"""`quantkit serve` on a randomly initialised Llama-3-8B-shaped model on one GPU: the load
generator at several request rates, and the HTTP layer's overhead against the engine alone.

Speed does not depend on the weights' values, so the model is random (bf16, std 0.02), built on
the GPU and never written to disk (as ``bench_runtime.py`` does); it gets the bundled tokenizer so
the server can stream text. Prompts are random token ids below the tokenizer's size; the model's
128k vocabulary is larger than the tokenizer's, so most generated tokens decode to no text, and
the load generator asks for token log-probabilities (``--logprobs``) so every token is seen.

1. the engine alone: ``quantkit bench``'s offline loop on the workload, all requests at once;
2. the server: the same engine behind ``quantkit.server`` (uvicorn in this process, exactly as
   ``quantkit serve`` runs it), loaded with ``quantkit bench serve`` in a separate process at
   ``--rates``; the first rate (inf) replays exactly the engine-alone workload (same seed, same
   prompts token for token), the others get fresh prompts, so no run profits from another's
   prefix cache;
3. the overhead: 1 - (output tokens/s through HTTP at inf) / (output tokens/s of the engine alone).

Both sides are warmed up, untimed, before they are measured (``--no-warmup`` skips it), so neither
pays for Triton compiling (or loading from its disk cache) the kernel variants the workload's
shapes need, the allocator's growth or first-use library set-up while the clock runs: the engine
alone first serves the whole workload once with other prompts (the same lengths, so the same
batches and kernel variants; CUDA graphs are captured when the engine is built); the server
(with ``--engine-process``, a fresh child process that compiles and captures on its own) first
gets ``quantkit bench serve`` on another seed (fresh prompts, so the measured runs never hit the
prefix cache): the whole workload at inf, then a quarter of it at the fastest finite rate. ``bench_serve.json``'s ``warmup`` records what
ran and how long it took.

Everything goes to ``--out``: ``bench_serve.json`` (rewritten after every step, so a run cut
short keeps what it measured), ``serve_bench.json`` and ``serve_bench.png`` from the load
generator, ``metrics.txt`` (the server's Prometheus text at the end).

    python scripts/gpu/bench_serve.py --out out/gpu/serve [--model w4a16]    # on the GPU machine
    python scripts/gpu/bench_serve.py --tiny --out /tmp/serve-tiny            # a small shape on the CPU
    python scripts/gpu/bench_serve.py --engine-process --out out/gpu/serve    # the engine in its own process
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import LLAMA3_8B, TINY, quantize_w4a16_in_place, random_model

from quantkit.eval.latency import (
    close_engine,
    engine_setup,
    make_clock,
    open_engine,
    token_id_limit,
)
from quantkit.eval.throughput import (
    BenchConfig,
    engine_runs,
    make_workload,
    parse_len_range,
    run_workload,
)

FULL = {"num_requests": 128, "input_len_range": "128,1024", "output_len_range": "64,256", "rates": "inf,2,4,8,16"}
SMALL = {"num_requests": 12, "input_len_range": "8,32", "output_len_range": "4,12", "rates": "inf,20"}
SERVED_NAME = "llama-3-8b-shape"


def loaded_model(model, label: str):
    """The in-memory model as the loader would hand it over, with the bundled tokenizer."""
    from transformers import AutoTokenizer

    from quantkit.models.adapters.registry import get_adapter
    from quantkit.models.bundled import BUNDLED_MODELS
    from quantkit.models.loading import LoadedModel

    tokenizer = AutoTokenizer.from_pretrained(str(BUNDLED_MODELS["quantkit-target"]))
    return LoadedModel(model, tokenizer, label, get_adapter(model.config), None)


def engine_options(args) -> dict:
    return {"device": args.device, "kv_cache_tokens": args.kv_cache_tokens, "max_num_seqs": args.max_num_seqs,
            "gpu_memory_utilization": args.gpu_memory_utilization}


def bench_config(args) -> BenchConfig:
    return BenchConfig(num_requests=args.num_requests, seed=args.seed,
                       input_len_range=parse_len_range(args.input_len_range, "--input-len-range"),
                       output_len_range=parse_len_range(args.output_len_range, "--output-len-range")).check()


WARMUP_VARIANT = 1000  # prompt tokens of the engine-alone warm-up: (seed, 1000); the timed run's are (seed, 1)
WARMUP_SEED_OFFSET = 1  # the server's warm-up load: seed + 1 (other lengths and prompts)


def engine_alone(loaded, args) -> dict:
    engine = open_engine(loaded, **engine_options(args))
    warmup = None
    try:
        setup = engine_setup(engine, loaded.path, args.device)
        config = bench_config(args)
        if not args.no_warmup:  # the whole workload once, untimed: same lengths, other prompts
            workload = make_workload(config, token_id_limit(engine), variant=WARMUP_VARIANT)
            started = time.perf_counter()
            run = run_workload(engine, workload, None, make_clock(args.device, engine))
            warmup = {"what": f"the workload's {len(workload)} requests once (same lengths, prompt tokens from "
                              f"(seed, {WARMUP_VARIANT})), all at once, untimed",
                      "seconds": time.perf_counter() - started, "output_tokens_per_s": run["output_tokens_per_s"]}
        runs, _ = engine_runs(engine, config, args.device, None, progress=False)
    finally:
        close_engine(engine)
    return {"setup": setup, "run": runs[0], "warmup": warmup}


def warm_up_server(server, args) -> dict:
    """Untimed load on the server before the measured runs, on another seed (so no measured prompt
    is cached): ``quantkit bench serve`` with the whole workload at inf, then a quarter of it at
    the fastest finite rate of the sweep (small batches: single prefills among decodes)."""
    finite = [float(r) for r in args.rates.split(",") if not r.strip().lower().startswith("inf")]
    seed = args.seed + WARMUP_SEED_OFFSET
    plan = [("inf", args.num_requests)] + ([(f"{max(finite):g}", max(1, args.num_requests // 4))] if finite else [])
    done, started = [], time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-serve-warmup-") as scratch:
        for rate, count in plan:
            target = Path(scratch) / "warmup.json"
            command = [sys.executable, "-m", "quantkit", "bench", "serve", server.base, "--num-requests", str(count),
                       "--input-len-range", args.input_len_range, "--output-len-range", args.output_len_range,
                       "--seed", str(seed), "--request-rate", rate, "--logprobs", "--json", str(target)]
            subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
            run = json.loads(target.read_text())["runs"][0]
            done.append({"request_rate": run["request_rate"], "num_requests": count, "failed": run["failed"],
                         "output_tokens_per_s": run["output_tokens_per_s"], "ttft_median_s": run["ttft_s"]["median"]})
    return {"what": "quantkit bench serve, untimed, seed " + str(seed) + ": "
                    + ", ".join(f"{count} requests at {rate} req/s" for rate, count in plan),
            "seconds": time.perf_counter() - started, "runs": done}


def build_model(shape: dict, device: str, kind: str):
    """The random model of the run (float32 on the CPU, as ``load_model(dtype="auto")`` gives)."""
    model = random_model(shape, device)
    if device == "cpu":
        model = model.float()
    if kind == "w4a16":
        quantize_w4a16_in_place(model)
    return loaded_model(model, f"random Llama-3-8B-shape {kind}")


def engine_in_process(shape: dict, device: str, kind: str, options: dict, threads: int | None):
    """The engine process's loader (``--engine-process``): the same random model, built there."""
    from quantkit.runtime.engine import Engine

    if threads is not None:
        torch.set_num_threads(threads)
    return Engine(build_model(shape, device, kind), **options)


class InProcessServer:
    """The server ``quantkit serve`` runs, on a free port of 127.0.0.1, in a background thread;
    with ``--engine-process`` its engine runs in a child process (``quantkit serve
    --engine-process``), which builds the same random model itself."""

    def __init__(self, loaded, args, shape: dict | None = None) -> None:
        import functools

        import uvicorn

        from quantkit.runtime.engine import Engine
        from quantkit.server.app import build_app
        from quantkit.server.async_engine import AsyncEngine
        from quantkit.server.generation import ServerContext
        from quantkit.server.settings import ServerSettings

        if args.engine_process:
            from quantkit.server.engine_process import ProcessEngine

            threads = torch.get_num_threads() if args.device == "cpu" else None
            self.engine = ProcessEngine(functools.partial(engine_in_process, shape, args.device, args.model,
                                                          engine_options(args), threads))
        else:
            self.engine = AsyncEngine(lambda: Engine(loaded, **engine_options(args)))
        settings = ServerSettings(served_names=[SERVED_NAME], max_num_seqs=args.max_num_seqs,
                                  max_queue=max(512, args.num_requests))
        app = build_app(ServerContext(self.engine, settings), manage_engine=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + args.load_timeout
        while time.monotonic() < deadline:
            if self.server.started and self.engine.wait_loaded(0.5):
                break
            time.sleep(0.1)
        if not self.engine.ready:
            raise SystemExit(f"the server's engine is not ready: {self.engine.state} {self.engine.problem or ''}")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(120)


def save(results: dict, out: Path) -> None:
    (out / "bench_serve.json").write_text(json.dumps(results, indent=2) + "\n")


def summary(results: dict) -> list[str]:
    lines = []
    alone = (results.get("engine_alone") or {}).get("run")
    if alone:
        lines.append(f"engine alone: {alone['requests_per_s']:.2f} req/s, {alone['output_tokens_per_s']:.0f} output "
                     f"tokens/s, TTFT median {1e3 * alone['ttft_s']['median']:.0f} ms, TPOT median "
                     f"{1e3 * alone['tpot_s']['median']:.1f} ms")
    for run_ in (results.get("serve") or {}).get("runs", []):
        rate = "inf" if run_["request_rate"] is None else f"{run_['request_rate']:g}/s"
        lines.append(f"HTTP at {rate}: {run_['requests_per_s']:.2f} req/s, {run_['output_tokens_per_s']:.0f} output "
                     f"tokens/s, TTFT p50/p99 {1e3 * run_['ttft_s']['median']:.0f}/{1e3 * run_['ttft_s']['p99']:.0f} ms, "
                     f"TPOT p50/p99 {1e3 * run_['tpot_s']['median']:.1f}/{1e3 * run_['tpot_s']['p99']:.1f} ms, "
                     f"failed {run_['failed']}")
    warmup = results.get("warmup") or {}
    if warmup:
        done = [f"{k} {v['seconds']:.0f} s" for k, v in warmup.items() if v]
        lines.append("untimed warm-ups: " + (", ".join(done) if done else "none"))
    overhead = results.get("http_overhead")
    if overhead:
        lines.append(f"HTTP overhead at saturation: {100 * overhead['throughput_loss']:.1f}% of output tokens/s "
                     f"({overhead['served_output_tokens_per_s']:.0f} vs {overhead['engine_output_tokens_per_s']:.0f})")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the results")
    ap.add_argument("--tiny", action="store_true", help="a small shape on the CPU (checks the script)")
    ap.add_argument("--model", choices=["bf16", "w4a16"], default="bf16",
                    help="dense bf16, or W4A16 g128 RTN of it (quantized in place)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--num-requests", type=int)
    ap.add_argument("--input-len-range")
    ap.add_argument("--output-len-range")
    ap.add_argument("--rates", help="request rates of the sweep; the first must be inf (the overhead baseline)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--load-timeout", type=float, default=600.0)
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip the untimed warm-ups of the engine alone and of the server (not comparable)")
    ap.add_argument("--engine-process", action="store_true",
                    help="run the server's engine in its own process (quantkit serve --engine-process)")
    args = ap.parse_args()
    for key, value in (SMALL if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not args.rates.split(",")[0].strip().lower().startswith("inf"):
        raise SystemExit("--rates must start with inf: that run is compared with the engine alone")
    args.device = "cpu" if args.tiny else "cuda"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shape = dict(TINY if args.tiny else LLAMA3_8B)
    shape["num_hidden_layers"] = args.layers or shape["num_hidden_layers"]
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
               "model": f"{'tiny' if args.tiny else 'Llama-3-8B'} shape, random weights, {args.model}", "shape": shape,
               "workload": {k: getattr(args, k) for k in ("num_requests", "input_len_range", "output_len_range",
                                                          "rates", "seed", "max_num_seqs")},
               "server_engine": "engine process" if args.engine_process else "engine thread",
               "sampling": "greedy, end-of-sequence ignored; the HTTP runs stream with token log-probabilities"}
    started = time.perf_counter()
    if args.device == "cpu":
        from quantkit.server.launch import default_cpu_threads

        torch.set_num_threads(default_cpu_threads())  # as `quantkit serve` runs a CPU engine
    loaded = build_model(shape, args.device, args.model)
    results["build_seconds"] = time.perf_counter() - started
    save(results, out)

    results["engine_alone"] = engine_alone(loaded, args)
    results["warmup"] = {"engine_alone": results["engine_alone"].pop("warmup"), "server": None}
    save(results, out)
    print("\n".join(summary(results)), flush=True)

    if args.engine_process:  # the engine process builds its own copy: free this one first
        if args.kv_cache_tokens is None:  # and give it the KV cache the engine alone had
            args.kv_cache_tokens = results["engine_alone"]["setup"]["kv_cache_tokens"]
        loaded = None
        if args.device == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()
    server = InProcessServer(loaded, args, shape)
    try:
        if not args.no_warmup:
            print("warming up the server (untimed)", flush=True)
            results["warmup"]["server"] = warm_up_server(server, args)
            save(results, out)
        command = [sys.executable, "-m", "quantkit", "bench", "serve", server.base, "--num-requests",
                   str(args.num_requests), "--input-len-range", args.input_len_range, "--output-len-range",
                   args.output_len_range, "--seed", str(args.seed), "--request-rate", args.rates, "--logprobs",
                   "--json", str(out / "serve_bench.json")]
        if importlib.util.find_spec("matplotlib") is not None:
            command += ["--plot", str(out / "serve_bench.png")]
        results["load_generator_command"] = " ".join(command[1:])
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        results["serve"] = json.loads((out / "serve_bench.json").read_text())
        (out / "metrics.txt").write_text(httpx.get(server.base + "/metrics", timeout=30).text)
    finally:
        server.stop()
    saturated = results["serve"]["runs"][0]
    if saturated["failed"] == 0:
        engine_tps = results["engine_alone"]["run"]["output_tokens_per_s"]
        results["http_overhead"] = {
            "engine_output_tokens_per_s": engine_tps, "served_output_tokens_per_s": saturated["output_tokens_per_s"],
            "throughput_loss": 1 - saturated["output_tokens_per_s"] / engine_tps,
            "note": "same engine, model and workload (seed, prompts, lengths), all requests at once"}
    results["summary"] = summary(results)
    save(results, out)
    print("\n".join(results["summary"]))


if __name__ == "__main__":
    main()
