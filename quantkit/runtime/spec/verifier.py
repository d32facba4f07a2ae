"""Verification of one step's drafts against the target's logits.

Each sampling sequence brings its target logits ``(1 + num_lookahead, vocab)`` (row ``i`` is the
target's distribution after its last real token and ``i`` drafts) and a ``Proposal`` of ``j``
drafts, ``j <= num_lookahead`` (a proposer may come back short; the extra slots were padding).
Rows with the same ``j`` go through ``Sampler.rejection_sample`` together; rows without drafts are
sampled as a plain decode. Every emitted token also gets its logprob under the target's processed
distribution (temperature and filters applied; plain softmax for greedy rows), as ``sample`` does.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from quantkit.runtime.sampler import Generators, Sampler
from quantkit.runtime.sequence import Sequence
from quantkit.runtime.spec.proposal import Proposal


@dataclass
class Verified:
    tokens: list[int]  # accepted drafts, then the correction or bonus token
    logprobs: list[float]
    num_drafts: int

    @property
    def num_accepted(self) -> int:
        return len(self.tokens) - 1


def verify(sampler: Sampler, seqs: list[Sequence], logits: dict[int, torch.Tensor],
           proposals: dict[int, Proposal], generators: Generators) -> dict[int, Verified]:
    """New tokens of each sequence in ``seqs`` (by seq_id)."""
    groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
    for i, seq in enumerate(seqs):
        proposal = proposals.get(seq.seq_id)
        num_drafts = len(proposal.tokens) if proposal else 0
        groups[(num_drafts, proposal is None or proposal.probs is None)].append(i)
    result: dict[int, Verified] = {}
    for (num_drafts, _), rows in groups.items():
        group = [seqs[i] for i in rows]
        gens = [generators[i] for i in rows]
        if num_drafts == 0:
            result.update(_sample_plain(sampler, group, logits, gens))
        else:
            result.update(_rejection_sample(sampler, group, logits, proposals, gens, num_drafts))
    return result


def _sample_plain(sampler: Sampler, seqs: list[Sequence], logits: dict[int, torch.Tensor],
                  generators: Generators) -> dict[int, Verified]:
    rows = torch.cat([logits[seq.seq_id][:1] for seq in seqs])
    tokens, logprobs = sampler.sample(rows, [seq.params for seq in seqs], generators)
    return {seq.seq_id: Verified([token], [logprob], 0)
            for seq, token, logprob in zip(seqs, tokens.tolist(), logprobs.tolist())}


def _rejection_sample(sampler: Sampler, seqs: list[Sequence], logits: dict[int, torch.Tensor],
                      proposals: dict[int, Proposal], generators: Generators,
                      num_drafts: int) -> dict[int, Verified]:
    batch, positions = len(seqs), num_drafts + 1
    flat = torch.cat([logits[seq.seq_id][:positions] for seq in seqs])  # (B * (k+1), V)
    params = [seq.params for seq in seqs for _ in range(positions)]
    logprobs = sampler.process(flat, params).log_softmax(dim=-1).view(batch, positions, -1)
    target_probs = logprobs.exp()  # greedy rows need only its argmax: rejection_sample's mask
    first = proposals[seqs[0].seq_id]
    draft_probs = None if first.probs is None else torch.stack(
        [proposals[seq.seq_id].probs.to(target_probs.device) for seq in seqs])
    draft_tokens = torch.tensor([proposals[seq.seq_id].tokens for seq in seqs], device=target_probs.device)
    tokens, counts = sampler.rejection_sample(target_probs, draft_probs, draft_tokens, generators,
                                              greedy=[seq.params.greedy for seq in seqs])
    logprobs = logprobs.gather(2, tokens.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    out = {}
    for seq, row, lps, count in zip(seqs, tokens.tolist(), logprobs.tolist(), counts.tolist()):
        out[seq.seq_id] = Verified(row[:count], lps[:count], num_drafts)
    return out
