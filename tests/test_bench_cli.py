"""`quantkit bench` and `quantkit eval --latency` on the bundled target on the CPU, with tiny
workloads: the JSON's shape, numbers that are measured and consistent, and one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from quantkit.errors import QuantkitError
from quantkit.eval import latency as latency_module
from quantkit.eval import throughput
from quantkit.eval.latency import RequestTiming, open_engine, summarize
from quantkit.eval.throughput import (
    BenchConfig,
    Workload,
    make_workload,
    parse_concurrency,
    parse_len_range,
)

TINY = ["--num-requests", "3", "--input-len-range", "4,8", "--output-len-range", "2,4", "--kv-cache-tokens", "256"]
SUMMARY_KEYS = {"median", "p99", "mean", "min", "max", "count"}


def assert_clean_failure(result, *fragments):
    """Exit 2, one 'error: ' message naming the problem, no traceback (as in test_cli_errors)."""
    assert result.code == 2, (result.code, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    joined = " ".join(line.strip() for line in result.stderr.splitlines() if line.strip())
    assert joined.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in joined, (fragment, joined)


def expected_output_tokens(num_requests: int, output_range: tuple[int, int], seed: int = 0) -> int:
    """What the seeded workload asks for, drawn independently of quantkit's code."""
    rng = np.random.default_rng(seed)
    rng.integers(4, 9, size=num_requests)  # prompt lengths come first
    return int(rng.integers(output_range[0], output_range[1] + 1, size=num_requests).sum())


def check_summary(summary: dict, count: int) -> None:
    assert set(summary) == SUMMARY_KEYS
    assert summary["count"] == count
    assert 0 < summary["min"] <= summary["median"] <= summary["p99"] <= summary["max"]


def check_run(run: dict, num_requests: int, output_tokens: int) -> None:
    assert run["num_requests"] == num_requests
    assert run["output_tokens"] == output_tokens
    assert run["duration_s"] > 0
    assert math.isclose(run["output_tokens_per_s"], output_tokens / run["duration_s"])
    assert math.isclose(run["requests_per_s"], num_requests / run["duration_s"])
    assert run["total_tokens_per_s"] > run["output_tokens_per_s"] > 0
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        check_summary(run[key], num_requests)
    assert run["e2e_s"]["max"] <= run["duration_s"] + 1e-9
    assert run["ttft_s"]["median"] <= run["e2e_s"]["median"]
    assert run["peak_memory_bytes"] > 0 and "RSS" in run["peak_memory_kind"]
    assert 0 < run["kv_cache_usage_peak"] <= 1
    assert run["bandwidth"]["limit_tokens_per_s"] is None  # no bandwidth figure on the CPU
    assert run["bandwidth"]["weight_bytes"] > 0


def test_bench_sweep_with_baseline_json_and_plot(run_cli, tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run_cli("bench", *TINY, "--concurrency", "1,3", "--baseline", "--baseline-batch-size", "2",
                     "--json", out, "--plot", png)
    assert result.code == 0, result.stderr
    assert "quantkit bench" in result.stdout and "n/a" in result.stdout
    payload = json.loads(out.read_text())
    assert payload["kind"] == "bench"
    assert payload["setup"]["shape"]["num_layers"] == 8 and payload["setup"]["compute_dtype"] == "float32"
    assert payload["setup"]["kv_cache_tokens"] == 256
    assert payload["workload"]["concurrency"] == [1, 3] and payload["workload"]["request_rate"] is None
    assert payload["device_bandwidth_bytes_per_s"] is None
    tokens = expected_output_tokens(3, (2, 4))
    assert [run["max_concurrency"] for run in payload["runs"]] == [1, 3]
    for run in payload["runs"]:
        check_run(run, 3, tokens)
        assert run["vs_baseline"]["output_tokens_per_s"] == pytest.approx(
            run["output_tokens_per_s"] / payload["baseline"]["output_tokens_per_s"])
    assert payload["runs"][0]["mean_batch"] == pytest.approx(1.0)  # concurrency 1: one request per step
    base = payload["baseline"]
    assert base["num_requests"] == 3 and base["output_tokens"] == tokens and base["batch_size"] == 2
    assert base["generated_tokens"] >= tokens and base["duration_s"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_poisson_arrivals_from_a_text_file_to_stdout(run_cli, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The river flows through the valley and into the sea near the old harbour. " * 20)
    result = run_cli("bench", *TINY, "--request-rate", "50", "--max-concurrency", "2", "--text-file", text,
                     "--json", "-")
    assert result.code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["workload"]["request_rate"] == 50 and payload["workload"]["max_concurrency"] == 2
    assert payload["workload"]["prompts"].startswith("text file")
    (run,) = payload["runs"]
    check_run(run, 3, expected_output_tokens(3, (2, 4)))
    assert run["mean_batch"] <= 2 + 1e-9
    assert payload["baseline"] is None and "vs_baseline" not in run


def test_eval_latency_json(run_cli, tmp_path):
    out = tmp_path / "latency.json"
    result = run_cli("eval", "--latency", "--input-len", "8", "--output-len", "4", "--repetitions", "3",
                     "--json", "--output-json", out)
    assert result.code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert json.loads(out.read_text()) == payload
    assert payload["kind"] == "latency" and payload["baseline"] is None and payload["speedup"] is None
    assert (payload["input_len"], payload["output_len"], payload["repetitions"]) == (8, 4, 3)
    assert payload["output_tokens"] == 3 * 4
    for key in ("ttft_s", "tpot_s", "e2e_s"):
        check_summary(payload[key], 3)
    assert payload["ttft_s"]["max"] < payload["e2e_s"]["max"]
    assert payload["decode_tokens_per_s"] == pytest.approx(1 / payload["tpot_s"]["median"])
    assert payload["e2e_tokens_per_s"] == pytest.approx(4 / payload["e2e_s"]["median"])
    assert payload["bandwidth"]["limit_tokens_per_s"] is None
    assert payload["bandwidth"]["batch"] == 1


def test_eval_latency_with_async_scheduling(run_cli):
    result = run_cli("eval", "--latency", "--input-len", "8", "--output-len", "6", "--repetitions", "2",
                     "--async-scheduling", "--json")
    assert result.code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["setup"]["async_scheduling"] is True and payload["output_tokens"] == 2 * 6


@pytest.mark.parametrize("args, fragments", [
    (["bench", "/nonexistent/model-folder"], ["does not exist"]),
    (["bench", "--input-len-range", "512,100"], ["--input-len-range '512,100'", "minimum 512 is larger"]),
    (["bench", "--output-len-range", "10,x"], ["--output-len-range '10,x' must be MIN,MAX"]),
    (["bench", "--num-requests", "0"], ["--num-requests must be at least 1"]),
    (["bench", "--concurrency", "1,four,16"], ["--concurrency '1,four,16'"]),
    (["bench", "--concurrency", "0,4"], ["positive integers"]),
    (["bench", "--concurrency", "1,4", "--max-concurrency", "2"], ["not both"]),
    (["bench", "--request-rate", "0"], ["--request-rate must be > 0"]),
    (["bench", "--text-file", "/nonexistent/prompts.txt"], ["does not exist"]),
    (["eval", "--latency", "--repetitions", "0"], ["--repetitions must be at least 1"]),
])
def test_bad_input_is_one_line(run_cli, args, fragments):
    assert_clean_failure(run_cli(*args), *fragments)


def test_requests_longer_than_the_context(run_cli):
    result = run_cli("bench", "--num-requests", "2", "--input-len-range", "600,900", "--output-len-range", "100,200")
    assert_clean_failure(result, "exceeds the engine's limit of 1024 tokens per request")


def test_plot_without_matplotlib_fails_before_work(run_cli, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("no matplotlib")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    monkeypatch.setattr(throughput, "run_bench", lambda *a, **k: pytest.fail("the benchmark ran"))
    result = run_cli("bench", *TINY, "--plot", tmp_path / "p.png")
    assert_clean_failure(result, "--plot needs matplotlib", "quantkit[plot]")
    assert not (tmp_path / "p.png").exists()


# ---------------------------------------------------------------------- library pieces
def test_draft_only_reaches_an_engine_that_takes_it(monkeypatch):
    import quantkit.runtime.engine as engine_module

    class Plain:
        def __init__(self, model=None, *, device="cpu", dtype="auto", kv_cache_tokens=None,
                     gpu_memory_utilization=0.9, max_num_seqs=256, max_num_batched_tokens=2048):
            self.model = model

    class Speculative(Plain):
        def __init__(self, model=None, *, draft=None, num_speculative_tokens=None, **options):
            super().__init__(model, **options)
            self.draft, self.k = draft, num_speculative_tokens

    monkeypatch.setattr(engine_module, "Engine", Plain)
    assert open_engine("m").model == "m"
    with pytest.raises(QuantkitError, match="no speculative decoding"):
        open_engine("m", draft="quantkit-draft")
    monkeypatch.setattr(engine_module, "Engine", Speculative)
    engine = open_engine("m", draft="quantkit-draft", num_speculative_tokens=3)
    assert (engine.draft, engine.k) == ("quantkit-draft", 3)


def test_workload_is_seeded_and_in_range():
    config = BenchConfig(num_requests=50, input_len_range=(5, 9), output_len_range=(2, 4), seed=3,
                         request_rate=10.0)
    a, b = make_workload(config, 100, variant=1), make_workload(config, 100, variant=2)
    assert [len(p) for p in a.prompts] == [len(p) for p in b.prompts] and a.output_lens == b.output_lens
    assert a.prompts != b.prompts  # fresh tokens per sweep point
    assert make_workload(config, 100, variant=1).prompts == a.prompts
    assert all(5 <= len(p) <= 9 and all(0 <= t < 100 for t in p) for p in a.prompts)
    assert all(2 <= n <= 4 for n in a.output_lens)
    assert a.arrivals == sorted(a.arrivals) and a.arrivals[0] > 0
    assert 2 < a.arrivals[-1] < 10  # 50 Poisson arrivals at 10/s: about 5 s


def test_parsers_and_summary():
    assert parse_len_range("100,1024", "--x") == (100, 1024) and parse_len_range("7", "--x") == (7, 7)
    assert parse_concurrency("1,4,16,64") == [1, 4, 16, 64]
    with pytest.raises(QuantkitError):
        parse_concurrency("4,4")
    stats = summarize([0.1 * i for i in range(1, 101)])
    assert stats["median"] == pytest.approx(5.05) and stats["p99"] == pytest.approx(9.901)
    timing = RequestTiming(start=1.0, input_len=3, first_token=1.5, finish=2.5, output_len=5)
    assert (timing.ttft, timing.tpot, timing.e2e) == (0.5, 0.25, 1.5)


class _FakeEngine:
    """One token per running request per step; records how many requests were in flight."""

    class _Blocks:
        usage, prefix_cache_queries, prefix_cache_hits = 0.5, 0, 0

    class _Model:
        device = "cpu"

    def __init__(self) -> None:
        self.block_manager, self.model = self._Blocks(), self._Model()
        self.running: dict[str, list] = {}
        self.most_in_flight = 0

    def add_request(self, prompt, params, request_id=None):
        self.running[request_id] = [prompt, params.max_tokens, []]
        self.most_in_flight = max(self.most_in_flight, len(self.running))
        return request_id

    def has_unfinished(self) -> bool:
        return bool(self.running)

    def step(self):
        from types import SimpleNamespace

        outputs = []
        for request_id, (prompt, wanted, tokens) in list(self.running.items()):
            tokens.append(1)
            finished = len(tokens) == wanted
            outputs.append(SimpleNamespace(request_id=request_id, prompt_token_ids=prompt, finished=finished,
                                           outputs=[SimpleNamespace(token_ids=list(tokens))]))
            if finished:
                del self.running[request_id]
        return outputs


def test_run_workload_respects_the_concurrency_cap():
    from quantkit.eval.throughput import run_workload

    workload = Workload([[1, 2, 3]] * 7, [1, 2, 3, 4, 5, 6, 7], [0.0] * 7)
    engine = _FakeEngine()
    run = run_workload(engine, workload, 3, latency_module.time.perf_counter)
    assert engine.most_in_flight == 3
    assert run["output_tokens"] == 28 and run["input_tokens"] == 21 and run["num_requests"] == 7
    assert run["tpot_s"]["count"] == 6  # a one-token request has no time per output token
    assert run["mean_batch"] <= 3
