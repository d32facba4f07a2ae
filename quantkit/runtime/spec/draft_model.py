"""Draft tokens from a small model with its own paged KV cache.

The draft model runs on its own ``ModelRunner`` and ``BlockManager`` (same block size as the
target's, prefix caching off: a draft block may hold rejected tokens that are overwritten later).
Each target sequence has a draft twin, a ``Sequence`` holding the same tokens plus the drafts in
flight. Before proposing, the twin is synced: its tokens after the first one that differs from
the target's (a rejected draft) are replaced by the target's, and its computed length is cut back
to that point; KV past the length is simply overwritten later. Proposing ``k`` tokens is ``k``
batched forwards over all speculating sequences: the first also catches up on the tokens the
target accepted since (or on the whole prompt, the first time), each later one feeds the previous
draft. Drafts are drawn from the draft's distribution under the request's sampling parameters
(argmax for greedy requests), which comes back in ``Proposal.probs`` for rejection sampling.

Twins are freed when their target finishes, is aborted or is preempted. When the draft's pool
runs short, the twins of sequences not speculating in this step are freed first (they catch up
later); a twin that still does not fit proposes fewer tokens, or none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.runtime.block_manager import BlockManager
from quantkit.runtime.model_runner import ModelRunner
from quantkit.runtime.paged_llama import PagedLlama
from quantkit.runtime.sampler import Sampler
from quantkit.runtime.sampling_params import SamplingParams
from quantkit.runtime.scheduler import ScheduledSeq, SchedulerOutput
from quantkit.runtime.sequence import Sequence, SequenceStatus
from quantkit.runtime.spec.proposal import Proposal

_DRAFT_SEED_OFFSET = 0x5DEECE66D  # the draft's stream differs from the verifier's for seeded requests
_PLAIN, _GREEDY = SamplingParams(temperature=1.0), SamplingParams(temperature=0.0)


@dataclass
class _Twin:
    target: Sequence
    seq: Sequence  # the draft's copy: the target's tokens, then drafts in flight
    synced: int  # leading output tokens known equal to the target's
    generator: torch.Generator | None


class DraftModelProposer:
    def __init__(self, model: PagedLlama, num_blocks: int, block_size: int, cost_ratio: float, *,
                 decode_graphs: bool = False, max_num_seqs: int = 256, max_model_len: int | None = None) -> None:
        self.block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, self.block_manager, decode_graphs=decode_graphs,
                                  max_num_seqs=max_num_seqs, max_model_len=max_model_len)
        self.sampler = Sampler()
        self.cost_ratio = cost_ratio
        self._twins: dict[int, _Twin] = {}

    @property
    def num_tracked(self) -> int:
        return len(self._twins)

    def plan(self, seq: Sequence, k: int) -> int:
        return k

    def propose(self, requests: list[tuple[Sequence, int]]) -> dict[int, Proposal]:
        wanted = {seq.seq_id: k for seq, k in requests if k > 0}
        twins = [self._synced(seq) for seq, k in requests if k > 0]
        tokens: dict[int, list[int]] = {seq_id: [] for seq_id in wanted}
        probs: dict[int, list[torch.Tensor]] = {seq_id: [] for seq_id in wanted}
        stopped: set[int] = set()
        for _ in range(max(wanted.values(), default=0)):
            active = [t for t in twins if t.seq.seq_id not in stopped
                      and len(tokens[t.seq.seq_id]) < wanted[t.seq.seq_id]]
            fitting = [t for t in active if self._reserve(t, wanted)]
            stopped.update(t.seq.seq_id for t in active if t not in fitting)
            if not fitting:
                break
            self._draft_step(fitting, tokens, probs)
        return {seq_id: Proposal(drafts, torch.stack(probs[seq_id]))
                for seq_id, drafts in tokens.items() if drafts}

    def _draft_step(self, twins: list[_Twin], tokens: dict[int, list[int]],
                    probs: dict[int, list[torch.Tensor]]) -> None:
        """One batched forward: each twin's uncomputed tokens in, one draft token out."""
        scheduled = [ScheduledSeq(t.seq, t.seq.num_tokens - t.seq.num_computed_tokens, t.seq.num_computed_tokens)
                     for t in twins]
        logits = self.runner.run(SchedulerOutput(scheduled=scheduled))
        rows = torch.cat([logits[t.seq.seq_id] for t in twins])
        q = self.sampler.probs(rows, [t.seq.params for t in twins])
        # Draw from q itself: its logs under plain (or greedy) parameters, so filters run once.
        plain = [_GREEDY if t.seq.params.greedy else _PLAIN for t in twins]
        drawn, _ = self.sampler.sample(q.log(), plain, [t.generator for t in twins])
        for twin, token, row in zip(twins, drawn.tolist(), q):
            twin.seq.num_computed_tokens = twin.seq.num_tokens
            twin.seq.output_token_ids.append(token)
            tokens[twin.seq.seq_id].append(token)
            probs[twin.seq.seq_id].append(row)

    def _synced(self, target: Sequence) -> _Twin:
        """The target's twin, created or rolled back to the target's tokens."""
        twin = self._twins.get(target.seq_id)
        if twin is None:
            twin = self._twins[target.seq_id] = _new_twin(target, self.runner.model.device)
        own, theirs = twin.seq.output_token_ids, target.output_token_ids
        same = twin.synced
        while same < min(len(own), len(theirs)) and own[same] == theirs[same]:
            same += 1
        del own[same:]
        own.extend(theirs[same:])
        twin.synced = len(theirs)
        # At least the last token is fed again: the first draft step needs its logits.
        twin.seq.num_computed_tokens = min(twin.seq.num_computed_tokens, target.num_prompt_tokens + same,
                                           target.num_tokens - 1)
        return twin

    def _reserve(self, twin: _Twin, busy: dict[int, int]) -> bool:
        """Slots for the twin's uncomputed tokens, freeing idle twins if the pool is short."""
        manager, seq = self.block_manager, twin.seq
        needed = seq.num_tokens - seq.num_computed_tokens
        while not manager.can_allocate(seq, needed):
            idle = next((seq_id for seq_id in self._twins if seq_id not in busy), None)
            if idle is None:
                return False
            self.release(idle)
        manager.allocate_for(seq, needed)
        return True

    def release(self, seq_id: int) -> None:
        twin = self._twins.pop(seq_id, None)
        if twin is not None:
            self.block_manager.free(twin.seq)

    def release_finished(self) -> None:
        for seq_id in [i for i, t in self._twins.items() if t.target.is_finished]:
            self.release(seq_id)


def _new_twin(target: Sequence, device: torch.device) -> _Twin:
    seq = Sequence(target.seq_id, target.request_id, target.prompt_token_ids, target.params,
                   status=SequenceStatus.RUNNING, sample_index=target.sample_index)
    return _Twin(target, seq, 0, _draft_generator(target, device))


def _draft_generator(target: Sequence, device: torch.device) -> torch.Generator | None:
    if target.params.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed((target.params.seed + target.sample_index + _DRAFT_SEED_OFFSET) % 2**63)
    return generator
