"""Request timing for the runtime benchmarks, and single-request latency (``quantkit eval --latency``).

Every timestamp here is this module's own ``time.perf_counter`` reading, taken when
``Engine.step`` returns and, on CUDA, after synchronising the device: a token counts as produced
once the step that made it has finished. The engine's own timestamps are not used (its arrival
time is on another clock, and its token times are read before the device has finished).

Per request: TTFT (arrival to first token), TPOT (first to last token over the tokens after the
first) and end-to-end time. Figures over requests are the median and the 99th percentile
(linear interpolation; with few requests p99 is close to the maximum).
"""

from __future__ import annotations

import gc
import inspect
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from quantkit.errors import QuantkitError


@dataclass
class RequestTiming:
    start: float  # arrival (perf_counter): when the request could first be served
    input_len: int
    first_token: float | None = None
    finish: float | None = None
    output_len: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token - self.start

    @property
    def tpot(self) -> float | None:
        if self.output_len < 2:
            return None
        return (self.finish - self.first_token) / (self.output_len - 1)

    @property
    def e2e(self) -> float:
        return self.finish - self.start


def summarize(values: list[float]) -> dict | None:
    """median, p99, mean, min, max and count of ``values`` (None when empty)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    data = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(data)), "p99": float(np.percentile(data, 99)), "mean": float(data.mean()),
            "min": float(data.min()), "max": float(data.max()), "count": len(values)}


def timing_summary(timings: list[RequestTiming]) -> dict:
    return {"ttft_s": summarize([t.ttft for t in timings]), "tpot_s": summarize([t.tpot for t in timings]),
            "e2e_s": summarize([t.e2e for t in timings])}


# ---------------------------------------------------------------------- clock and engine
def make_clock(device: str, engine=None) -> Callable[[], float]:
    """perf_counter after the device has finished its queued work (CUDA), else perf_counter.

    Not for an engine that schedules asynchronously: the tokens its steps return are on the host
    already, and a device sync after each step would drain the step it launched ahead."""
    import torch

    if torch.device(device).type != "cuda" or getattr(engine, "async_stepper", None) is not None:
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def open_engine(model: str | None, *, device: str = "cpu", dtype: str = "auto", kv_cache_tokens: int | None = None,
                gpu_memory_utilization: float = 0.9, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048,
                draft: str | None = None, num_speculative_tokens: int | None = None,
                async_scheduling: bool | None = None):
    """An ``Engine``; ``draft``/``num_speculative_tokens`` only where this engine supports them."""
    from quantkit.runtime.engine import Engine

    options = {"device": device, "dtype": dtype, "kv_cache_tokens": kv_cache_tokens,
               "gpu_memory_utilization": gpu_memory_utilization, "max_num_seqs": max_num_seqs,
               "max_num_batched_tokens": max_num_batched_tokens}
    if async_scheduling is not None:  # passed only when asked: engines without the option still open
        options["async_scheduling"] = async_scheduling
    accepted = inspect.signature(Engine.__init__).parameters
    for name, value in (("draft", draft), ("num_speculative_tokens", num_speculative_tokens)):
        if value is None:
            continue
        if name not in accepted:
            raise QuantkitError(f"this engine has no speculative decoding: --{name.replace('_', '-')} is unavailable")
        options[name] = value
    return Engine(model, **options)


def close_engine(engine) -> None:
    """Drop the engine's references so its memory (weights, KV cache) can be reused."""
    import torch

    engine.__dict__.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def token_id_limit(engine) -> int:
    """Random prompt ids are drawn below this: the embedding size, and the tokenizer's when smaller."""
    limit = int(engine.model.config.vocab_size)
    if engine.tokenizer is not None:
        limit = min(limit, len(engine.tokenizer))
    return limit


def random_prompt(rng: np.random.Generator, length: int, limit: int) -> list[int]:
    return rng.integers(0, limit, size=length).tolist()


def track_step(engine, timings: dict[str, RequestTiming], clock: Callable[[], float]) -> list:
    """Run one engine step; stamp first tokens and finishes with ``clock``; return its outputs."""
    outputs = engine.step()
    now = clock()
    for out in outputs:
        timing = timings.get(out.request_id)
        if timing is None:
            continue
        timing.output_len = len(out.outputs[0].token_ids)
        if timing.output_len and timing.first_token is None:
            timing.first_token = now
        if out.finished:
            timing.finish = now
    return outputs


def spec_metrics(engine) -> dict | None:
    """The engine's speculative-decoding counters (cumulative since it started), when it has them."""
    from dataclasses import asdict, is_dataclass

    found = getattr(engine, "spec_metrics", None)
    if found is None:
        return None
    for method in ("as_dict", "to_dict"):
        if callable(getattr(found, method, None)):
            return getattr(found, method)()
    if is_dataclass(found):
        return asdict(found)
    return dict(found) if isinstance(found, dict) else {k: v for k, v in vars(found).items() if not k.startswith("_")}


# ---------------------------------------------------------------------- setup description
def engine_setup(engine, model: str | None, device: str, draft: str | None = None,
                 num_speculative_tokens: int | None = None) -> dict:
    """What a reader needs to judge the figures: device, model shape, dtypes, weights, cache."""
    import torch

    config = engine.model.config
    dtype = str(engine.model.dtype).removeprefix("torch.")
    return {
        "model": model or "quantkit-target",
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {"hidden_size": config.hidden_size, "num_layers": config.num_hidden_layers,
                  "num_heads": config.num_attention_heads, "num_kv_heads": engine.model.num_kv_heads,
                  "head_dim": engine.model.head_dim, "intermediate_size": config.intermediate_size,
                  "vocab_size": config.vocab_size},
        "compute_dtype": dtype,
        "kv_cache_dtype": dtype,
        "weights": _weights_text(engine.model, model),
        "kv_cache_tokens": engine.block_manager.num_blocks * engine.block_manager.block_size,
        "block_size": engine.block_manager.block_size,
        "speculative": _spec_text(engine, draft, num_speculative_tokens),
        "async_scheduling": getattr(engine, "async_stepper", None) is not None,
    }


def _weights_text(paged, model: str | None) -> str:
    """How the runtime holds the decoder's linears: dense in the compute dtype, or packed codes."""
    linears = [linear for layer in paged.layers for linear in (*layer.qkv, layer.o, *layer.gate_up, layer.down)]
    packed = [linear.packed for linear in linears if linear.packed is not None]
    dtype = str(paged.dtype).removeprefix("torch.")
    if not packed:
        return f"dense {dtype}"
    first = packed[0]
    group = "per-channel" if first.group_size in (-1, first.in_features) else f"g{first.group_size}"
    head = "packed" if paged.lm_head.packed is not None else f"{dtype}"
    return (f"{_quant_method(model)}{first.bits}-bit {group} ({len(packed)} of {len(linears)} runtime linears packed, "
            f"lm_head {head}), scales {str(first.scales.dtype).removeprefix('torch.')}")


def _quant_method(model: str | None) -> str:
    from pathlib import Path

    from quantkit.models.bundled import resolve_model_path
    from quantkit.models.loading import read_config_json

    folder = Path(resolve_model_path(model))
    if not folder.is_dir():
        return ""
    found = read_config_json(folder).get("quantization_config") or {}
    return f"{found['quant_method']} " if found.get("quant_method") else ""


def _spec_text(engine, draft: str | None, k: int | None) -> str | None:
    if getattr(engine, "spec_metrics", None) is None:
        return None
    return f"draft model {draft}, " + (f"{k} draft tokens per step" if k else "the engine's default draft tokens per step")


# ---------------------------------------------------------------------- single-request latency
@dataclass
class LatencyConfig:
    input_len: int = 128
    output_len: int = 128
    repetitions: int = 10
    warmup: int = 1
    seed: int = 0

    def check(self) -> LatencyConfig:
        for name in ("input_len", "output_len", "repetitions"):
            if getattr(self, name) < 1:
                raise QuantkitError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise QuantkitError(f"--warmup must be >= 0, got {self.warmup}")
        return self

    @property
    def cache_tokens(self) -> int:
        """One request's tokens plus room for speculative lookahead: all the KV cache it needs."""
        return self.input_len + self.output_len + 64


def measure_latency(engine, config: LatencyConfig, clock: Callable[[], float],
                    on_done: Callable[[], None] | None = None) -> list[RequestTiming]:
    """``warmup`` untimed requests, then ``repetitions`` timed ones, one at a time; every prompt
    is fresh random ids, so no repetition reuses another's prefix cache."""
    from quantkit.runtime.sampling_params import SamplingParams

    if config.input_len + config.output_len > engine.max_model_len:
        raise QuantkitError(f"--input-len {config.input_len} + --output-len {config.output_len} exceeds the "
                            f"model's context of {engine.max_model_len} tokens")
    rng, limit = np.random.default_rng(config.seed), token_id_limit(engine)
    params = SamplingParams(temperature=0, max_tokens=config.output_len, ignore_eos=True)
    timings = []
    for index in range(config.warmup + config.repetitions):
        timing = _one_request(engine, random_prompt(rng, config.input_len, limit), params, clock)
        if index >= config.warmup:
            timings.append(timing)
            if on_done is not None:
                on_done()
    return timings


def _one_request(engine, prompt: list[int], params, clock) -> RequestTiming:
    timing = RequestTiming(start=clock(), input_len=len(prompt))
    request_id = engine.add_request(prompt, params)
    timings = {request_id: timing}
    while timing.finish is None:
        if not engine.has_unfinished():
            raise RuntimeError("the engine stopped before the request finished")
        track_step(engine, timings, clock)
    return timing


def latency_result(timings: list[RequestTiming], config: LatencyConfig) -> dict:
    summary = timing_summary(timings)
    tpot, e2e = summary["tpot_s"], summary["e2e_s"]
    return {
        "input_len": config.input_len, "output_len": config.output_len, "repetitions": config.repetitions,
        "warmup": config.warmup, "seed": config.seed, **summary,
        "decode_tokens_per_s": None if tpot is None or tpot["median"] <= 0 else 1.0 / tpot["median"],
        "e2e_tokens_per_s": config.output_len / e2e["median"],
        "output_tokens": sum(t.output_len for t in timings),
    }


def run_latency(model: str | None, config: LatencyConfig, *, device: str = "cpu", dtype: str = "auto",
                draft: str | None = None, num_speculative_tokens: int | None = None,
                async_scheduling: bool | None = None, progress: bool = True) -> dict:
    """Single-request latency of ``model`` with the bandwidth limit beside the decode speed; the
    KV cache is sized to one request."""
    from quantkit.eval.bandwidth import measure_copy_bandwidth

    config.check()
    bandwidth = measure_copy_bandwidth(device)  # before the engine takes the memory
    engine = open_engine(model, device=device, dtype=dtype, kv_cache_tokens=config.cache_tokens,
                         draft=draft, num_speculative_tokens=num_speculative_tokens,
                         async_scheduling=async_scheduling)
    try:
        setup = engine_setup(engine, model, device, draft, num_speculative_tokens)
        result = latency_on_engine(engine, config, device, bandwidth, progress)
    finally:
        close_engine(engine)
    return {"kind": "latency", "setup": setup, **result}


def latency_on_engine(engine, config: LatencyConfig, device: str, bandwidth: float | None,
                      progress: bool = True) -> dict:
    """Latency figures of an open engine, with the decode bandwidth limit at batch 1."""
    from quantkit.eval.bandwidth import decode_limit

    with progress_bar(progress, "latency", config.repetitions) as advance:
        timings = measure_latency(engine, config, make_clock(device, engine), advance)
    result = latency_result(timings, config)
    context = config.input_len + (config.output_len - 1) / 2  # mean context of the decode steps
    result["bandwidth"] = decode_limit(engine.model, bandwidth, batch=1, mean_context=context)
    result["spec_metrics"] = spec_metrics(engine)
    return result


def run_latency_pair(model: str | None, baseline: str | None, config: LatencyConfig, **options) -> dict:
    """The model's latency payload, with the baseline's (measured after it, in the same run) and
    the speed-ups under "baseline" and "speedup" (None without a baseline)."""
    result = run_latency(model, config, **options)
    result["baseline"], result["speedup"] = None, None
    if baseline is not None:
        base_options = {k: v for k, v in options.items() if k not in ("draft", "num_speculative_tokens")}
        result["baseline"] = run_latency(baseline, config, **base_options)
        result["speedup"] = compare_latency(result, result["baseline"])
    return result


def compare_latency(result: dict, baseline: dict) -> dict:
    """Speed-ups of ``result`` over ``baseline`` (both measured in this run): >1 means faster."""
    def ratio(key: str, inverse: bool) -> float | None:
        a, b = _median(result, key), _median(baseline, key)
        if a is None or b is None or a <= 0 or b <= 0:
            return None
        return b / a if inverse else a / b

    return {"ttft": ratio("ttft_s", True), "tpot": ratio("tpot_s", True), "e2e": ratio("e2e_s", True),
            "decode_tokens_per_s": ratio("decode_tokens_per_s", False)}


def _median(result: dict, key: str) -> float | None:
    value = result.get(key)
    return value["median"] if isinstance(value, dict) else value


# ---------------------------------------------------------------------- progress
@contextmanager
def progress_bar(enabled: bool, label: str, total: int):
    """A transient rich bar on stderr; yields ``advance(count=1)``."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    bar = Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True, disable=not enabled or not console.is_terminal)
    with bar:
        task = bar.add_task(label, total=total)
        yield lambda count=1: bar.advance(task, count)


def finite_or_none(value: float) -> float | None:
    """JSON has no infinity: an unlimited rate is written as null."""
    return None if value is None or math.isinf(value) else value
