"""Which tokens of which sequences the next forward pass computes.

One rule per step, as vLLM's V1 scheduler states it: every unfinished sequence is behind by some
tokens (a prompt chunk, its last sampled token, or that token plus k draft tokens to verify), and
the step hands out tokens under a budget of ``max_num_batched_tokens``:

1. running sequences that are decoding (behind by one token) get ``1 + k`` tokens, oldest first,
   so a long prompt never stalls them;
2. running sequences still in their prompt get the next chunk (chunked prefill), oldest first;
3. if nobody was preempted, waiting sequences join first-come-first-served, each with its first
   prompt chunk after whatever prefix the block manager finds cached.

When blocks run out, a draft count or a prompt chunk first shrinks to what fits; if not even one
token fits, the most recently arrived running sequence not yet scheduled in this step is preempted
by recompute: its blocks are freed, its tokens (prompt and output so far) kept, and it goes to the
front of the waiting queue, where its whole token list is later run again as a prompt. A sequence
may preempt itself that way; nothing is ever lost and the scheduler never fails on memory.

Driving it (the engine's loop)::

    out = scheduler.schedule(num_lookahead=k)        # k drafts per decoding sequence, or a dict
    ... run the copies in out.block_copies, then the model on out.scheduled ...
    finished = scheduler.update({seq_id: new_token_ids, ...})

For each ``ScheduledSeq`` the model computes positions ``start_position .. start_position +
num_new_tokens - 1``; the tokens there are ``seq.token_ids_between(...)`` followed, for a decode with
``num_lookahead`` drafts, by the drafts. Slots come from ``BlockManager.slots_for``. Only a sequence
with ``samples`` set gets new tokens in ``update``: one, or ``1..num_lookahead+1`` after
speculative verification (accepted drafts then the correction or bonus token).

Interface notes beyond the brief: ``schedule`` also accepts a ``{seq_id: k}`` mapping;
``ScheduledSeq`` has the extra fields ``num_lookahead`` and ``samples``; ``fork`` makes parallel
samples; ``update`` returns the sequences that finished in it.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from quantkit.errors import QuantkitError
from quantkit.runtime.block_manager import BlockCopy, BlockManager
from quantkit.runtime.sequence import FINISH_STATUS, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    """``num_new_tokens`` tokens of ``seq`` from position ``start_position`` go into this step."""

    seq: Sequence
    num_new_tokens: int
    start_position: int
    num_lookahead: int = 0  # of num_new_tokens, how many are draft tokens (decodes only)
    samples: bool = field(init=False)  # whether this step yields new tokens for seq

    def __post_init__(self) -> None:
        end = self.start_position + self.num_new_tokens - self.num_lookahead
        self.samples = end >= self.seq.num_tokens

    @property
    def num_logits(self) -> int:
        """Positions whose logits the sampler needs: the last ``1 + num_lookahead``, or none."""
        return self.num_lookahead + 1 if self.samples else 0


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)  # batch order
    preempted: list[Sequence] = field(default_factory=list)
    block_copies: list[BlockCopy] = field(default_factory=list)  # do these before the forward

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def _age(seq: Sequence) -> tuple[float, int]:
    return (seq.arrival_time, seq.seq_id)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_batched_tokens: int = 2048,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,
        eos_token_id: int | Iterable[int] | None = None,
    ):
        capacity = block_manager.num_blocks * block_manager.block_size
        self.max_model_len = capacity if max_model_len is None else max_model_len
        _check_limits(max_num_batched_tokens, max_num_seqs, self.max_model_len, capacity)
        self.block_manager = block_manager
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.eos_token_ids = _as_id_set(eos_token_id)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0
        self._by_request: dict[str, list[Sequence]] = {}
        self._pending: dict[int, ScheduledSeq] = {}  # scheduled, awaiting update()

    # ------------------------------------------------------------ requests
    def add(self, seq: Sequence) -> None:
        """Queue a sequence; refuse a prompt that the context cannot hold."""
        if seq.num_prompt_tokens == 0:
            raise QuantkitError(f"request {seq.request_id!r} has an empty prompt")
        if seq.num_tokens > self.max_model_len:
            raise QuantkitError(
                f"request {seq.request_id!r}: the prompt has {seq.num_tokens} tokens, longer than "
                f"the model's context of max_model_len = {self.max_model_len} tokens")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._by_request.setdefault(seq.request_id, []).append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every sequence of the request at once and free its blocks."""
        seqs = list(self._by_request.get(request_id, ()))
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` ("stop", "length" or "abort"): drop it from the queues and free its blocks."""
        if seq.is_finished:
            return
        seq.status = FINISH_STATUS[reason]
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        siblings = self._by_request.get(seq.request_id, [])
        if seq in siblings:
            siblings.remove(seq)
        if not siblings:
            self._by_request.pop(seq.request_id, None)

    def fork(self, parent: Sequence, child_seq_id: int, sample_index: int | None = None) -> Sequence:
        """A parallel sample of ``parent`` sharing its blocks (copy-on-write).

        Called between ``schedule`` and ``update`` on a parent scheduled in that step, the child
        counts as scheduled too: pass its own sampled token(s) in ``update``. May exceed
        ``max_num_seqs`` for a while.
        """
        if parent.is_finished:
            raise ValueError(f"cannot fork finished seq {parent.seq_id}")
        manager = self.block_manager if parent.block_table else None
        child = parent.fork(child_seq_id, manager, sample_index)
        self._by_request.setdefault(child.request_id, []).append(child)
        if parent.status is SequenceStatus.RUNNING:
            bisect.insort(self.running, child, key=_age)
            sched = self._pending.get(parent.seq_id)
            if sched is not None:
                self._pending[child.seq_id] = ScheduledSeq(
                    child, sched.num_new_tokens, sched.start_position, sched.num_lookahead)
        else:
            self.waiting.insert(self.waiting.index(parent) + 1, child)
        return child

    # ------------------------------------------------------------ queries
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ------------------------------------------------------------ schedule
    def schedule(self, num_lookahead: int | Mapping[int, int] = 0) -> SchedulerOutput:
        """Pick this step's tokens; ``num_lookahead`` drafts per decoding sequence (int or by seq_id)."""
        if self._pending:
            raise RuntimeError("call update() with the results of the last schedule() first")
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        decoding = [s for s in self.running if s.num_tokens - s.num_computed_tokens == 1]
        prefilling = [s for s in self.running if s.num_tokens - s.num_computed_tokens > 1]
        for seq in decoding:
            budget = self._schedule_running(seq, budget, _lookahead(num_lookahead, seq), out)
        for seq in prefilling:
            budget = self._schedule_running(seq, budget, 0, out)
        if not out.preempted:
            self._schedule_waiting(budget, out)
        self._pending = {s.seq.seq_id: s for s in out.scheduled}
        return out

    def _schedule_running(self, seq: Sequence, budget: int, k: int, out: SchedulerOutput) -> int:
        if budget <= 0 or seq.status is not SequenceStatus.RUNNING:
            return budget  # out of budget, or preempted earlier in this step
        behind = seq.num_tokens - seq.num_computed_tokens
        if behind == 1 and seq.num_output_tokens > 0:
            want = 1 + self._clip_lookahead(seq, k, budget)
        else:
            want = min(behind, budget)
        granted = self._reserve(seq, want, out)
        if granted:
            drafts = granted - 1 if behind == 1 and seq.num_output_tokens > 0 else 0
            out.scheduled.append(ScheduledSeq(seq, granted, seq.num_computed_tokens, drafts))
        return budget - granted

    def _clip_lookahead(self, seq: Sequence, k: int, budget: int) -> int:
        """Drafts worth verifying: within the budget, the context and the tokens still allowed."""
        room_in_context = self.max_model_len - seq.num_tokens
        tokens_left = seq.params.max_tokens - seq.num_output_tokens - 1
        return max(0, min(k, budget - 1, room_in_context, tokens_left))

    def _reserve(self, seq: Sequence, want: int, out: SchedulerOutput) -> int:
        """Allocate slots for up to ``want`` tokens of a running seq, preempting if need be.

        Returns the number granted: ``want`` or fewer when blocks are short, 0 when ``seq``
        itself had to be preempted.
        """
        scheduled = {s.seq.seq_id for s in out.scheduled}
        while True:
            granted = self._largest_fit(seq, want)
            if granted:
                out.block_copies += self.block_manager.allocate_for(seq, granted)
                return granted
            victim = next(s for s in reversed(self.running) if s.seq_id not in scheduled)
            self._preempt(victim, out)
            if victim is seq:
                return 0

    def _largest_fit(self, seq: Sequence, want: int) -> int:
        """The most tokens in 1..want that the free blocks can take (0 if not even one)."""
        can = self.block_manager.can_allocate
        if can(seq, want):
            return want
        lo, hi = 0, want - 1  # answer in [lo, hi]; can(seq, lo) holds or lo == 0
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if can(seq, mid):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def _schedule_waiting(self, budget: int, out: SchedulerOutput) -> None:
        manager = self.block_manager
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            want = min(seq.num_tokens - manager.lookup_prefix(seq), budget)
            if not manager.can_allocate(seq, want):
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            out.block_copies += manager.allocate_for(seq, want)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_age)
            out.scheduled.append(ScheduledSeq(seq, want, seq.num_computed_tokens))
            budget -= want

    def resume_decodes(self, scheduled: list[ScheduledSeq]) -> None:
        """Mark decodes that were launched ahead of the last ``update`` as this step's schedule
        (asynchronous scheduling: their blocks are allocated, their input is the last sampled token)."""
        if self._pending:
            raise RuntimeError("call update() with the results of the last schedule() first")
        self._pending = {s.seq.seq_id: s for s in scheduled}

    # ------------------------------------------------------------ update
    def update(self, outputs: Mapping[int, Iterable[int]]) -> list[Sequence]:
        """Record the step's new tokens (by seq_id); return the sequences that finished.

        A sequence whose scheduled tokens were a prompt chunk short of the end gets no tokens.
        A stop token id, the end-of-sequence token (unless ``ignore_eos``), ``max_tokens`` or the
        context length ends a sequence; tokens after the end are dropped, the ending token is kept.
        """
        pending, self._pending = self._pending, {}
        unknown = set(outputs) - set(pending)
        if unknown:
            raise ValueError(f"tokens for seqs that were not scheduled: {sorted(unknown)}")
        finished = []
        for seq_id, sched in pending.items():
            seq = sched.seq
            if seq.is_finished:
                continue  # aborted or stopped since schedule()
            tokens = list(outputs.get(seq_id, ()))
            self._advance(sched, tokens)
            reason = self._append(seq, tokens)
            # Register full blocks even when finishing: a follow-up turn may reuse them.
            self.block_manager.mark_computed(seq, seq.num_computed_tokens)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _advance(self, sched: ScheduledSeq, tokens: list[int]) -> None:
        seq = sched.seq
        if not sched.samples:
            if tokens:
                raise ValueError(f"seq {seq.seq_id}: a prompt chunk before the last yields no token")
            seq.num_computed_tokens += sched.num_new_tokens
            return
        if not 1 <= len(tokens) <= sched.num_lookahead + 1:
            raise ValueError(f"seq {seq.seq_id}: expected 1..{sched.num_lookahead + 1} new tokens, "
                             f"got {len(tokens)}")
        rejected = sched.num_lookahead - (len(tokens) - 1)  # their KV is garbage, to be overwritten
        seq.num_computed_tokens += sched.num_new_tokens - rejected

    def _append(self, seq: Sequence, tokens: list[int]) -> str | None:
        for token in tokens:
            seq.output_token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                return reason
        return None

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        params = seq.params
        if token in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token in self.eos_token_ids:
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None


def _lookahead(num_lookahead: int | Mapping[int, int], seq: Sequence) -> int:
    if isinstance(num_lookahead, Mapping):
        return num_lookahead.get(seq.seq_id, 0)
    return num_lookahead


def _as_id_set(ids: int | Iterable[int] | None) -> frozenset[int]:
    if ids is None:
        return frozenset()
    if isinstance(ids, int):
        return frozenset((ids,))
    return frozenset(ids)


def _check_limits(max_batched: int, max_seqs: int, max_model_len: int, capacity: int) -> None:
    if max_batched < 1:
        raise QuantkitError(f"max_num_batched_tokens = {max_batched} must be >= 1")
    if max_seqs < 1:
        raise QuantkitError(f"max_num_seqs = {max_seqs} must be >= 1")
    if max_model_len < 1:
        raise QuantkitError(f"max_model_len = {max_model_len} must be >= 1")
    if max_model_len > capacity:
        raise QuantkitError(
            f"the KV cache holds {capacity} tokens, fewer than max_model_len = {max_model_len}; "
            f"give it more blocks or lower max_model_len")
