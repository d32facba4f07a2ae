"""The engine in its own process (``quantkit serve --engine-process``): the same answers as the
engine thread, token for token (streamed with log-probabilities, chat, seeded samples),
concurrent streams, a disconnect frees the KV blocks in the engine process, a stop ends what is
in flight with an error, and an engine process that dies fails its requests and says so."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time

import httpx
import pytest

from quantkit.server.app import build_app
from quantkit.server.engine_process import ProcessEngine
from quantkit.server.generation import ServerContext
from quantkit.server.launch import load_engine
from quantkit.server.settings import ServerSettings

from .conftest import KV_CACHE_TOKENS, MODEL, LiveServer
from .test_concurrency import all_at_once, prompts
from .test_faults import metric

C = "/v1/completions"


def start_process_server() -> tuple[LiveServer, ProcessEngine]:
    engine = ProcessEngine(functools.partial(load_engine, MODEL, {"kv_cache_tokens": KV_CACHE_TOKENS}, 1, (MODEL,),
                                             "warning"))
    live = LiveServer(build_app(ServerContext(engine, ServerSettings(served_names=[MODEL])), manage_engine=True))
    assert engine.wait_loaded(120) and engine.ready, engine.problem
    return live, engine


@pytest.fixture(scope="module")
def process_server():
    live, engine = start_process_server()
    yield live
    live.stop()
    assert not engine._process.is_alive()


def stream_events(base: str, body: dict) -> list[dict]:
    with httpx.Client(base_url=base, timeout=60) as session, session.stream("POST", C, json=body) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def comparable(events: list[dict]) -> list:
    return [(c["index"], c["text"], c["finish_reason"], c["logprobs"]) for e in events for c in e["choices"]] + \
        [e.get("usage") for e in events if e.get("usage")]


@pytest.mark.parametrize("body", [
    {"prompt": "The river", "max_tokens": 24, "temperature": 0, "logprobs": 0, "stream": True,
     "stream_options": {"include_usage": True}},
    {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.8, "seed": 7, "n": 2, "stream": True,
     "logprobs": 0},
    {"prompt": "The city was founded in", "max_tokens": 40, "temperature": 0, "stop": [" the"], "stream": True},
])
def test_streams_equal_the_engine_threads(process_server, server, body):
    body = {"model": MODEL, **body}
    assert comparable(stream_events(process_server.base, body)) == comparable(stream_events(server.base, body))


def test_chat_and_plain_answers_equal_the_engine_threads(process_server, server):
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Name a river."}], "max_tokens": 12,
            "temperature": 0, "logprobs": True}
    plain = {"model": MODEL, "prompt": [5, 6, 7, 8], "max_tokens": 10, "temperature": 0}
    for path, body in (("/v1/chat/completions", chat), (C, plain)):
        a = httpx.post(process_server.base + path, json=body, timeout=60).json()
        b = httpx.post(server.base + path, json=body, timeout=60).json()
        assert a["choices"] == b["choices"] and a["usage"] == b["usage"]


def test_concurrent_streams_equal_their_solo_runs(process_server):
    texts = prompts()[:24]
    together = asyncio.run(all_at_once(process_server.base, texts))
    for text, (streamed, count) in zip(texts, together):
        alone = httpx.post(process_server.base + C, json={"model": MODEL, "prompt": text, "max_tokens": 8,
                                                          "temperature": 0, "ignore_eos": True}, timeout=60).json()
        assert streamed == alone["choices"][0]["text"] and count == 8


def test_disconnect_frees_the_kv_blocks_in_the_engine_process(process_server):
    http = httpx.Client(base_url=process_server.base, timeout=30)
    aborted = metric(http, 'quantkit_request_success_total{finished_reason="abort"}')
    body = {"model": MODEL, "prompt": "word " * 300, "max_tokens": 600, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.Client(base_url=process_server.base, timeout=30) as session, \
            session.stream("POST", C, json=body) as response:
        events = (line for line in response.iter_lines() if line.startswith("data: "))
        for _ in range(3):
            next(events)
        assert metric(http, "quantkit_kv_cache_usage_perc") > 0
    deadline = time.monotonic() + 5
    while metric(http, "quantkit_kv_cache_usage_perc") > 0 or metric(http, "quantkit_num_requests_running") > 0:
        assert time.monotonic() < deadline, "the aborted request still holds KV blocks"
        time.sleep(0.05)
    assert metric(http, 'quantkit_request_success_total{finished_reason="abort"}') == aborted + 1
    http.close()


def test_an_engine_process_that_dies_fails_its_requests_and_health_says_so():
    live, engine = start_process_server()
    try:
        body = {"model": MODEL, "prompt": "The river", "max_tokens": 600, "ignore_eos": True, "stream": True,
                "temperature": 0}
        with httpx.Client(base_url=live.base, timeout=30) as session, session.stream("POST", C, json=body) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            next(lines)
            os.kill(engine._process.pid, signal.SIGKILL)
            rest = list(lines)
        assert rest[-1] == "data: [DONE]" and "error" in json.loads(rest[-2][6:])
        health = httpx.get(live.base + "/health", timeout=10)
        assert health.status_code == 503 and "exited unexpectedly" in health.json()["detail"]
        refused = httpx.post(live.base + C, json={"model": MODEL, "prompt": "x", "max_tokens": 2}, timeout=10)
        assert refused.status_code == 503
    finally:
        live.stop()


def test_stopping_ends_what_is_in_flight_with_an_error():
    live, engine = start_process_server()
    body = {"model": MODEL, "prompt": "The river", "max_tokens": 600, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with httpx.Client(base_url=live.base, timeout=30) as session, session.stream("POST", C, json=body) as response:
        lines = (line for line in response.iter_lines() if line.startswith("data: "))
        next(lines)
        engine.stop(30)
        rest = list(lines)
    live.stop()
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "shutting_down"
    assert not engine._process.is_alive() and engine._process.exitcode == 0


def test_writer_sends_what_queued_up_as_one_message():
    """Commands queued while the writer waits on the pipe go out together, in order, and the
    queueing side never waits on the pipe."""
    import threading

    engine = ProcessEngine(functools.partial(load_engine, MODEL, {}, 1, (MODEL,), "warning"))  # never started
    release, sent = threading.Event(), []

    class SlowPipe:
        def send(self, message):
            if not sent:
                release.wait(10)  # the first send waits as on a full pipe
            sent.append(message)

    engine._commands = SlowPipe()
    engine._writer.start()
    started = time.perf_counter()
    engine._send(("abort", "a"))
    time.sleep(0.05)  # the writer is now inside the first send
    for name in ("b", "c", "d"):
        engine._send(("abort", name))
    assert time.perf_counter() - started < 1
    release.set()
    engine._send(("stop",))
    engine._writer.join(10)
    assert not engine._writer.is_alive()
    flat = [m for message in sent for m in (message[1] if message[0] == "batch" else [message])]
    assert flat == [("abort", "a"), ("abort", "b"), ("abort", "c"), ("abort", "d"), ("stop",)]
    assert len(sent) < len(flat)


def test_the_engine_runs_in_a_process_on_accelerators_and_on_a_thread_on_the_cpu_unless_told():
    from quantkit.server.launch import engine_in_process

    assert engine_in_process(None, on_cpu=False) is True
    assert engine_in_process(None, on_cpu=True) is False
    assert engine_in_process(False, on_cpu=False) is False
    assert engine_in_process(True, on_cpu=True) is True
