"""`quantkit bench serve URL` against the live server: the JSON's figures are measured and
consistent, the workload is the one `quantkit bench MODEL` draws, and the plot is written."""

from __future__ import annotations

import json
import math

import numpy as np

from quantkit.eval.serve_bench import (
    ServeBenchConfig,
    arrival_gaps,
    build_requests,
    parse_rates,
)
from quantkit.eval.throughput import BenchConfig, make_workload

SUMMARY = {"mean", "median", "p99", "min", "max", "count"}


def expected_output_tokens(num_requests: int, input_range, output_range, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    rng.integers(input_range[0], input_range[1] + 1, size=num_requests)
    return int(rng.integers(output_range[0], output_range[1] + 1, size=num_requests).sum())


def test_bench_serve_json_table_and_plot(run_cli, server, tmp_path):
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    result = run_cli("bench", "serve", server.url, "--num-requests", "6", "--input-len-range", "8,16",
                     "--output-len-range", "4,8", "--request-rate", "40,inf", "--max-concurrency", "4",
                     "--json", out, "--plot", png)
    assert result.code == 0, result.stderr
    assert "quantkit bench serve" in result.stdout and "all at once" in result.stdout
    payload = json.loads(out.read_text())
    assert payload["kind"] == "serve_bench" and payload["model"] == "quantkit-target"
    assert payload["workload"]["request_rates"] == [40.0, None]
    tokens = expected_output_tokens(6, (8, 16), (4, 8))
    for run in payload["runs"]:
        assert (run["completed"], run["failed"], run["max_concurrency"]) == (6, 0, 4)
        assert run["output_tokens"] == tokens  # ignore_eos: every request gave exactly its drawn length
        assert 6 * 8 <= run["input_tokens"] <= 6 * 16
        assert math.isclose(run["output_tokens_per_s"], tokens / run["duration_s"])
        assert math.isclose(run["requests_per_s"], 6 / run["duration_s"])
        for key in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert set(run[key]) == SUMMARY and 0 < run[key]["median"] <= run[key]["p99"] <= run[key]["max"]
        assert run["ttft_s"]["count"] == 6 and run["itl_s"]["count"] >= 6
        assert run["ttft_s"]["max"] <= run["e2e_s"]["max"] <= run["duration_s"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_serve_stdout_json_with_a_prompts_file(run_cli, server, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The history of the city"}\n{"prompt": "The river"}\n')
    result = run_cli("bench", "serve", server.base, "--num-requests", "3", "--output-len-range", "3,3",
                     "--prompts-file", prompts, "--json", "-")
    assert result.code == 0, result.stderr
    (run,) = json.loads(result.stdout)["runs"]
    assert run["completed"] == 3 and run["output_tokens"] == 9 and run["input_tokens"] == 5 + 2 + 5


def test_same_workload_as_the_offline_bench():
    config = ServeBenchConfig(url="http://x", num_requests=5, input_len_range=(3, 9), output_len_range=(2, 5), seed=4)
    offline = make_workload(BenchConfig(num_requests=5, input_len_range=(3, 9), output_len_range=(2, 5), seed=4),
                            100, variant=1)
    requests = build_requests(config, 100)
    assert [r.prompt for r in requests] == offline.prompts
    assert [r.output_len for r in requests] == offline.output_lens


def test_rates_and_arrivals():
    assert parse_rates("1, 2.5,inf") == [1.0, 2.5, math.inf]
    gaps = arrival_gaps(10.0, 2000, seed=0)
    assert abs(np.mean(gaps) - 0.1) < 0.01 and arrival_gaps(math.inf, 3, 0) == [0.0, 0.0, 0.0]
