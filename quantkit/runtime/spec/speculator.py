"""The piece of speculative decoding the engine drives, once per step.

1. ``plan`` (before scheduling): how many drafts each decoding sequence gets verification slots
   for; none at all when the decoding batch has reached ``max_batch`` sequences (verifying
   ``1 + k`` tokens per sequence then costs more than it saves) or for a sequence the proposer
   has nothing for. The scheduler may grant fewer (budget, blocks, ``max_tokens``, context).
2. ``propose`` (after scheduling): the drafts for the granted slots.
3. ``drafts_for_runner``: each proposal padded to its slots for the target's forward.
4. ``verify``: rejection sampling of the target's logits; counts go to the metrics and the
   adaptive-k controller.
5. ``release`` / ``release_finished``: preempted, aborted and finished sequences let go of the
   proposer's state (the draft model's blocks).
"""

from __future__ import annotations

import torch

from quantkit.runtime.sampler import Generators, Sampler
from quantkit.runtime.scheduler import SchedulerOutput
from quantkit.runtime.sequence import Sequence
from quantkit.runtime.spec.adaptive import AdaptiveK
from quantkit.runtime.spec.metrics import SpecMetrics
from quantkit.runtime.spec.proposal import Proposal, Proposer
from quantkit.runtime.spec.speed_gate import SpeedGate
from quantkit.runtime.spec.verifier import Verified, verify

_PAD_TOKEN = 0  # fills verification slots a proposal left empty; their KV is rolled back


class Speculator:
    def __init__(self, proposer: Proposer, controller: AdaptiveK, max_batch: int = 32,
                 gate: SpeedGate | None = None) -> None:
        self.proposer, self.controller, self.max_batch = proposer, controller, max_batch
        self.gate = gate  # measured speed decides whether to speculate (None: always, below max_batch)
        self.metrics = SpecMetrics(current_k=controller.k, acceptance_ema=controller.rate)
        self.mode: str | None = None  # what the last plan chose for its decoding batch
        self.batch = 0

    def plan(self, running: list[Sequence]) -> dict[int, int]:
        """``{seq_id: drafts}`` to pass to ``Scheduler.schedule``; empty when switched off."""
        decoding = [s for s in running if s.num_output_tokens > 0 and s.num_tokens - s.num_computed_tokens == 1]
        self.mode, self.batch = None, len(decoding)
        if not decoding:
            return {}
        if len(decoding) >= self.max_batch:
            self.metrics.steps_off += 1
            return {}
        if self.gate is not None and not self.gate.speculate(len(decoding)):
            self.mode = "plain"
            self.metrics.steps_off += 1
            return {}
        self.mode = "spec"
        self.metrics.steps_on += 1
        k = self.controller.k
        lookahead = {seq.seq_id: self.proposer.plan(seq, k) for seq in decoding}
        return {seq_id: n for seq_id, n in lookahead.items() if n > 0}

    def propose(self, out: SchedulerOutput) -> dict[int, Proposal]:
        requests = [(s.seq, s.num_lookahead) for s in out.scheduled if s.num_lookahead > 0 and s.samples]
        proposals = self.proposer.propose(requests) if requests else {}
        granted = {seq.seq_id: k for seq, k in requests}
        return {seq_id: p.truncated(granted[seq_id]) for seq_id, p in proposals.items() if seq_id in granted}

    @staticmethod
    def drafts_for_runner(out: SchedulerOutput, proposals: dict[int, Proposal]) -> dict[int, list[int]]:
        drafts = {}
        for sched in out.scheduled:
            if sched.num_lookahead:
                tokens = proposals[sched.seq.seq_id].tokens if sched.seq.seq_id in proposals else []
                drafts[sched.seq.seq_id] = tokens + [_PAD_TOKEN] * (sched.num_lookahead - len(tokens))
        return drafts

    def verify(self, sampler: Sampler, seqs: list[Sequence], logits: dict[int, torch.Tensor],
               proposals: dict[int, Proposal], generators: Generators) -> dict[int, Verified]:
        verified = verify(sampler, seqs, logits, proposals, generators)
        results = [(v.num_drafts, v.num_accepted) for v in verified.values() if v.num_drafts]
        for num_drafts, num_accepted in results:
            self.metrics.record(num_drafts, num_accepted)
        self.controller.observe(results)
        self.metrics.current_k, self.metrics.acceptance_ema = self.controller.k, self.controller.rate
        return verified

    def record_step(self, seconds: float, tokens: int, pure_decode: bool) -> None:
        """Time of the step just run (from planning to sampled tokens) for the speed gate."""
        if self.gate is not None and self.mode is not None and pure_decode:
            self.gate.observe(self.mode, self.batch, seconds, tokens)

    def release(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.proposer.release(seq.seq_id)

    def release_finished(self) -> None:
        self.proposer.release_finished()
