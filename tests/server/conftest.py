"""A live server for the server tests: the bundled target on the CPU, loaded once per session,
served by uvicorn on a free port of 127.0.0.1 in a background thread. Extra servers (another
API key, other limits) share the same engine thread."""

from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest
import uvicorn

from quantkit.server.app import build_app
from quantkit.server.async_engine import AsyncEngine
from quantkit.server.generation import ServerContext
from quantkit.server.settings import ServerSettings

MODEL = "quantkit-target"
KV_CACHE_TOKENS = 8192


class LiveServer:
    def __init__(self, app) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + "/v1"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the test server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="package")
def shared_engine():
    """One engine thread for the package. torch runs one intra-op thread meanwhile: this process
    also runs the HTTP server and the clients, and OpenMP workers spinning between torch ops on
    every core would starve them (`quantkit serve` leaves a core free the same way)."""
    import torch

    from quantkit.runtime.engine import Engine

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = AsyncEngine(lambda: Engine(MODEL, kv_cache_tokens=KV_CACHE_TOKENS)).start()
    assert engine.wait_loaded(120) and engine.ready, engine.problem
    yield engine
    engine.stop(30)
    torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def server(shared_engine):
    live = LiveServer(build_app(ServerContext(shared_engine, ServerSettings(served_names=[MODEL])),
                                manage_engine=False))
    yield live
    live.stop()


@pytest.fixture
def make_server(shared_engine):
    """Start another server on the shared engine with other settings; stopped after the test."""
    started = []

    def make(**settings) -> LiveServer:
        live = LiveServer(build_app(ServerContext(shared_engine, ServerSettings(served_names=[MODEL], **settings)),
                                    manage_engine=False))
        started.append(live)
        return live

    yield make
    for live in started:
        live.stop()


@pytest.fixture(scope="package")
def client(server):
    from openai import OpenAI

    with OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60) as openai_client:
        yield openai_client


@pytest.fixture(scope="package")
def http(server):
    with httpx.Client(base_url=server.base, timeout=60) as session:
        yield session


def engine_is_idle(engine: AsyncEngine, timeout: float = 5.0) -> bool:
    """True once the engine holds no request and every KV block is free (waits up to timeout)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inner = engine.engine
        manager = inner.block_manager
        if (engine.in_flight == 0 and not inner.has_unfinished()
                and manager.num_free_blocks == manager.num_blocks):
            return True
        time.sleep(0.02)
    return False


def assert_error_body(response: httpx.Response, status: int, *, param=None, code=None, fragment=None) -> dict:
    """An OpenAI-style error body with exactly the four fields, and no traceback."""
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    if fragment is not None:
        assert fragment in error["message"], error
    return error
