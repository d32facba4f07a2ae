"""Faults: a client that disconnects (mid-stream or while waiting) has its sequence aborted and
its KV blocks freed at once; a failure inside one request's generation fails that request only
(the others finish with exactly the output they would have had); a refused add fails only its
request."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from quantkit.runtime import stop_strings

from .conftest import MODEL, engine_is_idle

C = "/v1/completions"
POISON = "<<poison>>"


def metric(http, name: str) -> float:
    for line in http.get("/metrics").text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def blocks_held(shared_engine) -> int:
    manager = shared_engine.engine.block_manager
    return manager.num_blocks - manager.num_free_blocks


def test_disconnect_mid_stream_frees_kv_blocks(server, http, shared_engine):
    aborted = metric(http, 'quantkit_request_success_total{finished_reason="abort"}')
    payload = {"model": MODEL, "prompt": "word " * 300, "max_tokens": 600, "ignore_eos": True, "stream": True,
               "temperature": 0}
    with httpx.Client(base_url=server.base, timeout=30) as session, \
            session.stream("POST", C, json=payload) as response:
        assert response.status_code == 200
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            assert json.loads(next(events)[6:])["choices"][0]["finish_reason"] is None
        held = blocks_held(shared_engine)
        assert held >= 300 // 16  # the long prompt's KV is in the cache while it streams
    # leaving the block closed the connection mid-stream
    t0 = time.perf_counter()
    assert engine_is_idle(shared_engine, timeout=5)
    freed_after = time.perf_counter() - t0
    assert blocks_held(shared_engine) == 0 and freed_after < 2
    assert metric(http, 'quantkit_request_success_total{finished_reason="abort"}') == aborted + 1
    assert metric(http, "quantkit_kv_cache_usage_perc") == 0


def test_disconnect_while_waiting_for_a_non_streaming_answer(server, shared_engine):
    payload = {"model": MODEL, "prompt": "The river", "max_tokens": 1000, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(server.base + C, json=payload, timeout=httpx.Timeout(30, read=0.5))
    assert engine_is_idle(shared_engine, timeout=5)
    assert blocks_held(shared_engine) == 0


def _greedy(prompt: str, **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, **extra}


PROMPTS = ["The history of the city", "In 1990, the band released", "Photosynthesis is the process",
           "The river flows through the valley"]


def _run_together(base: str, payloads: list[dict]) -> list[tuple[int, str, str | None]]:
    """Send all payloads at once; per request: (status, text, error message)."""
    results = [None] * len(payloads)
    barrier = threading.Barrier(len(payloads))

    def one(index: int) -> None:
        payload = payloads[index]
        barrier.wait()
        with httpx.Client(base_url=base, timeout=60) as session:
            if not payload.get("stream"):
                response = session.post(C, json=payload)
                data = response.json()
                if response.status_code != 200:
                    results[index] = (response.status_code, "", data["error"]["message"])
                else:
                    results[index] = (200, data["choices"][0]["text"], None)
                return
            text, error = "", None
            with session.stream("POST", C, json=payload) as response:
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        error = chunk["error"]["message"]
                    else:
                        text += chunk["choices"][0]["text"]
            results[index] = (response.status_code, text, error)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(payloads))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


@pytest.fixture
def poisoned_stop_checker(monkeypatch):
    """The engine's stop-string check raises for any request with the POISON stop string once it
    has 4 tokens: a fault inside one request's generation, in the middle of a batched step."""
    original = stop_strings.StopChecker.check

    def check(self, token_ids):
        if POISON in self.stops and len(token_ids) >= 4:
            raise RuntimeError("injected fault in one request")
        return original(self, token_ids)

    monkeypatch.setattr(stop_strings.StopChecker, "check", check)


@pytest.mark.parametrize("poison_streams", [True, False], ids=["poisoned-stream", "poisoned-json"])
def test_failure_in_one_request_fails_only_that_request(server, http, shared_engine, poisoned_stop_checker,
                                                        poison_streams):
    reference = [httpx.post(server.base + C, json=_greedy(p), timeout=60).json()["choices"][0]["text"]
                 for p in PROMPTS]
    failures_before = metric(http, "quantkit_engine_step_failures_total")
    generation_errors = metric(http, 'quantkit_request_failure_total{cause="generation_error"}')
    payloads = [_greedy(p, stream=i % 2 == 0) for i, p in enumerate(PROMPTS)]
    payloads.append(_greedy("A poisoned request", stop=[POISON], stream=poison_streams))
    results = _run_together(server.base, payloads)
    for (status, text, error), expected in zip(results[:-1], reference):
        assert (status, error) == (200, None)
        assert text == expected  # replayed after the fault, yet exactly what it would have been
    status, text, error = results[-1]
    if poison_streams:
        assert status == 200 and "injected fault in one request" in error
        assert len(text) > 0  # its first tokens had been streamed before the fault
    else:
        assert status == 500 and "injected fault in one request" in error
    assert metric(http, "quantkit_engine_step_failures_total") > failures_before
    assert metric(http, 'quantkit_request_failure_total{cause="generation_error"}') == generation_errors + 1
    assert engine_is_idle(shared_engine) and shared_engine.ready
    assert http.get("/health").status_code == 200


def test_a_request_the_engine_refuses_fails_alone(server, shared_engine, monkeypatch):
    inner = shared_engine.engine
    original = inner.add_request

    def add_request(prompt, params, request_id=None):
        if params.max_tokens == 7:
            raise RuntimeError("refused by the engine")
        return original(prompt, params, request_id=request_id)

    monkeypatch.setattr(inner, "add_request", add_request)
    payloads = [_greedy(p) for p in PROMPTS[:3]] + [_greedy("x", max_tokens=7)]
    results = _run_together(server.base, payloads)
    assert [r[0] for r in results] == [200, 200, 200, 500]
    assert "refused by the engine" in results[-1][2]
    assert engine_is_idle(shared_engine)


def test_unseeded_sampling_cannot_resume_but_says_so(server, shared_engine, poisoned_stop_checker):
    """A streamed request sampled without a seed cannot be replayed after another request's fault:
    it ends with an explicit error event, never silently."""
    sampled = {"model": MODEL, "prompt": "The river", "max_tokens": 40, "temperature": 1.0, "ignore_eos": True,
               "stream": True}
    results = _run_together(server.base, [sampled, _greedy("A poisoned one", stop=[POISON], max_tokens=40)])
    assert results[0][0] == 200 and results[1][0] == 500
    assert "injected fault" in results[1][2]
    sampled_error = results[0][2]
    assert sampled_error is None or "cannot be resumed" in sampled_error  # None: it finished before the fault
    assert engine_is_idle(shared_engine)
