"""``quantkit serve``: bind, start uvicorn, load the model on the engine thread, drain on SIGTERM.

The socket is bound first (a busy port or a bad host is one clear error before anything loads),
then uvicorn serves at once: ``/health`` answers 503 while the model loads and 200 when it is
ready. A model that fails to load stops the server with the loader's message.

SIGTERM (or Ctrl-C): new requests get 503, requests in flight run on for up to
``shutdown_timeout`` seconds, and whatever is still running then ends with an explicit error (a
503 body, or an error event in the stream); then the engine thread stops and the process exits 0.
A second Ctrl-C exits at once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import time

import uvicorn

from quantkit.errors import QuantkitError

logger = logging.getLogger("quantkit.server")


def bind_socket(host: str, port: int) -> socket.socket:
    if not 0 <= port <= 65535:
        raise QuantkitError(f"--port must be between 0 and 65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise QuantkitError(f"--host '{host}' is not an address this machine can bind: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise QuantkitError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    sock.set_inheritable(True)
    return sock


def engine_in_process(engine_process: bool | None, on_cpu: bool) -> bool:
    """The user's choice, else a process on an accelerator and a thread on the CPU."""
    return (not on_cpu) if engine_process is None else engine_process


def serve(model: str | None, *, draft: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          settings=None, engine_options: dict | None = None, shutdown_timeout: float = 30.0,
          log_level: str = "info", ready_message=print, cpu_threads: int | None = None,
          engine_process: bool | None = None) -> None:
    """Serve ``model`` until SIGTERM/SIGINT; raise ``QuantkitError`` for anything a user can fix.

    On the CPU the engine runs ``cpu_threads`` torch threads, by default one fewer than the
    machine's cores (see ``default_cpu_threads``). With ``engine_process`` the engine runs in a
    child process (``engine_process.ProcessEngine``), so the HTTP work never competes with the
    engine loop for the GIL; None picks it on accelerators and a thread on the CPU (measured on an
    H100, scripts/results/serve_h100*: 9.5% HTTP overhead at saturation in a process, 27% on a
    thread; on a 2-core CPU the thread did better)."""
    from quantkit.models.bundled import resolve_model_path
    from quantkit.server.app import build_app
    from quantkit.server.async_engine import FAILED, AsyncEngine
    from quantkit.server.generation import ServerContext
    from quantkit.server.settings import ServerSettings

    resolve_model_path(model)  # a missing folder is an error now, not after the server started
    if draft is not None:
        resolve_model_path(draft)
    if shutdown_timeout < 0:
        raise QuantkitError(f"--shutdown-timeout must be >= 0, got {shutdown_timeout}")
    if cpu_threads is not None and cpu_threads < 1:
        raise QuantkitError(f"--cpu-threads must be at least 1, got {cpu_threads}")
    on_cpu = str(options_device(engine_options)).startswith("cpu")
    threads = (cpu_threads or default_cpu_threads()) if on_cpu else None
    engine_process = engine_in_process(engine_process, on_cpu)
    settings = (settings or ServerSettings()).check()
    options = dict(engine_options or {})
    options["max_num_seqs"] = settings.max_num_seqs
    if draft is not None:
        options["draft"] = draft
    sock = bind_socket(host, port)
    _configure_logging(log_level)
    if settings.api_key is None and not _is_loopback(host):
        logger.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)

    load = functools.partial(load_engine, model, options, threads, tuple(settings.served_names), log_level)
    if engine_process:
        from quantkit.server.engine_process import ProcessEngine

        async_engine = ProcessEngine(load)
    else:
        async_engine = AsyncEngine(load)
    app = build_app(ServerContext(async_engine, settings), manage_engine=True)
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=shutdown_timeout + 10, timeout_keep_alive=5)
    server = _DrainingServer(config, async_engine, shutdown_timeout)
    async_engine.on_load_failure = lambda problem: setattr(server, "should_exit", True)
    shown = f"[{host}]" if ":" in host else host
    ready_message(f"quantkit serve: http://{shown}:{sock.getsockname()[1]}/v1 (model loading; GET /health "
                  "answers 200 when ready)")
    server.run(sockets=[sock])
    if async_engine.state == FAILED:
        raise QuantkitError(f"the model failed to load: {async_engine.problem}")


def load_engine(model: str | None, options: dict, threads: int | None, served_names: tuple[str, ...],
                log_level: str = "info"):
    """Build the ``Engine`` (on the engine thread, or in the engine process: picklable)."""
    import torch

    from quantkit.runtime.engine import Engine

    _configure_logging(log_level)  # a no-op on the server's thread; the engine process starts bare
    if threads is not None:
        torch.set_num_threads(threads)
        logger.info("CPU: %d torch thread(s) for the engine", threads)
    started = time.perf_counter()
    engine = Engine(model, **options)
    logger.info("model loaded in %.1f s; serving %s", time.perf_counter() - started, ", ".join(served_names))
    return engine


def default_cpu_threads() -> int:
    """Torch threads for a CPU engine behind the server: all cores but one, which the HTTP thread
    (and whatever load generator shares the machine) keeps. OpenMP workers that spin between
    torch ops on every core starve that thread, and it holds the GIL the engine thread needs
    (measured once on the 2-core machine: 64 concurrent streams took 30.6 s with workers spinning
    on both cores, 3.6 s with waits made passive; one thread and no workers ran faster still)."""
    return max(1, (os.cpu_count() or 1) - 1)


def options_device(engine_options: dict | None) -> str:
    return (engine_options or {}).get("device", "cpu")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _configure_logging(level: str) -> None:
    server_logger = logging.getLogger("quantkit.server")
    if not server_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        server_logger.addHandler(handler)
        server_logger.propagate = False
    server_logger.setLevel(level.upper())


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, telling the engine to drain on the first signal."""

    def __init__(self, config: uvicorn.Config, engine, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.engine, self.shutdown_timeout = engine, shutdown_timeout

    @contextlib.contextmanager
    def capture_signals(self):
        """As uvicorn's, without re-raising the signal afterwards: a drained server exits 0."""
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            logger.info("shutting down: refusing new requests, finishing those in flight (up to %g s)",
                        self.shutdown_timeout)
            self.engine.begin_drain(self.shutdown_timeout)
        super().handle_exit(sig, frame)
