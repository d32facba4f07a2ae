"""Prometheus metrics of the server, in the text format ``GET /metrics`` returns.

Latencies and token counts are recorded by the engine thread as outputs come out of each step
(``record_*``); the state of the engine (requests running and waiting, KV-cache use, prefix
cache and speculative-decoding counters) is read at scrape time from the snapshot that thread
publishes after every step, so a scrape never touches the engine itself. Names follow vLLM's
(``vllm:time_to_first_token_seconds`` is ``quantkit_time_to_first_token_seconds`` here).
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
               0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Observed by the engine thread for every request on every step: plain bucket counts
        # (one writer), exported at scrape time, instead of prometheus_client's locked ones.
        self.ttft = LightHistogram("quantkit_time_to_first_token_seconds",
                                   "Time from the server accepting a request to its first output token.",
                                   TTFT_BUCKETS)
        self.itl = LightHistogram("quantkit_inter_token_latency_seconds",
                                  "Time between successive engine steps that gave a request new tokens.",
                                  ITL_BUCKETS)
        self.e2e = LightHistogram("quantkit_e2e_request_latency_seconds",
                                  "Time from the server accepting a request to its last token.", E2E_BUCKETS)
        self.prompt_tokens = Counter("quantkit_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("quantkit_generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("quantkit_request_success", "Requests finished, by finish reason.",
                                ["finished_reason"], registry=r)
        self.failed = Counter("quantkit_request_failure", "Accepted requests that ended in an error, by cause.",
                              ["cause"], registry=r)
        self.http_error_counts: dict[str, int] = {}  # by status (plain: an engine process renders them too)
        self.snapshot: dict = {}
        r.register(_HistogramCollector([self.ttft, self.itl, self.e2e]))
        r.register(_EngineStateCollector(self))

    # ------------------------------------------------------------------ recording
    def record_ttft(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def record_itl(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def record_finish(self, reason: str, e2e_seconds: float | None) -> None:
        self.finished.labels(finished_reason=reason).inc()
        if e2e_seconds is not None:
            self.e2e.observe(e2e_seconds)

    def record_failure(self, cause: str) -> None:
        self.failed.labels(cause=cause).inc()

    def record_http_error(self, status: int) -> None:
        key = str(status)
        self.http_error_counts[key] = self.http_error_counts.get(key, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LightHistogram:
    """A Prometheus histogram written by one thread without locks (a scrape may see an
    observation's bucket before its sum: harmless for a histogram)."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.bounds = name, doc, tuple(float(b) for b in buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf only)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # the first bucket whose bound >= value
        self.sum += value

    def family(self) -> HistogramMetricFamily:
        counts, total, buckets = list(self.counts), self.sum, []
        running = 0
        for bound, count in zip(self.bounds, counts):
            running += count
            buckets.append((floatToGoString(bound), running))
        buckets.append(("+Inf", running + counts[-1]))
        return HistogramMetricFamily(self.name, self.doc, buckets=buckets, sum_value=total)


class _HistogramCollector:
    def __init__(self, histograms: list[LightHistogram]) -> None:
        self.histograms = histograms

    def describe(self):
        return []

    def collect(self):
        for histogram in self.histograms:
            yield histogram.family()


class _EngineStateCollector:
    """Gauges and engine-kept counters from the engine thread's latest snapshot."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        errors = CounterMetricFamily("quantkit_http_errors", "Error responses, by HTTP status.", labels=["status"])
        for status, count in sorted(dict(self.metrics.http_error_counts).items()):
            errors.add_metric([status], float(count))
        yield errors
        snap = dict(self.metrics.snapshot)
        yield _gauge("quantkit_engine_ready", "1 when the model is loaded and the engine serves.",
                     1.0 if snap.get("ready") else 0.0)
        yield _gauge("quantkit_num_requests_running", "Requests with sequences in the engine's running batch.",
                     snap.get("running", 0))
        yield _gauge("quantkit_num_requests_waiting", "Accepted requests not yet running (queued or preempted).",
                     snap.get("waiting", 0))
        yield _gauge("quantkit_kv_cache_usage_perc", "Fraction of KV-cache blocks held by sequences (0-1).",
                     snap.get("kv_usage", 0.0))
        yield _gauge("quantkit_kv_cache_blocks", "KV-cache blocks in the pool.", snap.get("kv_blocks", 0))
        yield _gauge("quantkit_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache over prompt "
                     "tokens looked up, since the start.", snap.get("prefix_hit_rate", 0.0))
        yield _counter("quantkit_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                       snap.get("prefix_queries", 0))
        yield _counter("quantkit_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                       snap.get("prefix_hits", 0))
        yield _counter("quantkit_num_preemptions", "Sequences preempted (recomputed later) for lack of KV blocks.",
                       snap.get("preemptions", 0))
        yield _counter("quantkit_engine_step_failures", "Engine steps that raised (each isolated and recovered).",
                       snap.get("step_failures", 0))
        spec = snap.get("spec")
        if spec is not None:
            yield _counter("quantkit_spec_decode_num_draft_tokens", "Draft tokens proposed for verification.",
                           spec["num_proposed"])
            yield _counter("quantkit_spec_decode_num_accepted_tokens", "Draft tokens accepted by the target.",
                           spec["num_accepted"])
            yield _counter("quantkit_spec_decode_num_emitted_tokens", "Tokens emitted by verifying steps.",
                           spec["num_emitted"])
            yield _gauge("quantkit_spec_decode_acceptance_rate", "Accepted over proposed draft tokens.",
                         spec["acceptance_rate"])
            yield _gauge("quantkit_spec_decode_mean_accepted_length", "Accepted draft tokens per verifying step.",
                         spec["mean_accepted_length"])


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=float(value))
