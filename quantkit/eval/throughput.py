"""Offline throughput of the runtime (``quantkit bench``): a seeded workload through the engine,
and optionally the same workload through transformers' ``generate`` in the same run.

The workload: ``num_requests`` requests whose prompt and output lengths are drawn uniformly from
the given ranges with a seeded RNG; prompts are random token ids, or windows of a text file's
tokens. Requests arrive all at once (``request_rate=inf``) or as a Poisson process, and at most
``max_concurrency`` are in the engine at a time. Every output runs to its drawn length (greedy,
end-of-sequence ignored), so token counts are exact. Latency of a request counts from its arrival
(or, when the concurrency cap holds it back, from the moment a slot frees) to its last token.

A concurrency sweep reruns the same lengths with fresh prompt tokens at each point, so no point
profits from the prefix cache that an earlier point filled.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.eval.latency import (
    RequestTiming,
    close_engine,
    engine_setup,
    finite_or_none,
    make_clock,
    open_engine,
    progress_bar,
    random_prompt,
    spec_metrics,
    timing_summary,
    token_id_limit,
    track_step,
)

WARMUP_REQUESTS = 2
WARMUP_OUTPUT_TOKENS = 4


# ---------------------------------------------------------------------- options
def parse_len_range(text: str, option: str) -> tuple[int, int]:
    """"100,1024" -> (100, 1024); "64" -> (64, 64)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        raise QuantkitError(f"{option} '{text}' must be MIN,MAX (two whole numbers, e.g. 100,1024)")
    low, high = values[0], values[-1]
    if low < 1:
        raise QuantkitError(f"{option} '{text}': lengths must be at least 1")
    if low > high:
        raise QuantkitError(f"{option} '{text}': the minimum {low} is larger than the maximum {high}")
    return low, high


def parse_concurrency(text: str) -> list[int]:
    """"1,4,16,64" -> [1, 4, 16, 64]: positive integers, no repeats."""
    try:
        values = [int(p) for p in str(text).split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values) or len(set(values)) != len(values):
        raise QuantkitError(f"--concurrency '{text}' must be a comma-separated list of distinct positive "
                            "integers, e.g. 1,4,16,64")
    return values


@dataclass
class BenchConfig:
    num_requests: int = 64
    input_len_range: tuple[int, int] = (100, 512)
    output_len_range: tuple[int, int] = (100, 512)
    seed: int = 0
    text_file: Path | None = None
    request_rate: float = math.inf  # requests/s of a Poisson process; inf: all at once
    max_concurrency: int | None = None
    concurrency: list[int] | None = None  # a sweep of max_concurrency values
    baseline: bool = False
    baseline_batch_size: int = 8
    baseline_requests: int | None = None  # None: the whole workload

    def check(self) -> BenchConfig:
        """Raise ``QuantkitError`` for the first bad option, before any model loads."""
        if self.num_requests < 1:
            raise QuantkitError(f"--num-requests must be at least 1, got {self.num_requests}")
        if not self.request_rate > 0:
            raise QuantkitError(f"--request-rate must be > 0 (inf: all at once), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise QuantkitError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if self.concurrency is not None and self.max_concurrency is not None:
            raise QuantkitError("give --concurrency (a sweep) or --max-concurrency, not both")
        if self.baseline_batch_size < 1:
            raise QuantkitError(f"--baseline-batch-size must be at least 1, got {self.baseline_batch_size}")
        if self.baseline_requests is not None and self.baseline_requests < 1:
            raise QuantkitError(f"--baseline-requests must be at least 1, got {self.baseline_requests}")
        if self.text_file is not None and not Path(self.text_file).is_file():
            raise QuantkitError(f"text file '{self.text_file}' does not exist")
        return self

    @property
    def points(self) -> list[int | None]:
        return list(self.concurrency) if self.concurrency else [self.max_concurrency]

    def to_dict(self) -> dict:
        return {"num_requests": self.num_requests, "input_len_range": list(self.input_len_range),
                "output_len_range": list(self.output_len_range), "seed": self.seed,
                "prompts": f"text file {self.text_file}" if self.text_file else "random token ids",
                "request_rate": finite_or_none(self.request_rate), "max_concurrency": self.max_concurrency,
                "concurrency": self.concurrency, "sampling": "greedy, end-of-sequence ignored"}


# ---------------------------------------------------------------------- workload
@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    arrivals: list[float]  # seconds after the start

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def input_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    def head(self, count: int) -> Workload:
        return Workload(self.prompts[:count], self.output_lens[:count], self.arrivals[:count])


def make_workload(config: BenchConfig, limit: int, token_stream: list[int] | None = None,
                  variant: int = 0) -> Workload:
    """Lengths and arrivals from ``config.seed``; prompt tokens from (seed, variant), so sweep
    points share lengths but not prompts. ``token_stream``: a text's tokens to cut windows from."""
    rng = np.random.default_rng(config.seed)
    n = config.num_requests
    input_lens = rng.integers(config.input_len_range[0], config.input_len_range[1] + 1, size=n).tolist()
    output_lens = rng.integers(config.output_len_range[0], config.output_len_range[1] + 1, size=n).tolist()
    if math.isinf(config.request_rate):
        arrivals = [0.0] * n
    else:
        arrivals = np.cumsum(rng.exponential(1.0 / config.request_rate, size=n)).tolist()
    tokens = np.random.default_rng([config.seed, variant])
    prompts = [_prompt(tokens, length, limit, token_stream) for length in input_lens]
    return Workload(prompts, output_lens, arrivals)


def _prompt(rng: np.random.Generator, length: int, limit: int, stream: list[int] | None) -> list[int]:
    if stream is None:
        return random_prompt(rng, length, limit)
    start = int(rng.integers(0, len(stream) - length + 1))
    return stream[start:start + length]


def text_tokens(engine, path: Path, longest: int) -> list[int]:
    if engine.tokenizer is None:
        raise QuantkitError("--text-file needs the model's tokenizer, and this checkpoint has none")
    stream = engine.tokenizer.encode(Path(path).read_text(encoding="utf-8", errors="replace"),
                                     add_special_tokens=False)
    if len(stream) < longest:
        raise QuantkitError(f"text file '{path}' has {len(stream)} tokens; prompts of up to {longest} need more")
    return stream


# ---------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory during a run: ``torch.cuda.max_memory_allocated`` on CUDA, peak RSS on the CPU."""

    def __init__(self, device: str) -> None:
        import torch

        self.device = torch.device(device)
        self.kind = ""

    def reset(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "torch.cuda.max_memory_allocated"
            return
        try:  # Linux: writing 5 resets the process's peak RSS (VmHWM) to its current RSS
            Path("/proc/self/clear_refs").write_text("5")
            self.kind = "peak RSS of the process during the run"
        except OSError:
            self.kind = "peak RSS of the process since it started"

    def read(self) -> int:
        import torch

        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return _peak_rss()


def _peak_rss() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# ---------------------------------------------------------------------- engine run
@dataclass
class _StepStats:
    steps: int = 0
    sampled: int = 0
    context: int = 0
    kv_usage_peak: float = 0.0

    def add(self, outputs: list, usage: float) -> None:
        self.kv_usage_peak = max(self.kv_usage_peak, usage)
        if not outputs:
            return
        self.steps += 1
        self.sampled += len(outputs)
        self.context += sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outputs)


@dataclass
class _Submitter:
    """Submits requests whose arrival has come while the concurrency cap allows."""

    engine: object
    workload: Workload
    cap: int | None
    t0: float
    timings: dict[str, RequestTiming] = field(default_factory=dict)
    pending: deque = field(default_factory=deque)
    free_slots: list[float] = field(default_factory=list)  # times (after t0) at which slots freed
    in_flight: int = 0

    def __post_init__(self) -> None:
        from quantkit.runtime.sampling_params import SamplingParams

        self.pending = deque(range(len(self.workload)))
        self.free_slots = [0.0] * (self.cap or 0)
        self.params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in self.workload.output_lens]

    def submit_due(self, now: float) -> None:
        while self.pending and self.workload.arrivals[self.pending[0]] <= now:
            if self.cap is not None and self.in_flight >= self.cap:
                return
            index = self.pending.popleft()
            start = self.workload.arrivals[index]
            if self.cap is not None:
                start = max(start, heapq.heappop(self.free_slots))
            prompt = self.workload.prompts[index]
            request_id = self.engine.add_request(prompt, self.params[index], request_id=f"bench-{index}")
            self.timings[request_id] = RequestTiming(start=self.t0 + start, input_len=len(prompt))
            self.in_flight += 1

    def finished(self, request_id: str) -> None:
        self.in_flight -= 1
        if self.cap is not None:
            heapq.heappush(self.free_slots, self.timings[request_id].finish - self.t0)

    def next_arrival(self) -> float:
        return self.workload.arrivals[self.pending[0]]


def run_workload(engine, workload: Workload, max_concurrency: int | None, clock: Callable[[], float],
                 on_done: Callable[[], None] | None = None) -> dict:
    """Serve ``workload``; return throughput, latency summaries, peak memory and KV-cache use."""
    memory = PeakMemory(str(engine.model.device))
    memory.reset()
    manager = engine.block_manager
    queries, hits = manager.prefix_cache_queries, manager.prefix_cache_hits
    stats = _StepStats()
    t0 = clock()
    submitter = _Submitter(engine, workload, max_concurrency, t0)
    while submitter.pending or engine.has_unfinished():
        submitter.submit_due(clock() - t0)
        if not engine.has_unfinished():
            time.sleep(max(0.0, submitter.next_arrival() - (clock() - t0)))
            continue
        outputs = track_step(engine, submitter.timings, clock)
        stats.add(outputs, manager.usage)
        for out in outputs:
            if out.finished:
                submitter.finished(out.request_id)
                if on_done is not None:
                    on_done()
    timings = list(submitter.timings.values())
    duration = max(t.finish for t in timings) - t0
    queried = manager.prefix_cache_queries - queries
    return _run_result(timings, duration, stats, memory, max_concurrency,
                       (manager.prefix_cache_hits - hits) / queried if queried else 0.0)


def _run_result(timings: list[RequestTiming], duration: float, stats: _StepStats, memory: PeakMemory,
                max_concurrency: int | None, prefix_hit_rate: float) -> dict:
    input_tokens = sum(t.input_len for t in timings)
    output_tokens = sum(t.output_len for t in timings)
    return {
        "max_concurrency": max_concurrency, "num_requests": len(timings), "duration_s": duration,
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "requests_per_s": len(timings) / duration, "output_tokens_per_s": output_tokens / duration,
        "total_tokens_per_s": (input_tokens + output_tokens) / duration,
        **timing_summary(timings),
        "peak_memory_bytes": memory.read(), "peak_memory_kind": memory.kind,
        "kv_cache_usage_peak": stats.kv_usage_peak, "prefix_cache_hit_rate": prefix_hit_rate,
        "steps": stats.steps, "mean_batch": stats.sampled / stats.steps if stats.steps else 0.0,
        "mean_context": stats.context / stats.sampled if stats.sampled else 0.0,
    }


def warm_up(engine, config: BenchConfig, limit: int) -> None:
    """Untimed: a few short requests, so one-time costs (kernel compilation, allocator growth)
    do not land on the first measured point."""
    from quantkit.runtime.sampling_params import SamplingParams

    rng = np.random.default_rng([config.seed, 10**6])
    params = SamplingParams(temperature=0, max_tokens=min(WARMUP_OUTPUT_TOKENS, config.output_len_range[0]),
                            ignore_eos=True)
    engine.generate([random_prompt(rng, config.input_len_range[0], limit)
                     for _ in range(min(WARMUP_REQUESTS, config.num_requests))], params)


# ---------------------------------------------------------------------- transformers baseline
def run_hf_baseline(model: str | None, workload: Workload, batch_size: int, *, device: str, dtype: str,
                    on_done: Callable[[int], None] | None = None) -> dict:
    """transformers ``generate`` with static batches of ``batch_size`` requests in order: prompts
    padded on the left, greedy, every request of a batch generating the batch's longest output
    (``min_new_tokens = max_new_tokens``). Throughput counts only the tokens each request asked for."""
    import torch

    from quantkit.models.loading import LoadedModel, load_model

    loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype=dtype, device=device)
    network, clock, memory = loaded.model, make_clock(device), PeakMemory(device)
    pad = _pad_id(network.config)
    _hf_generate(network, [workload.prompts[0][:8]], 2, pad, device)  # warm-up
    memory.reset()
    generated, t0 = 0, clock()
    for start in range(0, len(workload), batch_size):
        prompts = workload.prompts[start:start + batch_size]
        generated += _hf_generate(network, prompts, max(workload.output_lens[start:start + batch_size]), pad, device)
        if on_done is not None:
            on_done(len(prompts))
    duration = clock() - t0
    result = {
        "engine": "transformers generate (static batches, left padding, greedy)", "batch_size": batch_size,
        "num_requests": len(workload), "duration_s": duration, "input_tokens": workload.input_tokens,
        "output_tokens": workload.output_tokens, "generated_tokens": generated,
        "requests_per_s": len(workload) / duration, "output_tokens_per_s": workload.output_tokens / duration,
        "total_tokens_per_s": (workload.input_tokens + workload.output_tokens) / duration,
        "peak_memory_bytes": memory.read(), "peak_memory_kind": memory.kind,
        "dtype": str(network.dtype).removeprefix("torch."),
    }
    del loaded, network
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def _hf_generate(network, prompts: list[list[int]], new_tokens: int, pad: int, device: str) -> int:
    """Generate exactly ``new_tokens`` for every prompt of the batch; return the tokens generated."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.no_grad():
        out = network.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
    made = out.shape[1] - width
    if made != new_tokens:
        raise RuntimeError(f"transformers generated {made} tokens, not {new_tokens}")
    return made * len(prompts)


def _pad_id(config) -> int:
    for value in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


# ---------------------------------------------------------------------- the whole benchmark
@dataclass
class EngineOptions:
    device: str = "cpu"
    dtype: str = "auto"
    kv_cache_tokens: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    draft: str | None = None
    num_speculative_tokens: int | None = None
    async_scheduling: bool | None = None  # None: the engine's default (on for CUDA)


def run_bench(model: str | None, config: BenchConfig, options: EngineOptions, progress: bool = True) -> dict:
    """Bandwidth, then the engine at each concurrency point, then (optionally) the baseline."""
    from quantkit.eval.bandwidth import measure_copy_bandwidth

    config.check()
    bandwidth = measure_copy_bandwidth(options.device)  # before the engine takes the memory
    engine = open_engine(model, **vars(options))
    try:
        setup = engine_setup(engine, model, options.device, options.draft, options.num_speculative_tokens)
        runs, workloads = engine_runs(engine, config, options.device, bandwidth, progress)
        setup["spec_metrics"] = spec_metrics(engine)
    finally:
        close_engine(engine)
    payload = {"kind": "bench", "setup": setup, "workload": config.to_dict(),
               "device_bandwidth_bytes_per_s": bandwidth, "runs": runs, "baseline": None}
    if config.baseline:
        subset = workloads[0].head(config.baseline_requests or config.num_requests)
        with progress_bar(progress, "transformers baseline", len(subset)) as advance:
            payload["baseline"] = run_hf_baseline(model, subset, config.baseline_batch_size, device=options.device,
                                                  dtype=options.dtype, on_done=advance)
        for run in runs:
            run["vs_baseline"] = _ratios(run, payload["baseline"])
    return payload


def engine_runs(engine, config: BenchConfig, device: str, bandwidth: float | None,
                progress: bool = True) -> tuple[list[dict], list[Workload]]:
    """Warm up, then one run per concurrency point on an open engine: the runs and their workloads."""
    from quantkit.eval.bandwidth import decode_limit

    _check_fits(engine, config)
    limit = token_id_limit(engine)
    stream = text_tokens(engine, config.text_file, config.input_len_range[1]) if config.text_file else None
    clock = make_clock(device, engine)
    warm_up(engine, config, limit)
    runs, workloads = [], []
    for index, cap in enumerate(config.points):
        workload = make_workload(config, limit, stream, variant=index + 1)
        label = "bench" + ("" if cap is None else f" concurrency {cap}")
        with progress_bar(progress, label, len(workload)) as advance:
            run = run_workload(engine, workload, cap, clock, advance)
        run["request_rate"] = finite_or_none(config.request_rate)
        run["bandwidth"] = decode_limit(engine.model, bandwidth, batch=run["mean_batch"],
                                        mean_context=run["mean_context"])
        runs.append(run)
        workloads.append(workload)
    return runs, workloads


def _check_fits(engine, config: BenchConfig) -> None:
    longest = config.input_len_range[1] + config.output_len_range[1]
    per_request = engine.scheduler.max_model_len
    if longest > per_request:
        cache = engine.block_manager.num_blocks * engine.block_manager.block_size
        raise QuantkitError(f"the longest request ({config.input_len_range[1]} prompt + {config.output_len_range[1]} "
                            f"output tokens) exceeds the engine's limit of {per_request} tokens per request "
                            f"(model context {engine.max_model_len}, KV cache {cache} tokens)")


def _ratios(run: dict, baseline: dict) -> dict:
    """Engine over baseline, per output token and per request (>1: the engine is faster)."""
    return {"output_tokens_per_s": run["output_tokens_per_s"] / baseline["output_tokens_per_s"],
            "requests_per_s": run["requests_per_s"] / baseline["requests_per_s"],
            "baseline_requests": baseline["num_requests"], "engine_requests": run["num_requests"]}
