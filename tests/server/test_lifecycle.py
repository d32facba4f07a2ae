"""Loading (503, then 200), a model that fails to load, SIGTERM on a real `quantkit serve`
process (in-flight requests finish or end with an explicit error, then exit 0), and the
command's one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from quantkit.errors import QuantkitError
from quantkit.server.app import build_app
from quantkit.server.async_engine import AsyncEngine
from quantkit.server.generation import ServerContext
from quantkit.server.settings import ServerSettings

from .conftest import MODEL, LiveServer, assert_error_body


class _IdleEngine:
    """Just enough of an Engine for health checks: loaded, empty, never stepped."""

    def __init__(self) -> None:
        self.tokenizer = None
        self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=100))
        self.scheduler = SimpleNamespace(max_model_len=64, running=[], num_preemptions=0)
        self.block_manager = SimpleNamespace(usage=0.0, num_blocks=4, num_free_blocks=4, prefix_cache_hit_rate=0.0,
                                             prefix_cache_queries=0, prefix_cache_hits=0)

    def has_unfinished(self) -> bool:
        return False


def test_health_is_503_while_loading_then_200():
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return _IdleEngine()

    engine = AsyncEngine(slow_loader)
    live = LiveServer(build_app(ServerContext(engine, ServerSettings(served_names=["m"])), manage_engine=True))
    try:
        with httpx.Client(base_url=live.base, timeout=10) as session:
            loading = session.get("/health")
            assert loading.status_code == 503 and loading.json() == {"status": "loading"}
            early = session.post("/v1/completions", json={"model": "m", "prompt": [1], "max_tokens": 1})
            assert_error_body(early, 503, code="loading", fragment="still loading")
            assert early.headers["retry-after"] == "1"
            release.set()
            assert engine.wait_loaded(10)
            assert session.get("/health").json() == {"status": "ok"}
            assert session.get("/v1/models").json()["data"][0]["max_model_len"] == 64
    finally:
        release.set()
        live.stop()


def test_a_model_that_fails_to_load_is_reported():
    def broken_loader():
        raise QuantkitError("model folder 'nowhere' does not exist")

    failures = []
    engine = AsyncEngine(broken_loader, on_load_failure=failures.append)
    live = LiveServer(build_app(ServerContext(engine, ServerSettings(served_names=["m"])), manage_engine=True))
    try:
        assert engine.wait_loaded(10)
        with httpx.Client(base_url=live.base, timeout=10) as session:
            health = session.get("/health")
            assert health.status_code == 503
            assert health.json() == {"status": "failed", "detail": "model folder 'nowhere' does not exist"}
            refused = session.post("/v1/completions", json={"model": "m", "prompt": [1]})
            assert_error_body(refused, 503, code="engine_unavailable", fragment="does not exist")
        assert failures == ["model folder 'nowhere' does not exist"]
    finally:
        live.stop()


# ---------------------------------------------------------------------- a real process
def _start_serve(*args: str) -> tuple[subprocess.Popen, str, list[str]]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "quantkit", "serve", "--port", "0", *args],
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    log: list[str] = []
    found = threading.Event()
    base = []

    def read():
        for line in process.stderr:
            log.append(line)
            match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
            if match and not base:
                base.append(match.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    assert found.wait(60), "".join(log)
    return process, base[0], log


def _stream_in_thread(base: str, body: dict, out: dict) -> threading.Thread:
    def run():
        events, first = [], out.setdefault("first", threading.Event())
        try:
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as response:
                out["status"] = response.status_code
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        first.set()
        except httpx.HTTPError as error:
            out["exception"] = repr(error)
        out["events"] = events
        first.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_sigterm_finishes_or_aborts_in_flight_requests_and_exits():
    process, base, log = _start_serve("--kv-cache-tokens", "4096", "--shutdown-timeout", "3")
    try:
        deadline = time.monotonic() + 60
        statuses = set()
        while time.monotonic() < deadline:
            try:
                status = httpx.get(base + "/health", timeout=5).status_code
            except httpx.TransportError:
                status = None
            statuses.add(status)
            if status == 200:
                break
            time.sleep(0.05)
        assert 200 in statuses, "".join(log)
        short, long = {}, {}
        threads = [
            _stream_in_thread(base, {"model": MODEL, "prompt": "The city", "max_tokens": 16, "stream": True,
                                     "temperature": 0, "ignore_eos": True}, short),
            _stream_in_thread(base, {"model": MODEL, "prompt": "The river", "max_tokens": 1000, "stream": True,
                                     "temperature": 0, "ignore_eos": True}, long),
        ]
        assert long.setdefault("first", threading.Event()).wait(30)
        assert short.setdefault("first", threading.Event()).wait(30)
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:  # a new request during the drain is refused, never left hanging
            late = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                              timeout=10)
            assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
        except httpx.TransportError:
            pass  # the listening socket is already closed
        for thread in threads:
            thread.join(30)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert short["status"] == 200 and short["events"][-1] == "[DONE]"
    finals = [json.loads(e)["choices"][0]["finish_reason"] for e in short["events"][:-1]]
    assert finals[-1] == "length"  # finished normally inside the drain window
    assert sum(1 for e in short["events"][:-1] if json.loads(e)["choices"][0]["text"]) >= 2
    assert long["status"] == 200 and long["events"][-1] == "[DONE]"
    error = json.loads(long["events"][-2])["error"]
    assert error["code"] == "shutting_down" and "shut down before this request finished" in error["message"]
    text = "".join(log)
    assert "Traceback" not in text and "shutting down" in text


# ---------------------------------------------------------------------- command-line errors
def _clean_failure(result, *fragments):
    assert result.code == 2, (result.code, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


def test_serve_command_errors(run_cli):
    _clean_failure(run_cli("serve", "/nonexistent/model"), "does not exist")
    _clean_failure(run_cli("serve", "--log-level", "loud"), "--log-level 'loud'")
    _clean_failure(run_cli("serve", "--num-speculative-tokens", "3"), "needs --draft")
    _clean_failure(run_cli("serve", "--max-n", "0"), "--max-n must be at least 1")
    _clean_failure(run_cli("serve", "--host", "no.such.host.invalid"), "--host 'no.such.host.invalid'")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        _clean_failure(run_cli("serve", "--port", str(busy.getsockname()[1])), "cannot listen on 127.0.0.1")


@pytest.mark.parametrize("args, fragment", [
    (["bench", "serve", "ftp://x"], "must start with http://"),
    (["bench", "serve", "http://127.0.0.1:9", "--request-rate", "0"], "--request-rate '0'"),
    (["bench", "serve", "http://127.0.0.1:9", "--num-requests", "0"], "--num-requests must be at least 1"),
    (["bench", "serve", "http://127.0.0.1:9"], "cannot reach the server"),
])
def test_bench_serve_errors(run_cli, args, fragment):
    _clean_failure(run_cli(*args), fragment)
