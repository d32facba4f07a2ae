"""``quantkit bench serve URL``: a load generator for an OpenAI-compatible server, measured the
way vLLM's serving benchmark measures.

Workload: ``num_requests`` requests whose prompt and output lengths are drawn uniformly from the
given ranges with a seeded RNG, exactly as ``quantkit bench MODEL`` draws them (the same seed
gives the same prompts token for token, so the engine alone and the engine behind HTTP can be
compared on one workload). Prompts are random token ids sent as a token list, or prompts from a
file (``.txt``: one per line; ``.jsonl``: a "prompt" field per line). Every request streams
(``stream_options.include_usage`` for exact token counts), uses greedy sampling and asks for
``ignore_eos`` so that it produces exactly its drawn output length.

Arrivals: all at once (``--request-rate inf``) or a Poisson process at each given rate; at most
``--max-concurrency`` requests are in flight (a request waits for a slot before it is sent, and
its latency counts from the send, as in vLLM).

Per request: TTFT (send to the first chunk with text), TPOT ((end - first chunk) / (output
tokens - 1)), ITL (gaps between successive text chunks; one chunk may carry several tokens when
the server coalesces) and end-to-end latency. With ``logprobs`` every request asks for its
tokens' log-probabilities, so a chunk whose tokens decode to no text still counts (a random model
whose vocabulary is larger than its tokenizer's). Figures: mean, median and p99 over requests (ITL:
over all gaps), request and token throughput over the run's duration (first send to last
response).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.eval.latency import finite_or_none
from quantkit.eval.throughput import BenchConfig, make_workload

WARMUP_OUTPUT_TOKENS = 4
WARMUP_VARIANT = 10**6  # prompt tokens no measured request shares (no prefix-cache help)


def parse_rates(text: str) -> list[float]:
    """"1,2,4,inf" -> [1.0, 2.0, 4.0, inf]; each rate > 0."""
    values = []
    for part in str(text).split(","):
        part = part.strip().lower()
        try:
            value = math.inf if part in ("inf", "infinity") else float(part)
        except ValueError:
            value = -1.0
        if not value > 0:
            raise QuantkitError(f"--request-rate '{text}' must be a comma-separated list of rates > 0 in "
                                "requests/s, or inf (all at once)")
        values.append(value)
    return values


@dataclass
class ServeBenchConfig:
    url: str
    model: str | None = None
    num_requests: int = 64
    input_len_range: tuple[int, int] = (100, 512)
    output_len_range: tuple[int, int] = (100, 512)
    seed: int = 0
    prompts_file: Path | None = None
    request_rates: list[float] = field(default_factory=lambda: [math.inf])
    max_concurrency: int | None = None
    ignore_eos: bool = True
    api_key: str | None = None
    timeout_s: float = 600.0
    vocab_size: int | None = None  # random prompt ids below this (default: what the server reports)
    logprobs: bool = False  # ask for token log-probabilities: every token shows, even one without text

    def check(self) -> ServeBenchConfig:
        if not self.url.startswith(("http://", "https://")):
            raise QuantkitError(f"URL '{self.url}' must start with http:// or https://")
        if self.num_requests < 1:
            raise QuantkitError(f"--num-requests must be at least 1, got {self.num_requests}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise QuantkitError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if self.prompts_file is not None and not Path(self.prompts_file).is_file():
            raise QuantkitError(f"prompts file '{self.prompts_file}' does not exist")
        if self.timeout_s <= 0:
            raise QuantkitError(f"--timeout must be > 0, got {self.timeout_s}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise QuantkitError(f"--vocab-size must be at least 1, got {self.vocab_size}")
        return self

    @property
    def base_url(self) -> str:
        url = self.url.rstrip("/")
        return url.removesuffix("/v1")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def workload_dict(self) -> dict:
        return {"num_requests": self.num_requests, "input_len_range": list(self.input_len_range),
                "output_len_range": list(self.output_len_range), "seed": self.seed,
                "prompts": f"file {self.prompts_file}" if self.prompts_file else "random token ids",
                "request_rates": [finite_or_none(r) for r in self.request_rates],
                "max_concurrency": self.max_concurrency,
                "sampling": "greedy" + (", end-of-sequence ignored" if self.ignore_eos else "")
                            + (", token log-probabilities" if self.logprobs else ""),
                "streaming": "stream=true, stream_options.include_usage=true"}


@dataclass
class Request:
    prompt: str | list[int]
    output_len: int
    input_len: int | None  # known for token prompts; the server's usage says for text


@dataclass
class Result:
    ok: bool = False
    error: str | None = None
    start: float = 0.0
    first_chunk: float | None = None
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_chunk is None else self.first_chunk - self.start

    @property
    def tpot(self) -> float | None:
        if self.first_chunk is None or self.output_tokens < 2:
            return None
        return (self.end - self.first_chunk) / (self.output_tokens - 1)

    @property
    def e2e(self) -> float:
        return self.end - self.start

    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


# ---------------------------------------------------------------------- workload
def build_requests(config: ServeBenchConfig, vocab_limit: int, variant: int = 1) -> list[Request]:
    bench = BenchConfig(num_requests=config.num_requests, input_len_range=config.input_len_range,
                        output_len_range=config.output_len_range, seed=config.seed)
    workload = make_workload(bench, vocab_limit, variant=variant)
    if config.prompts_file is None:
        return [Request(p, n, len(p)) for p, n in zip(workload.prompts, workload.output_lens)]
    texts = read_prompts(Path(config.prompts_file))
    return [Request(texts[i % len(texts)], n, None) for i, n in enumerate(workload.output_lens)]


def read_prompts(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                prompts.append(str(json.loads(line)["prompt"]))
            except (ValueError, KeyError, TypeError):
                raise QuantkitError(f"{path}:{number}: each line must be a JSON object with a 'prompt' field") from None
    else:
        prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise QuantkitError(f"prompts file '{path}' holds no prompts")
    return prompts


def arrival_gaps(rate: float, count: int, seed: int) -> list[float]:
    """Seconds to wait before each request: 0 for inf, else exponential gaps (a Poisson process)."""
    if math.isinf(rate):
        return [0.0] * count
    return np.random.default_rng([seed, 7]).exponential(1.0 / rate, size=count).tolist()


# ---------------------------------------------------------------------- talking to the server
async def server_info(client, config: ServeBenchConfig) -> dict:
    """The served model's entry of GET /v1/models (name, context, vocabulary when reported)."""
    import httpx

    try:
        response = await client.get(f"{config.base_url}/v1/models", headers=config.headers())
    except httpx.HTTPError as error:
        raise QuantkitError(f"cannot reach the server at {config.base_url}: {error}") from None
    if response.status_code != 200:
        raise QuantkitError(f"GET {config.base_url}/v1/models answered {response.status_code}: {response.text[:200]}")
    models = response.json().get("data") or []
    if not models:
        raise QuantkitError(f"the server at {config.base_url} serves no model")
    if config.model is None:
        return models[0]
    for entry in models:
        if entry.get("id") == config.model:
            return entry
    raise QuantkitError(f"the server serves {[m.get('id') for m in models]}, not '{config.model}'")


async def send(client, config: ServeBenchConfig, model: str, request: Request) -> Result:
    """One streaming completion; never raises (failures are counted)."""
    payload = {"model": model, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0,
               "stream": True, "stream_options": {"include_usage": True}}
    if config.ignore_eos:
        payload["ignore_eos"] = True
    if config.logprobs:
        payload["logprobs"] = 0
    result = Result(start=time.perf_counter())
    try:
        async with client.stream("POST", f"{config.base_url}/v1/completions", json=payload,
                                 headers=config.headers()) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:200]}"
                result.end = time.perf_counter()
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error event")
                    break
                if any(choice.get("text") or (choice.get("logprobs") or {}).get("tokens")
                       for choice in chunk.get("choices") or []):
                    if result.first_chunk is None:
                        result.first_chunk = now
                    result.chunk_times.append(now)
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens, result.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
    except Exception as error:  # noqa: BLE001 - a failed request is a figure, not a crash
        result.error = f"{type(error).__name__}: {error}"
    result.end = time.perf_counter()
    if result.error is None:
        if result.output_tokens == 0:  # a server without usage in its stream: count chunks
            result.output_tokens = len(result.chunk_times)
            result.prompt_tokens = request.input_len or 0
        result.ok = True
    return result


async def run_rate(client, config: ServeBenchConfig, model: str, requests: list[Request], rate: float,
                   on_done=None) -> tuple[list[Result], float]:
    """Send ``requests`` at ``rate``; the results and the run's duration."""
    limit = asyncio.Semaphore(config.max_concurrency or len(requests))

    async def limited(request: Request) -> Result:
        async with limit:
            result = await send(client, config, model, request)
        if on_done is not None:
            on_done()
        return result

    tasks = []
    started = time.perf_counter()
    for request, gap in zip(requests, arrival_gaps(rate, len(requests), config.seed)):
        if gap > 0:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(limited(request)))
    results = await asyncio.gather(*tasks)
    return results, max(r.end for r in results) - started


def summarize_run(results: list[Result], duration: float, rate: float, max_concurrency: int | None) -> dict:
    from quantkit.eval.latency import summarize

    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    input_tokens = sum(r.prompt_tokens for r in done)
    itls = [gap for r in done for gap in r.itls()]
    return {
        "request_rate": finite_or_none(rate), "max_concurrency": max_concurrency,
        "num_requests": len(results), "completed": len(done), "failed": len(failed),
        "errors": sorted({r.error for r in failed})[:5], "duration_s": duration,
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "requests_per_s": len(done) / duration, "output_tokens_per_s": output_tokens / duration,
        "total_tokens_per_s": (input_tokens + output_tokens) / duration,
        "ttft_s": summarize([r.ttft for r in done]), "tpot_s": summarize([r.tpot for r in done]),
        "itl_s": summarize(itls), "e2e_s": summarize([r.e2e for r in done]),
    }


async def run_serve_bench_async(config: ServeBenchConfig, progress: bool = True) -> dict:
    import httpx

    from quantkit.eval.latency import progress_bar

    config.check()
    connections = config.max_concurrency or config.num_requests
    limits = httpx.Limits(max_connections=connections + 4, max_keepalive_connections=connections + 4)
    timeout = httpx.Timeout(config.timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        info = await server_info(client, config)
        model = info["id"]
        vocab = config.vocab_size or _vocab_limit(info)
        if config.prompts_file is None and vocab is None:
            raise QuantkitError("the server does not report its vocabulary size: pass --vocab-size for random prompts")
        context = info.get("max_model_len")
        longest = config.input_len_range[1] + config.output_len_range[1]
        if context and config.prompts_file is None and longest > context:
            raise QuantkitError(f"the longest request ({config.input_len_range[1]} prompt + "
                                f"{config.output_len_range[1]} output tokens) exceeds the server's context of "
                                f"{context} tokens")
        warm_prompt = build_requests(config, vocab or 1, variant=WARMUP_VARIANT)[0].prompt
        warm = await send(client, config, model, Request(warm_prompt, WARMUP_OUTPUT_TOKENS, None))
        if not warm.ok:
            raise QuantkitError(f"the warm-up request failed: {warm.error}")
        runs = []
        for index, rate in enumerate(config.request_rates):
            requests = build_requests(config, vocab or 1, variant=index + 1)
            label = "serve bench" + ("" if math.isinf(rate) else f" at {rate:g} req/s")
            with progress_bar(progress, label, len(requests)) as advance:
                results, duration = await run_rate(client, config, model, requests, rate, advance)
            runs.append(summarize_run(results, duration, rate, config.max_concurrency))
    return {"kind": "serve_bench", "url": config.base_url, "model": model, "server": info,
            "workload": config.workload_dict(), "runs": runs}


def run_serve_bench(config: ServeBenchConfig, progress: bool = True) -> dict:
    return asyncio.run(run_serve_bench_async(config, progress))


def _vocab_limit(info: dict) -> int | None:
    sizes = [info.get(key) for key in ("vocab_size", "tokenizer_vocab_size") if info.get(key)]
    return min(sizes) if sizes else None
