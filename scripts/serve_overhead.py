"""The HTTP layer's host cost, measured on the CPU: the real server (``quantkit.server``: FastAPI,
uvicorn, ``AsyncEngine``) in front of a ``SyntheticEngine`` whose step costs a fixed, known amount,
loaded by ``quantkit bench serve`` in a separate process.

``SyntheticEngine`` is a stand-in used only by this harness: it has the runtime ``Engine``'s
interface (``add_request``, ``step``, ``abort``, ``has_unfinished``, a scheduler and a block
manager the server reads), admits up to ``max_num_seqs`` requests and gives every running one
token per step, with real token ids and text of the bundled tokenizer and a log-probability. A
step models a GPU step: ``--host-ms`` of Python work holding the GIL, split into ``--ops`` pieces
each followed by a GIL release (as torch ops release it), then ``--device-ms`` waiting with the GIL
released (the device computing; ``.tolist()`` blocking).

Reported, per run (``--repeats`` alternating pairs, medians):

* engine alone: the same workload driven by a plain loop over ``step()``; output tokens/s and
  step time;
* served: output tokens/s, TTFT and TPOT medians at request rate inf, step time (how much the
  server slows the engine loop; with ``--engine-process`` the engine process's CPU seconds
  instead), and the server's host CPU per streamed token: the process's CPU time minus what the
  synthetic steps themselves used, over the output tokens (everything the server does: the
  engine thread's bookkeeping and hand-offs, SSE chunks, JSON, detokenization, uvicorn writes);
* the overhead: 1 - served tokens/s / engine-alone tokens/s, as ``scripts/gpu/bench_serve.py``.

    PYTHONPATH=. python scripts/serve_overhead.py --out /tmp/serve-overhead [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

from quantkit.runtime.outputs import CompletionOutput, RequestOutput

SERVED_NAME = "synthetic"
TEXT = ("The quick brown fox jumps over the lazy dog while the server streams tokens to many clients at once. "
        "Every chunk carries a little text, a log-probability and the usual OpenAI fields, and the engine keeps "
        "stepping in the background, one token per running request per step, until each request is done. ") * 4


class _Seq:
    def __init__(self, request_id: str) -> None:
        self.request_id = request_id


class _Live:
    __slots__ = ("arrival", "logprobs", "offset", "params", "request_id", "seqs", "text", "tokens")

    def __init__(self, request_id, params, offset, arrival) -> None:
        self.request_id, self.params, self.offset, self.arrival = request_id, params, offset, arrival
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.text = ""
        self.seqs = [_Seq(request_id)]


class SyntheticEngine:
    """A stand-in for ``quantkit.runtime.engine.Engine`` with a fixed step cost (this harness only)."""

    def __init__(self, tokenizer, *, max_num_seqs: int = 256, host_ms: float = 6.0, ops: int = 100,
                 device_ms: float = 14.0, max_model_len: int = 4096, vocab_size: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.stream = tokenizer.encode(TEXT, add_special_tokens=False)
        self.pieces = [tokenizer.decode([t]) for t in self.stream]
        self.max_num_seqs = max_num_seqs
        self.host_s, self.ops, self.device_s = host_ms / 1e3, max(1, ops), device_ms / 1e3
        vocab = vocab_size or len(tokenizer)
        self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))
        self.block_manager = SimpleNamespace(usage=0.0, num_blocks=1024, num_free_blocks=1024,
                                             prefix_cache_hit_rate=0.0, prefix_cache_queries=0, prefix_cache_hits=0)
        self._waiting: list[_Live] = []
        self._running: dict[str, _Live] = {}
        self.scheduler = SimpleNamespace(max_model_len=max_model_len, running=[], num_preemptions=0,
                                         update=lambda _: None)
        # what the harness reads
        self.steps = 0
        self.step_cpu = 0.0  # thread CPU inside step()
        self.step_starts: list[float] = []
        self.thread_cpu_first: float | None = None  # engine thread CPU at the first and last step
        self.thread_cpu_last = 0.0
        self.tokens_out = 0

    def reset_counters(self) -> None:
        self.steps, self.step_cpu, self.step_starts = 0, 0.0, []
        self.thread_cpu_first, self.thread_cpu_last, self.tokens_out = None, 0.0, 0

    # ------------------------------------------------------------------ Engine's interface
    def add_request(self, prompt_ids, params, request_id=None):
        live = _Live(request_id, params, len(prompt_ids) % len(self.stream), time.perf_counter())
        self._waiting.append(live)
        return request_id

    def abort(self, request_id: str) -> None:
        self._running.pop(request_id, None)
        self._waiting = [w for w in self._waiting if w.request_id != request_id]
        self._sync()

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    def step(self) -> list[RequestOutput]:
        cpu0 = time.thread_time()
        if self.thread_cpu_first is None:
            self.thread_cpu_first = cpu0
        self.step_starts.append(time.perf_counter())
        while self._waiting and len(self._running) < self.max_num_seqs:
            live = self._waiting.pop(0)
            self._running[live.request_id] = live
        self._sync()
        # the host part: Python work holding the GIL, released between "ops"
        piece = self.host_s / self.ops
        for _ in range(self.ops):
            end = time.thread_time() + piece
            while time.thread_time() < end:
                pass
            time.sleep(0)  # a torch op releasing and re-taking the GIL
        time.sleep(self.device_s)  # the device computing, the GIL released
        outputs = []
        stream, pieces = self.stream, self.pieces
        for live in list(self._running.values()):
            position = (live.offset + len(live.tokens)) % len(stream)
            live.tokens.append(stream[position])
            live.logprobs.append(-0.25 - 0.01 * (position % 7))
            live.text += pieces[position]
            done = len(live.tokens) >= live.params.max_tokens
            outputs.append(RequestOutput(live.request_id, [], [CompletionOutput(
                0, list(live.tokens), live.text, "length" if done else None,
                list(live.logprobs) if live.params.logprobs else None)], done, live.arrival))
            if done:
                del self._running[live.request_id]
        self.tokens_out += len(outputs)
        self.steps += 1
        self._sync()
        cpu1 = time.thread_time()
        self.step_cpu += cpu1 - cpu0
        self.thread_cpu_last = cpu1
        return outputs

    def _sync(self) -> None:
        self.scheduler.running = [live.seqs[0] for live in self._running.values()]


def step_time(engine: SyntheticEngine) -> float:
    gaps = [b - a for a, b in zip(engine.step_starts, engine.step_starts[1:])]
    return statistics.median(gaps) if gaps else float("nan")


def workload(args) -> list[tuple[list[int], int]]:
    from quantkit.eval.serve_bench import ServeBenchConfig, build_requests

    lo, hi = (int(x) for x in args.input_len_range.split(","))
    olo, ohi = (int(x) for x in args.output_len_range.split(","))
    config = ServeBenchConfig(url="http://x", num_requests=args.num_requests, input_len_range=(lo, hi),
                              output_len_range=(olo, ohi), seed=args.seed, request_rates=[float("inf")])
    return [(r.prompt, r.output_len) for r in build_requests(config, 8000, variant=1)]


def engine_alone(engine: SyntheticEngine, args) -> dict:
    from quantkit.runtime.sampling_params import SamplingParams

    engine.reset_counters()
    started = time.perf_counter()
    for index, (prompt, out_len) in enumerate(workload(args)):
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True, logprobs=True),
                           request_id=f"alone-{index}")
    tokens = 0
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                tokens += len(output.outputs[0].token_ids)
    duration = time.perf_counter() - started
    return {"output_tokens": tokens, "duration_s": duration, "output_tokens_per_s": tokens / duration,
            "steps": engine.steps, "step_ms": 1e3 * step_time(engine)}


def synthetic_in_process(max_num_seqs: int, host_ms: float, ops: int, device_ms: float) -> SyntheticEngine:
    """The engine process's loader (``--engine-process``)."""
    from transformers import AutoTokenizer

    from quantkit.models.bundled import BUNDLED_MODELS

    tokenizer = AutoTokenizer.from_pretrained(str(BUNDLED_MODELS["quantkit-target"]))
    return SyntheticEngine(tokenizer, max_num_seqs=max_num_seqs, host_ms=host_ms, ops=ops, device_ms=device_ms)


class Server:
    def __init__(self, engine: SyntheticEngine, args) -> None:
        import uvicorn

        from quantkit.server.app import build_app
        from quantkit.server.async_engine import AsyncEngine
        from quantkit.server.generation import ServerContext
        from quantkit.server.settings import ServerSettings

        self.profiles = {}

        def loader():  # runs on the engine thread
            if args.profile:
                self.profiles["engine_thread"] = _profiler()
            return engine

        def run_server():
            if args.profile:
                self.profiles["http_thread"] = _profiler()
            self.server.run(sockets=[self.sock])

        if args.engine_process:
            import functools

            from quantkit.server.engine_process import ProcessEngine

            self.engine = ProcessEngine(functools.partial(synthetic_in_process, args.max_num_seqs, args.host_ms,
                                                          args.ops, args.device_ms))
        else:
            self.engine = AsyncEngine(loader)
        settings = ServerSettings(served_names=[SERVED_NAME], max_num_seqs=args.max_num_seqs, max_queue=1024)
        app = build_app(ServerContext(self.engine, settings), manage_engine=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=run_server, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not (self.server.started and self.engine.ready):
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def _profiler():
    import cProfile

    profile = cProfile.Profile()
    profile.enable()  # this thread, from now on
    return profile


def served(server: Server, engine: SyntheticEngine, args, out: Path, index: int) -> dict:
    target = out / f"serve_bench_{index}.json"
    command = [sys.executable, "-m", "quantkit", "bench", "serve", server.base, "--num-requests",
               str(args.num_requests), "--input-len-range", args.input_len_range, "--output-len-range",
               args.output_len_range, "--seed", str(args.seed), "--request-rate", "inf", "--logprobs",
               "--json", str(target)]
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    client = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    if args.engine_process:
        return served_process(server, client, children0, target)
    # the measured run starts after the client's warm-up request: reset when the first measured one arrives
    while engine.steps == 0 or engine.tokens_out < 4:  # the warm-up request (4 tokens)
        if client.poll() is not None:
            raise SystemExit("the load generator ended early")
        time.sleep(0.001)
    while engine.has_unfinished():  # the warm-up finishing
        time.sleep(0.001)
    engine.reset_counters()
    cpu0, self0 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    client.wait()
    cpu1, self1 = time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if client.returncode != 0:
        raise SystemExit(f"the load generator failed ({client.returncode})")
    run = json.loads(target.read_text())["runs"][0]
    tokens = run["output_tokens"]
    engine_thread = engine.thread_cpu_last - (engine.thread_cpu_first or 0.0)
    server_cpu = (cpu1 - cpu0) - engine.step_cpu
    client_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    return {"output_tokens": tokens, "failed": run["failed"], "duration_s": run["duration_s"],
            "output_tokens_per_s": run["output_tokens_per_s"], "tpot_ms": 1e3 * run["tpot_s"]["median"],
            "ttft_ms": 1e3 * run["ttft_s"]["median"], "ttft_p99_ms": 1e3 * run["ttft_s"]["p99"],
            "steps": engine.steps, "step_ms": 1e3 * step_time(engine),
            "server_cpu_s": server_cpu, "server_us_per_token": 1e6 * server_cpu / tokens,
            "engine_thread_server_us_per_token": 1e6 * (engine_thread - engine.step_cpu) / tokens,
            "http_side_us_per_token": 1e6 * ((cpu1 - cpu0) - engine_thread) / tokens,
            "server_sys_us_per_token": 1e6 * (self1.ru_stime - self0.ru_stime) / tokens,
            "client_us_per_token": 1e6 * client_cpu / tokens}


def served_process(server: Server, client, children0, target: Path) -> dict:
    """--engine-process: this process is only the server; its CPU over the run, per token."""
    seen = 0
    while seen < 1:  # the warm-up request went through
        if client.poll() is not None:
            raise SystemExit("the load generator ended early")
        seen = server.engine.metrics_seen() if hasattr(server.engine, "metrics_seen") else 1
        time.sleep(0.01)
    while server.engine.in_flight == 0 and client.poll() is None:  # the warm-up, or the run, in flight
        time.sleep(0.001)
    while server.engine.in_flight > 0 and server.engine.in_flight < 2 and client.poll() is None:  # warm-up
        time.sleep(0.001)
    child = server.engine._process.pid
    cpu0, child0 = time.process_time(), _proc_cpu(child)
    client.wait()
    cpu1, child1 = time.process_time(), _proc_cpu(child)
    run = json.loads(target.read_text())["runs"][0]
    tokens = run["output_tokens"]
    return {"output_tokens": tokens, "failed": run["failed"], "duration_s": run["duration_s"],
            "output_tokens_per_s": run["output_tokens_per_s"], "tpot_ms": 1e3 * run["tpot_s"]["median"],
            "ttft_ms": 1e3 * run["ttft_s"]["median"], "ttft_p99_ms": 1e3 * run["ttft_s"]["p99"],
            "engine_process_cpu_s": child1 - child0,
            "steps": 0, "step_ms": float("nan"), "server_cpu_s": cpu1 - cpu0,
            "server_us_per_token": 1e6 * (cpu1 - cpu0) / tokens, "engine_thread_server_us_per_token": 0.0,
            "http_side_us_per_token": 1e6 * (cpu1 - cpu0) / tokens, "server_sys_us_per_token": float("nan"),
            "client_us_per_token": float("nan")}


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--input-len-range", default="128,1024")
    ap.add_argument("--output-len-range", default="64,256")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--host-ms", type=float, default=6.0, help="GIL-holding host work per step")
    ap.add_argument("--ops", type=int, default=100, help="GIL releases per step (torch ops)")
    ap.add_argument("--device-ms", type=float, default=14.0, help="GIL-released wait per step (the device)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--label", default="")
    ap.add_argument("--engine-process", action="store_true", help="the server's engine in a child process")
    ap.add_argument("--profile", action="store_true", help="cProfile the engine and HTTP threads (one run)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    from quantkit.models.bundled import BUNDLED_MODELS

    tokenizer = AutoTokenizer.from_pretrained(str(BUNDLED_MODELS["quantkit-target"]))
    engine = SyntheticEngine(tokenizer, max_num_seqs=args.max_num_seqs, host_ms=args.host_ms, ops=args.ops,
                             device_ms=args.device_ms)
    alone_runs, served_runs = [], []
    server = Server(engine, args)
    try:
        for index in range(args.repeats):
            # the engine thread is idle while the plain loop drives the engine (nothing submitted)
            alone_runs.append(engine_alone(engine, args))
            served_runs.append(served(server, engine, args, out, index))
            print(json.dumps({"alone": alone_runs[-1], "served": served_runs[-1]}), flush=True)
    finally:
        server.stop()
    if args.profile:
        import io
        import pstats

        for name, profile in server.profiles.items():
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(45)
            (out / f"profile_{name}.txt").write_text(text.getvalue())

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    result = {
        "label": args.label, "engine": {"host_ms": args.host_ms, "ops": args.ops, "device_ms": args.device_ms},
        "workload": {k: getattr(args, k) for k in ("num_requests", "input_len_range", "output_len_range", "seed")},
        "alone": alone_runs, "served": served_runs,
        "median": {
            "alone_tokens_per_s": med(alone_runs, "output_tokens_per_s"), "alone_step_ms": med(alone_runs, "step_ms"),
            "served_tokens_per_s": med(served_runs, "output_tokens_per_s"),
            "served_step_ms": med(served_runs, "step_ms"),
            "served_ttft_ms": med(served_runs, "ttft_ms"), "served_tpot_ms": med(served_runs, "tpot_ms"),
            "server_us_per_token": med(served_runs, "server_us_per_token"),
            "engine_thread_server_us_per_token": med(served_runs, "engine_thread_server_us_per_token"),
            "http_side_us_per_token": med(served_runs, "http_side_us_per_token"),
            "server_sys_us_per_token": med(served_runs, "server_sys_us_per_token"),
            "client_us_per_token": med(served_runs, "client_us_per_token"),
        },
    }
    m = result["median"]
    m["overhead"] = 1 - m["served_tokens_per_s"] / m["alone_tokens_per_s"]
    if args.engine_process:
        m["engine_process_cpu_s"] = med(served_runs, "engine_process_cpu_s")
    (out / f"serve_overhead{('_' + args.label) if args.label else ''}.json").write_text(json.dumps(result, indent=2))
    print(f"engine alone {m['alone_tokens_per_s']:.0f} tok/s (step {m['alone_step_ms']:.1f} ms); served "
          f"{m['served_tokens_per_s']:.0f} tok/s (step {m['served_step_ms']:.1f} ms, TTFT p50 {m['served_ttft_ms']:.0f} ms, "
          f"TPOT p50 {m['served_tpot_ms']:.1f} ms): overhead "
          f"{100 * m['overhead']:.1f}%; server host CPU {m['server_us_per_token']:.1f} us/token "
          f"(engine thread {m['engine_thread_server_us_per_token']:.1f}, HTTP side {m['http_side_us_per_token']:.1f}; "
          f"process system time incl. the synthetic steps {m['server_sys_us_per_token']:.1f}); "
          f"client {m['client_us_per_token']:.1f} us/token"
          + (f"; engine process CPU {m['engine_process_cpu_s']:.2f} s" if args.engine_process else ""))


if __name__ == "__main__":
    random.seed(0)
    main()
