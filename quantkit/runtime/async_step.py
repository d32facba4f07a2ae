"""Asynchronous scheduling: launch decode step N+1 before step N's tokens reach the host.

In a steady run of plain decode steps (every running sequence decoding one token, nobody waiting,
no speculation, no parallel-sample fork, no block copy, no preemption), the engine's host work of
step N (reading its sampled tokens, updating the sequences, stop checks, scheduling, staging)
otherwise leaves the GPU idle between steps. Here, as in vLLM's async scheduling, step N+1 is
launched first: its input tokens are step N's sampled-token tensor, copied on the device into the
next step's input buffer; its positions, slots and lengths are step N's plus one, its blocks
allocated one token ahead. Only then are step N's tokens read (that sync overlaps step N+1's GPU
work) and applied. A sequence that finished at step N (stop id or string, max tokens, abort) has
one extra token computed in step N+1: it is discarded, and its KV slot went back with its blocks
when it finished. Outputs are those of the synchronous engine, token for token: greedy rows are
deterministic, seeded rows draw from their own generator in the same order, logprobs come from
the same logits (unseeded sampled rows draw from the shared generator, whose stream shifts when a
discarded row is in the batch; the distribution is unchanged).

Any other step runs the synchronous path (``Engine._plain_step``); a step launched ahead that the
engine cannot continue (a request arrived, an abort, blocks short, context or token limits) is
simply applied, and the next ``step`` schedules as usual.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from quantkit.runtime.outputs import RequestOutput
from quantkit.runtime.scheduler import ScheduledSeq, SchedulerOutput
from quantkit.runtime.sequence import Sequence


@dataclass
class _Launched:
    """A decode step whose tokens are still on the device."""

    seqs: list[Sequence]
    positions: list[int]  # the position each sequence computes in this step
    tokens: torch.Tensor  # (B,) int64, sampled, on the device
    host_tokens: torch.Tensor  # their copy on the host (pinned, filled once ``ready`` has passed)
    host_logprobs: torch.Tensor | None  # (B,) float32, when a sequence wants logprobs
    ready: torch.cuda.Event | None  # recorded after the copies (CUDA only)

    def live(self) -> list[int]:
        """Rows whose sequence has not finished (a stop at the step before, or an abort)."""
        return [row for row, seq in enumerate(self.seqs) if not seq.is_finished]


class AsyncStepper:
    def __init__(self, engine) -> None:
        self.engine = engine
        self._inflight: _Launched | None = None
        self.num_overlapped_steps = 0  # steps launched before the previous step's tokens were read
        self.num_sync_steps = 0  # steps that took the synchronous path

    # ------------------------------------------------------------------ the step
    def step(self) -> list[RequestOutput]:
        scheduler = self.engine.scheduler
        cur, self._inflight = self._inflight, None
        if cur is not None and all(seq.is_finished for seq in cur.seqs):  # all aborted since launch
            scheduler.update({})
            cur = None
        if cur is None:
            out = scheduler.schedule()
            if out.is_empty:
                return []
            if not self._is_steady(out):
                self.num_sync_steps += 1
                return self.engine._plain_step(out)
            cur = self._launch_scheduled(out)
        live = cur.live()
        nxt = self._launch_ahead(cur, live) if self._can_continue(cur, live) else None
        outputs = self._apply(cur)
        if nxt is not None:
            live = [ScheduledSeq(seq, 1, pos) for seq, pos in zip(nxt.seqs, nxt.positions) if not seq.is_finished]
            if live:
                scheduler.resume_decodes(live)
                self._inflight = nxt
        return outputs

    # ------------------------------------------------------------------ conditions
    def _is_steady(self, out: SchedulerOutput) -> bool:
        """A pure decode step of every running sequence, with nothing else going on."""
        scheduler = self.engine.scheduler
        if out.preempted or out.block_copies or scheduler.waiting:
            return False
        if len(out.scheduled) != len(scheduler.running):
            return False
        return all(s.num_new_tokens == 1 and not s.num_lookahead and s.samples and s.seq.num_output_tokens > 0
                   and s.seq.params.n == 1 for s in out.scheduled)

    def _can_continue(self, cur: _Launched, live: list[int]) -> bool:
        """Whether the step after ``cur`` is again a steady decode of its live sequences, and fits."""
        scheduler, manager = self.engine.scheduler, self.engine.block_manager
        if not live or scheduler.waiting or len(scheduler.running) != len(live):
            return False
        if len(live) > scheduler.max_num_batched_tokens:
            return False
        needed = 0
        for row in live:
            seq, pos = cur.seqs[row], cur.positions[row]
            if seq.params.n != 1:
                return False
            if pos + 2 >= scheduler.max_model_len:  # step N may end it by the context: stay synchronous
                return False
            blocks = manager.blocks_for(pos + 2)  # positions 0 .. pos+1
            table = seq.block_table
            written = range(pos // manager.block_size, min(len(table), (pos + 1) // manager.block_size + 1))
            if any(manager.ref_count(table[i]) > 1 for i in written):
                return False  # the next write would copy a shared block
            needed += max(0, blocks - len(table))
        if needed > manager.num_free_blocks:
            return False  # the synchronous scheduler preempts
        # every sequence certain to end at step N (max_tokens): nothing to overlap
        return not all(cur.seqs[row].num_output_tokens + 1 >= cur.seqs[row].params.max_tokens for row in live)

    # ------------------------------------------------------------------ launching
    def _sample(self, seqs: list[Sequence], positions: list[int], logits: torch.Tensor) -> _Launched:
        """Sample on the device and start copying the tokens to the host: reading them later waits
        for that copy only, not for the work queued after it (the next step)."""
        engine = self.engine
        generators = [engine._requests[seq.request_id].generator(seq, logits.device) for seq in seqs]
        tokens, logprobs = engine.sampler.sample(logits, [seq.params for seq in seqs], generators)
        want_logprobs = any(seq.params.wants_logprobs for seq in seqs)
        if tokens.device.type != "cuda":
            return _Launched(seqs, positions, tokens, tokens, logprobs if want_logprobs else None, None)
        host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host_tokens.copy_(tokens, non_blocking=True)
        host_logprobs = None
        if want_logprobs:
            host_logprobs = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
            host_logprobs.copy_(logprobs, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Launched(seqs, positions, tokens, host_tokens, host_logprobs, ready)

    def _launch_scheduled(self, out: SchedulerOutput) -> _Launched:
        self.num_sync_steps += 1  # its inputs came from the host
        logits = self.engine.runner.run(out)
        seqs = [s.seq for s in out.scheduled]
        rows = torch.cat([logits[seq.seq_id][-1:] for seq in seqs])
        return self._sample(seqs, [s.start_position for s in out.scheduled], rows)

    def _launch_ahead(self, cur: _Launched, live: list[int]) -> _Launched:
        manager = self.engine.block_manager
        seqs = [cur.seqs[row] for row in live]
        positions = [cur.positions[row] + 1 for row in live]
        for seq, pos in zip(seqs, positions):
            copies = manager.allocate_for(seq, pos + 1 - seq.num_computed_tokens)
            if copies:  # _can_continue excludes shared blocks
                raise RuntimeError(f"asynchronous step needs a block copy for seq {seq.seq_id}")
        input_ids = cur.tokens
        if len(live) != len(cur.seqs):  # drop the rows of sequences that ended: a gather on the device
            input_ids = input_ids[torch.tensor(live).to(input_ids.device, non_blocking=True)]
        logits = self.engine.runner.run_decode(seqs, positions, input_ids)
        self.num_overlapped_steps += 1
        return self._sample(seqs, positions, logits)

    # ------------------------------------------------------------------ applying
    def _apply(self, cur: _Launched) -> list[RequestOutput]:
        """Read ``cur``'s tokens (the host-device sync) and apply them as the synchronous step does."""
        engine = self.engine
        if cur.ready is not None:
            cur.ready.synchronize()
        tokens = cur.host_tokens.tolist()
        logprobs = cur.host_logprobs.tolist() if cur.host_logprobs is not None else [0.0] * len(tokens)
        now = time.perf_counter()
        new_tokens, sampled = {}, []
        for seq, token, logprob in zip(cur.seqs, tokens, logprobs):
            if seq.is_finished:  # aborted since the launch
                continue
            new_tokens[seq.seq_id] = [token]
            if seq.params.wants_logprobs:
                seq.output_logprobs.append(logprob)
            sampled.append(seq)
        engine.scheduler.update(new_tokens)
        return engine._collect(sampled, now)
