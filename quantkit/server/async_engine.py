"""The engine's own thread, and the asyncio side that talks to it.

``Engine`` is synchronous and not thread-safe, so one thread owns it: it loads the model, admits
requests, calls ``step()`` while there is work and hands every output to the request's
``OutputStream`` on that request's event loop (``call_soon_threadsafe``, one call per loop per
step). Handlers talk to it only through a thread-safe inbox: ``submit`` (add a request), ``abort``
(a client went away), ``begin_drain`` and ``stop`` (shutdown). Outputs are cumulative (each
carries every token so far), so a stream keeps only the newest and a slow reader loses nothing.

Faults. A bad request is refused before it reaches the engine (the handlers validate, and
``add_request`` refusing one fails that one). A step that raises cannot say which request caused
it, so the thread isolates the cause: it aborts every request in the engine (which frees their
KV blocks and closes the half-done step), checks the engine is empty and whole again, then
replays the suspects in halves, each half alone, to completion; a half that fails again is split
again, and a request that fails on its own is the one that fails, with a 500. The others finish
normally. A replayed request restarts from its prompt; when tokens of it were already streamed
to the client, the replay must reproduce them (greedy, or seeded sampling) and resumes the
stream where it stopped; a streamed request sampled without a seed cannot be replayed and fails
with a message saying so. After ``MAX_CONSECUTIVE_FAILURES`` failed steps in a row the engine is
declared broken: everything fails with 503 and ``/health`` says so.

No request is dropped silently: every submission ends with its final output or an ``APIError``
(client gone, shutdown, failure), which is also what releases its place under the queue limit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from quantkit.errors import QuantkitError
from quantkit.runtime.outputs import RequestOutput
from quantkit.runtime.sampling_params import SamplingParams
from quantkit.server.errors import (
    RATE_LIMIT,
    APIError,
    bad_request,
    internal,
    unavailable,
)
from quantkit.server.metrics import ServerMetrics

logger = logging.getLogger("quantkit.server")

LOADING, READY, FAILED, BROKEN, STOPPED = "loading", "ready", "failed", "broken", "stopped"
MAX_CONSECUTIVE_FAILURES = 32
IDLE_WAIT_S = 0.5  # how often an idle engine thread checks its drain deadline


class OutputStream:
    """The loop side of one request: the newest output, or the error that ended it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_end: Callable[[], None]) -> None:
        self.loop = loop
        self._on_end = on_end
        self._ready = asyncio.Event()
        self._latest: RequestOutput | None = None
        self._taken: RequestOutput | None = None
        self.error: APIError | None = None
        self.ended = False  # the final output or an error has arrived

    def deliver(self, output: RequestOutput | None, error: APIError | None) -> None:
        """Runs on ``loop``."""
        if self.ended:
            return
        if error is not None:
            self.error = error
        else:
            self._latest = output
        if error is not None or output.finished:
            self.ended = True
            self._on_end()
        self._ready.set()

    async def next(self) -> RequestOutput:
        """The newest output not yet returned; raises the ``APIError`` that ended the request."""
        while True:
            if self.error is not None:
                raise self.error
            if self._latest is not None and self._latest is not self._taken:
                self._taken = self._latest
                return self._taken
            if self.ended:
                raise internal("the request already ended")  # a caller bug; never wait forever
            self._ready.clear()
            await self._ready.wait()


@dataclass
class _Submission:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    streaming: bool
    stream: OutputStream
    arrival: float  # perf_counter when the server accepted the request


@dataclass
class _Live:
    """Engine-thread bookkeeping of one accepted request."""

    sub: _Submission
    counted_prompt: bool = False
    tokens_seen: int = 0  # output tokens already counted in the metrics
    first_token_at: float | None = None
    last_token_at: float | None = None
    last_sent: RequestOutput | None = None  # the newest output handed to a streaming reader
    resume_from: RequestOutput | None = None  # during a replay: what the reader already has

    @property
    def request_id(self) -> str:
        return self.sub.request_id


@dataclass
class _Inbox:
    queue: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def put(self, *command) -> None:
        self.queue.put(command)


class EngineHandle:
    """What the server sees of an engine, wherever it runs (``AsyncEngine``: a thread of this
    process; ``engine_process.ProcessEngine``: a child process): its state, what it serves, and
    how many requests it holds."""

    def __init__(self, loader: Callable[[], object], metrics: ServerMetrics,
                 on_load_failure: Callable[[str], None] | None) -> None:
        self._loader = loader
        self.metrics = metrics
        self.on_load_failure = on_load_failure
        self.engine = None
        self.state = LOADING
        self.problem: str | None = None  # why the engine is not serving (failed, broken)
        self.accepting = True
        self.tokenizer = None
        self.max_model_len = 0  # longest request (prompt + output) the engine takes
        self.vocab_size = 0
        self.tokenizer_size = 0
        self._loaded = threading.Event()
        self._in_flight = 0
        self._closed = False  # the engine has ended: nothing sent to it is read

    def wait_loaded(self, timeout: float | None = None) -> bool:
        return self._loaded.wait(timeout)

    @property
    def ready(self) -> bool:
        return self.state == READY

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _admit_locked(self, limit: int | None) -> None:
        """Count one more request in flight, or refuse it: 503 once closed, 429 at ``limit``. The
        caller holds the lock that guards the count."""
        if self._closed:
            raise unavailable("the server is shutting down", code="shutting_down")
        if limit is not None and self._in_flight >= limit:
            raise APIError(429, f"the server is at its limit of {limit} requests in flight; retry later",
                           RATE_LIMIT, code="queue_full", headers={"Retry-After": "1"})
        self._in_flight += 1


class AsyncEngine(EngineHandle):
    """Owns an ``Engine`` on one thread; ``loader()`` builds it there (the server answers
    ``/health`` with 503 until it has)."""

    def __init__(self, loader: Callable[[], object], metrics: ServerMetrics | None = None,
                 on_load_failure: Callable[[str], None] | None = None) -> None:
        super().__init__(loader, metrics or ServerMetrics(), on_load_failure)
        self._inbox = _Inbox()
        self._thread = threading.Thread(target=self._run, name="quantkit-engine", daemon=True)
        self._count_lock = threading.Lock()  # guards _in_flight, _closed and the order of adds
        # Engine-thread state.
        self._pending: deque[_Submission] = deque()
        self._live: dict[str, _Live] = {}
        self._quarantine: deque[list[_Live]] = deque()
        self._drain_deadline: float | None = None
        self._stopping = False
        self._step_failures = 0
        self._consecutive_failures = 0
        self._publish()

    # ================================================================== any thread
    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    def begin_drain(self, timeout: float) -> None:
        """Refuse new requests; abort whatever is still running ``timeout`` seconds from now."""
        self.accepting = False
        self._inbox.put("drain", time.monotonic() + timeout)

    def stop(self, timeout: float | None = None) -> None:
        """End every request still in flight (with a 503) and stop the thread."""
        self.accepting = False
        self._inbox.put("stop")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ================================================================== event-loop side
    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams, streaming: bool,
               limit: int | None = None) -> OutputStream:
        """Queue a validated request; refuse it (503 or 429) when the engine cannot take it."""
        self.check_serving()
        stream = OutputStream(asyncio.get_running_loop(), self._release)
        with self._count_lock:  # the engine thread's last drain of the inbox happens under it too
            self._admit_locked(limit)
            self._inbox.put("add", _Submission(request_id, prompt_ids, params, streaming, stream,
                                               time.perf_counter()))
        return stream

    def abort(self, request_id: str) -> None:
        """The client went away: stop the request and free its KV blocks (on the engine thread)."""
        self._inbox.put("abort", request_id)

    def check_serving(self) -> None:
        if self.state == LOADING:
            raise unavailable("the model is still loading; retry when GET /health answers 200", code="loading")
        if self.state != READY:
            raise unavailable(f"the engine is not serving: {self.problem or self.state}", code="engine_unavailable")
        if not self.accepting:
            raise unavailable("the server is shutting down", code="shutting_down")

    def _release(self) -> None:
        with self._count_lock:
            self._in_flight -= 1

    # ================================================================== engine thread
    def _run(self) -> None:
        try:
            engine = self._loader()
        except BaseException as error:  # noqa: BLE001 - reported, and the server stops
            self.problem = f"{error}" if isinstance(error, QuantkitError) else f"{type(error).__name__}: {error}"
            self.state = FAILED
            logger.error("loading the model failed: %s", self.problem)
            self._loaded.set()
            self._publish()
            with self._count_lock:
                self._closed = True
                self._fail_everything(unavailable(f"the model failed to load: {self.problem}", code="load_failed"))
            if self.on_load_failure is not None:
                self.on_load_failure(self.problem)
            return
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.scheduler.max_model_len
        self.vocab_size = int(engine.model.config.vocab_size)
        self.tokenizer_size = len(engine.tokenizer) if engine.tokenizer is not None else 0
        self.state = READY
        self._loaded.set()
        self._publish()
        try:
            self._loop()
        except BaseException:
            logger.exception("the engine thread failed")
            self.state, self.problem = BROKEN, "the engine thread failed (see the server log)"
        finally:
            if self.state == READY:
                self.state = STOPPED
            with self._count_lock:  # no submission can slip into the inbox after this last drain
                self._closed = True
                self._fail_everything(unavailable("the server stopped before this request finished",
                                                  code="shutting_down"))
            self._publish()

    def _loop(self) -> None:
        while True:
            busy = bool(self._pending or self._live or self._quarantine)
            if self._stopping:
                return
            self._take_commands(block=not busy)
            if self._stopping:
                return
            self._check_drain_deadline()
            if self.state != READY:
                self._fail_everything(unavailable(f"the engine is not serving: {self.problem}",
                                                  code="engine_unavailable"))
                continue
            self._admit()
            if self._live:
                self._step()
            self._publish()

    # ------------------------------------------------------------------ commands
    def _take_commands(self, block: bool) -> None:
        inbox = self._inbox.queue
        try:
            command = inbox.get(timeout=IDLE_WAIT_S) if block else inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(command)
            try:
                command = inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            self._pending.append(command[1])
        elif kind == "abort":
            self._abort(command[1])
        elif kind == "drain":
            self._drain_deadline = command[1]
        elif kind == "stop":
            self._stopping = True

    def _abort(self, request_id: str) -> None:
        gone = APIError(499, "the client closed the connection", code="client_closed")
        for sub in self._pending:
            if sub.request_id == request_id:
                self._pending.remove(sub)
                self.metrics.record_finish("abort", None)
                self._send([(sub.stream, None, gone)])
                return
        live = self._live.pop(request_id, None)
        if live is None:
            for group in self._quarantine:
                live = next((m for m in group if m.request_id == request_id), None)
                if live is not None:
                    group.remove(live)
                    break
            self._quarantine = deque(group for group in self._quarantine if group)
        else:
            self._engine_abort(request_id)
        if live is not None:
            self.metrics.record_finish("abort", None)
            self._publish()
            self._send([(live.sub.stream, None, gone)])

    def _check_drain_deadline(self) -> None:
        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
            self._drain_deadline = None
            if self._pending or self._live or self._quarantine:
                logger.warning("shutdown: aborting the requests still in flight")
            self._fail_everything(unavailable("the server shut down before this request finished",
                                              code="shutting_down"))

    # ------------------------------------------------------------------ admission
    def _admit(self) -> None:
        if self._quarantine:
            if not self._live:  # the previous group has finished: probe the next one alone
                for live in self._quarantine.popleft():
                    self._start(live)
            return
        while self._pending:
            self._start(_Live(self._pending.popleft()))

    def _start(self, live: _Live) -> None:
        sub = live.sub
        try:
            self.engine.add_request(sub.prompt_ids, sub.params, request_id=sub.request_id)
        except QuantkitError as error:
            self._fail(live, bad_request(str(error)), "rejected")
            return
        except Exception as error:
            logger.exception("add_request failed for %s", sub.request_id)
            self._fail(live, internal(f"the engine refused the request: {type(error).__name__}: {error}"),
                       "rejected")
            return
        if not live.counted_prompt:
            live.counted_prompt = True
            self.metrics.prompt_tokens.inc(len(sub.prompt_ids))
        self._live[sub.request_id] = live

    # ------------------------------------------------------------------ stepping
    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:  # noqa: BLE001 - isolated below
            self._on_step_failure(error)
            return
        self._consecutive_failures = 0
        now = time.perf_counter()
        deliveries = []
        generated = 0
        for output in outputs:
            live = self._live.get(output.request_id)
            if live is not None:
                generated += self._on_output(live, output, now, deliveries)
        if generated:
            self.metrics.generation_tokens.inc(generated)  # once a step, not once a request
        if self._live and not self.engine.has_unfinished():  # never leave a reader waiting forever
            for live in list(self._live.values()):
                self._fail(live, internal("the engine finished without completing this request"), "lost")
            self._live.clear()
        self._publish()  # before the readers hear of it, so /metrics never lags what they saw
        self._send(deliveries)

    def _on_output(self, live: _Live, output: RequestOutput, now: float, deliveries: list) -> int:
        """Hand ``output`` on (into ``deliveries``); the number of new tokens it brings."""
        tokens = sum(len(sample.token_ids) for sample in output.outputs)
        generated = 0
        if tokens > live.tokens_seen:
            if live.first_token_at is None:
                live.first_token_at = now
                self.metrics.record_ttft(now - live.sub.arrival)
            else:
                self.metrics.record_itl(now - live.last_token_at)
            generated = tokens - live.tokens_seen
            live.tokens_seen, live.last_token_at = tokens, now
        if live.resume_from is not None:
            verdict = _compare_replay(live.resume_from, output)
            if verdict == "diverged":
                self._live.pop(live.request_id, None)
                self._engine_abort(live.request_id)
                self._fail(live, internal("generation was interrupted by an engine failure and its replay "
                                          "diverged from the tokens already streamed"), "replay_diverged")
                return generated
            if verdict == "behind":
                return generated
            live.resume_from = None
        if output.finished:
            del self._live[live.request_id]
            reason = output.outputs[0].finish_reason if output.outputs else "stop"
            self.metrics.record_finish(reason or "stop", now - live.sub.arrival)
            deliveries.append((live.sub.stream, output, None))
        elif live.sub.streaming:
            live.last_sent = output
            deliveries.append((live.sub.stream, output, None))
        return generated

    # ------------------------------------------------------------------ faults
    def _on_step_failure(self, error: Exception) -> None:
        self._step_failures += 1
        self._consecutive_failures += 1
        suspects = list(self._live.values())
        self._live.clear()
        logger.error("engine step failed with %d request(s) in it: %s: %s", len(suspects), type(error).__name__,
                     error, exc_info=logger.isEnabledFor(logging.DEBUG))
        if not self._reset(suspects):
            self._break("the engine could not be brought back to a clean state after a failed step")
            return
        if self._consecutive_failures >= MAX_CONSECUTIVE_FAILURES:
            self._break(f"{self._consecutive_failures} engine steps failed in a row (last: "
                        f"{type(error).__name__}: {error})")
            return
        if len(suspects) == 1:
            self._fail(suspects[0], internal(f"generation failed: {type(error).__name__}: {error}"),
                       "generation_error")
            return
        resumable = []
        for live in suspects:
            if _can_replay(live):
                live.resume_from = live.last_sent
                resumable.append(live)
            else:
                self._fail(live, internal("generation was interrupted by an engine failure (caused by another "
                                          "request) and, sampled without a seed after tokens were streamed, "
                                          "cannot be resumed"), "not_resumable")
        half = (len(resumable) + 1) // 2
        groups = [g for g in (resumable[:half], resumable[half:]) if g]
        self._quarantine.extendleft(reversed(groups))

    def _reset(self, suspects: list[_Live]) -> bool:
        """Abort every suspect and close the step that raised; True when the engine is empty and
        all its KV blocks are free again."""
        engine = self.engine
        try:
            for live in suspects:
                engine.abort(live.request_id)
            engine.scheduler.update({})  # the raised step's sequences are all aborted: nothing to apply
            manager = engine.block_manager
            return not engine.has_unfinished() and manager.num_free_blocks == manager.num_blocks
        except Exception:
            logger.exception("resetting the engine after a failed step failed")
            return False

    def _break(self, why: str) -> None:
        logger.error("engine broken: %s", why)
        self.state, self.problem = BROKEN, why
        self._fail_everything(unavailable(f"the engine is broken ({why}); restart the server",
                                          code="engine_broken"))

    def _engine_abort(self, request_id: str) -> None:
        try:
            self.engine.abort(request_id)
        except Exception:
            logger.exception("aborting %s failed", request_id)

    def _fail(self, live: _Live, error: APIError, cause: str) -> None:
        self.metrics.record_failure(cause)
        self._send([(live.sub.stream, None, error)])

    def _fail_everything(self, error: APIError) -> None:
        doomed = [*self._pending, *(live.sub for live in self._live.values()),
                  *(live.sub for group in self._quarantine for live in group)]
        if self.engine is not None:
            for request_id in list(self._live):
                self._engine_abort(request_id)
        while True:  # requests still in the inbox
            try:
                command = self._inbox.queue.get_nowait()
            except queue.Empty:
                break
            if command[0] == "add":
                doomed.append(command[1])
            elif command[0] == "stop":
                self._stopping = True
        self._pending.clear()
        self._live.clear()
        self._quarantine.clear()
        for _ in doomed:
            self.metrics.record_failure(error.code or "unavailable")
        self._send([(sub.stream, None, error) for sub in doomed])

    # ------------------------------------------------------------------ delivery and state
    @staticmethod
    def _send(items: list[tuple[OutputStream, RequestOutput | None, APIError | None]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for item in items:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, batch)
            except RuntimeError:  # that server's loop has closed: nobody is listening
                pass

    def _publish(self) -> None:
        snap = {"ready": self.state == READY, "step_failures": self._step_failures}
        engine = self.engine
        queued = len(self._pending) + sum(len(group) for group in self._quarantine)
        if engine is None:
            snap["waiting"] = queued
            self.metrics.snapshot = snap
            return
        scheduler, manager = engine.scheduler, engine.block_manager
        running = len({seq.request_id for seq in scheduler.running})
        snap.update(running=running, waiting=queued + max(0, len(self._live) - running),
                    kv_usage=manager.usage, kv_blocks=manager.num_blocks,
                    prefix_hit_rate=manager.prefix_cache_hit_rate, prefix_queries=manager.prefix_cache_queries,
                    prefix_hits=manager.prefix_cache_hits, preemptions=scheduler.num_preemptions)
        spec = getattr(engine, "spec_metrics", None)
        if spec is not None:
            snap["spec"] = spec.as_dict()
        self.metrics.snapshot = snap


def _deliver_all(batch: list) -> None:
    for stream, output, error in batch:
        stream.deliver(output, error)


def _can_replay(live: _Live) -> bool:
    """A request can restart from its prompt unless its reader already has tokens that a replay
    would not reproduce (sampling without a seed)."""
    if not live.sub.streaming or live.last_sent is None:
        return True
    params = live.sub.params
    return params.temperature == 0 or params.seed is not None


def _compare_replay(sent: RequestOutput, output: RequestOutput) -> str:
    """"behind" until every sample has regenerated what was streamed, then "caught_up";
    "diverged" if any regenerated token differs (or a sample ends early)."""
    fresh = {sample.index: sample for sample in output.outputs}
    verdict = "caught_up"
    for old in sent.outputs:
        new = fresh.get(old.index)
        if new is None:
            if output.finished:
                return "diverged"
            verdict = "behind"
            continue
        common = min(len(old.token_ids), len(new.token_ids))
        if new.token_ids[:common] != old.token_ids[:common]:
            return "diverged"
        if len(new.token_ids) < len(old.token_ids):
            if new.finish_reason is not None:
                return "diverged"
            verdict = "behind"
    return verdict
