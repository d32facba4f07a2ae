"""The engine in its own process (as vLLM V1 runs its EngineCore): ``ProcessEngine`` has
``AsyncEngine``'s interface, and the ``AsyncEngine`` engine thread (with its admission, fault
isolation and replay, drain and stop) runs in a child process, so the server's per-token work
(SSE chunks, JSON, socket writes, asyncio) never holds the GIL the engine loop needs.

Wire (two one-way pipes, pickled tuples):

* to the child: ``("add", request_id, prompt_ids, params, streaming, arrival)``, ``("abort", id)``,
  ``("drain", monotonic deadline)``, ``("stop",)``, ``("metrics", http_error_counts)``, or
  ``("batch", [command, ...])``: the parent's writer thread sends whatever queued up while it was
  sending the previous message as one (a burst of requests is a few messages, not one each, and
  the event loop never waits on a full pipe);
* from the child: ``("loaded", info)`` or ``("failed", problem)`` once; then one
  ``("out", items, state, problem)`` per engine step (every request's news of that step in one
  message): an item is ``(request_id, finished, samples, error)`` where each sample is sent as
  a delta against what that request was last sent, ``(index, keep, new_tokens, new_logprobs,
  text_keep, new_text, finish_reason)``; ``("metrics", text)`` answers a scrape.

The parent rebuilds each request's cumulative ``RequestOutput`` and hands it to the request's
``OutputStream`` exactly as ``AsyncEngine`` does. The child ignores SIGINT and SIGTERM (the
parent drains it) and stops when its command pipe closes, so it never outlives the server. If
the child dies, every request in flight fails with a 503 and ``/health`` says why.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable

from quantkit.runtime.outputs import CompletionOutput, RequestOutput
from quantkit.server.async_engine import (
    BROKEN,
    FAILED,
    READY,
    STOPPED,
    AsyncEngine,
    EngineHandle,
    OutputStream,
    _Submission,
)
from quantkit.server.errors import APIError, unavailable
from quantkit.server.metrics import ServerMetrics

logger = logging.getLogger("quantkit.server")
METRICS_TIMEOUT_S = 10.0


# ====================================================================== child process
class _Remote:
    """The child's stand-in for a request's ``OutputStream``: its deliveries go to the pipe."""

    __slots__ = ("loop", "request_id")

    def __init__(self, request_id: str, loop: _PipeLoop) -> None:
        self.request_id, self.loop = request_id, loop


class _PipeLoop:
    """Takes ``AsyncEngine._send``'s one batch per step (``call_soon_threadsafe``) and sends it as
    one message of deltas."""

    def __init__(self, conn, core: AsyncEngine) -> None:
        self.conn, self.core = conn, core
        self.lock = threading.Lock()  # the engine thread and the command thread both send
        self.sent: dict[str, dict[int, tuple[list[int], list[float], str]]] = {}

    def call_soon_threadsafe(self, _callback, batch) -> None:
        items = []
        for stream, output, error in batch:
            request_id = stream.request_id
            if error is not None:
                self.sent.pop(request_id, None)
                items.append((request_id, True, None, (error.status, error.message, error.type, error.param,
                                                       error.code, error.headers)))
                continue
            before = self.sent.get(request_id) or {}
            now, samples = {}, []
            for sample in output.outputs:
                tokens, logprobs, text = sample.token_ids, sample.logprobs, sample.text
                old_tokens, old_logprobs, old_text = before.get(sample.index, _EMPTY)
                keep = _common(old_tokens, tokens)
                keep_lp = -1 if logprobs is None else _common(old_logprobs, logprobs)
                keep_text = len(old_text) if text.startswith(old_text) else _common_text(old_text, text)
                samples.append((sample.index, keep, tokens[keep:], None if logprobs is None else logprobs[keep_lp:],
                                keep_lp, keep_text, text[keep_text:], sample.finish_reason))
                now[sample.index] = (tokens, logprobs or [], text)
            if output.finished:
                self.sent.pop(request_id, None)
            else:
                self.sent[request_id] = now
            items.append((request_id, output.finished, samples, None))
        self.send(("out", items, self.core.state, self.core.problem))

    def send(self, message) -> None:
        with self.lock:
            try:
                self.conn.send(message)
            except (BrokenPipeError, OSError):  # the parent is gone: the command pipe's EOF stops us
                pass


_EMPTY: tuple[list, list, str] = ([], [], "")


def _common(old: list, new: list) -> int:
    """The length of the common prefix of two lists (all of ``old``, normally)."""
    n = len(old)
    if n <= len(new) and new[:n] == old:
        return n
    return _common_text(old, new)


def _common_text(old, new) -> int:
    """The length of the common prefix of two sequences, element by element."""
    k = 0
    for a, b in zip(old, new):
        if a != b:
            break
        k += 1
    return k


def _child_main(loader: Callable[[], object], commands, outputs) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent drains and stops this process
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    core = AsyncEngine(loader)
    pipe = _PipeLoop(outputs, core)
    core.start()
    core.wait_loaded()
    if core.state != READY:
        pipe.send(("failed", core.problem or core.state))
        return
    tokenizer = core.tokenizer
    pipe.send(("loaded", {"tokenizer": tokenizer, "max_model_len": core.max_model_len, "vocab_size": core.vocab_size,
                          "tokenizer_size": core.tokenizer_size}))
    while True:
        try:
            command = commands.recv()
        except (EOFError, OSError):
            command = ("stop",)
        for one in (command[1] if command[0] == "batch" else (command,)):
            if not _child_command(core, pipe, one):
                return


def _child_command(core: AsyncEngine, pipe: _PipeLoop, command: tuple) -> bool:
    """Carry out one command; False once the engine has stopped."""
    kind = command[0]
    if kind == "add":
        _, request_id, prompt_ids, params, streaming, arrival = command
        core._inbox.put("add", _Submission(request_id, prompt_ids, params, streaming, _Remote(request_id, pipe),
                                           arrival))
    elif kind == "abort":
        core.abort(command[1])
    elif kind == "drain":
        core.accepting = False
        core._inbox.put("drain", command[1])
    elif kind == "metrics":
        core.metrics.http_error_counts = dict(command[1])
        pipe.send(("metrics", core.metrics.render()))
    elif kind == "stop":
        core.stop(None)  # fails what is still in flight (sent as errors), then the thread ends
        pipe.send(("out", [], core.state, core.problem))
        return False
    return True


# ====================================================================== parent process
class _RemoteMetrics(ServerMetrics):
    """The parent's metrics: HTTP errors counted here, everything else rendered by the child."""

    def __init__(self, engine: ProcessEngine) -> None:
        super().__init__()
        self._engine = engine

    def render(self) -> bytes:
        return self._engine._render_metrics()


class _Request:
    __slots__ = ("samples", "stream")

    def __init__(self, stream: OutputStream) -> None:
        self.stream = stream
        self.samples: dict[int, tuple[list[int], list[float] | None, str]] = {}


class ProcessEngine(EngineHandle):
    """``AsyncEngine``'s interface over an engine in a child process. ``loader`` must be picklable
    (a top-level function or a ``functools.partial`` of one): the child calls it to build the
    ``Engine``."""

    def __init__(self, loader: Callable[[], object], metrics=None,
                 on_load_failure: Callable[[str], None] | None = None) -> None:
        super().__init__(loader, _RemoteMetrics(self), on_load_failure)  # the Engine itself lives in the child
        self._lock = threading.Lock()  # guards _requests, _in_flight, _closed and sends to the child
        self._requests: dict[str, _Request] = {}
        self._metrics_reply: tuple[threading.Event, list] | None = None
        self._metrics_lock = threading.Lock()
        context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
        self._commands_read, self._commands = context.Pipe(duplex=False)
        self._outputs, self._outputs_write = context.Pipe(duplex=False)
        self._process = context.Process(target=_child_main, name="quantkit-engine",
                                        args=(loader, self._commands_read, self._outputs_write), daemon=True)
        self._reader = threading.Thread(target=self._read, name="quantkit-engine-reader", daemon=True)
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # commands for the writer thread
        self._writer = threading.Thread(target=self._write, name="quantkit-engine-writer", daemon=True)

    # ================================================================== any thread
    def start(self) -> ProcessEngine:
        self._process.start()
        self._commands_read.close()  # the child's ends
        self._outputs_write.close()
        self._reader.start()
        self._writer.start()
        return self

    def begin_drain(self, timeout: float) -> None:
        self.accepting = False
        self._send(("drain", time.monotonic() + timeout))

    def stop(self, timeout: float | None = None) -> None:
        self.accepting = False
        self._send(("stop",))
        if self._reader.is_alive() and threading.current_thread() is not self._reader:
            self._reader.join(timeout)
        self._process.join(5 if timeout is None else max(1.0, timeout))
        if self._process.is_alive():
            logger.warning("the engine process did not stop: terminating it")
            self._process.terminate()
            self._process.join(5)

    # ================================================================== event-loop side
    def submit(self, request_id: str, prompt_ids: list[int], params, streaming: bool,
               limit: int | None = None) -> OutputStream:
        self.check_serving()
        stream = OutputStream(asyncio.get_running_loop(), self._release)
        with self._lock:
            self._admit_locked(limit)
            self._requests[request_id] = _Request(stream)
            self._send_locked(("add", request_id, prompt_ids, params, streaming, time.perf_counter()))
        return stream

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))

    def check_serving(self) -> None:
        AsyncEngine.check_serving(self)

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _send(self, message) -> None:
        with self._lock:
            self._send_locked(message)

    def _send_locked(self, message) -> None:
        if not self._closed:
            self._outbox.put(message)  # never blocks: the writer thread waits on the pipe

    # ================================================================== writer thread
    def _write(self) -> None:
        """Sends the commands in order, everything queued since the last send as one message."""
        outbox, broken = self._outbox, False
        while True:
            message = outbox.get()
            if message is None:
                return
            batch = [message]
            while True:
                try:
                    batch.append(outbox.get_nowait())
                except queue.Empty:
                    break
            last = batch[-1] is None
            batch = [m for m in batch if m is not None]
            if batch and not broken:
                try:
                    self._commands.send(batch[0] if len(batch) == 1 else ("batch", batch))
                except (BrokenPipeError, OSError):
                    broken = True  # the reader sees the child's end and fails what is in flight
            if last or any(m[0] == "stop" for m in batch):
                return

    def _render_metrics(self) -> bytes:
        """The child's metrics text (a round trip; a scrape while the child is gone gets the
        parent's own)."""
        with self._metrics_lock:
            done, box = threading.Event(), []
            self._metrics_reply = (done, box)
            self._send(("metrics", dict(self.metrics.http_error_counts)))
            if not done.wait(METRICS_TIMEOUT_S) or not box:
                self._metrics_reply = None
                return ServerMetrics.render(self.metrics)
            return box[0]

    # ================================================================== reader thread
    def _read(self) -> None:
        try:
            first = self._outputs.recv()
        except (EOFError, OSError):
            first = ("failed", f"the engine process exited while loading (exit code {self._exitcode()})")
        if first[0] == "failed":
            self.problem, self.state = str(first[1]), FAILED
            logger.error("loading the model failed: %s", self.problem)
            self._loaded.set()
            self._end(unavailable(f"the model failed to load: {self.problem}", code="load_failed"))
            if self.on_load_failure is not None:
                self.on_load_failure(self.problem)
            return
        info = first[1]
        self.tokenizer = info["tokenizer"]
        self.max_model_len, self.vocab_size = info["max_model_len"], info["vocab_size"]
        self.tokenizer_size = info["tokenizer_size"]
        self.state = READY
        self._loaded.set()
        while True:
            try:
                message = self._outputs.recv()
            except (EOFError, OSError):
                break
            if message[0] == "out":
                self._deliver(message[1])
                state, problem = message[2], message[3]
                if state != self.state and self.state == READY:
                    self.state, self.problem = state, problem
            elif message[0] == "metrics":
                reply = self._metrics_reply
                if reply is not None:
                    reply[1].append(message[1])
                    reply[0].set()
        if self.state == READY:
            if self._process.is_alive():
                self._process.join(5)
            code = self._exitcode()
            if self.accepting or code not in (0, None):
                self.state, self.problem = BROKEN, f"the engine process exited unexpectedly (exit code {code})"
                logger.error("%s", self.problem)
            else:
                self.state = STOPPED
        self._end(unavailable(f"the engine is not serving: {self.problem or self.state}",
                              code="engine_unavailable"))

    def _exitcode(self):
        return self._process.exitcode

    def _end(self, error: APIError) -> None:
        """No more outputs will come: fail every request still waiting for one."""
        with self._lock:
            self._closed = True
            left = list(self._requests.values())
            self._requests.clear()
        if self._metrics_reply is not None:
            self._metrics_reply[0].set()
        self._outbox.put(None)  # ends the writer thread
        _send_to_loops([(request.stream, None, error) for request in left])

    def _deliver(self, items: list) -> None:
        deliveries = []
        requests = self._requests
        for request_id, finished, samples, error in items:
            request = requests.get(request_id)
            if request is None:
                continue
            if error is not None:
                status, message, kind, param, code, headers = error
                deliveries.append((request.stream, None, APIError(status, message, kind, param=param, code=code,
                                                                  headers=headers)))
                with self._lock:
                    requests.pop(request_id, None)
                continue
            outputs = []
            for index, keep, new_tokens, new_logprobs, keep_lp, keep_text, new_text, reason in samples:
                old_tokens, old_logprobs, old_text = request.samples.get(index, _EMPTY)
                tokens = [*old_tokens[:keep], *new_tokens]
                logprobs = None if new_logprobs is None else [*old_logprobs[:keep_lp], *new_logprobs]
                text = old_text[:keep_text] + new_text
                request.samples[index] = (tokens, logprobs or [], text)
                outputs.append(CompletionOutput(index, tokens, text, reason, logprobs))
            if finished:
                with self._lock:
                    requests.pop(request_id, None)
            deliveries.append((request.stream, RequestOutput(request_id, [], outputs, finished), None))
        _send_to_loops(deliveries)


def _send_to_loops(items: list) -> None:
    AsyncEngine._send(items)
