"""What a proposer hands the verifier, and the interface every proposer has."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from quantkit.runtime.sequence import Sequence


@dataclass
class Proposal:
    """Draft tokens for one sequence, to follow its last token.

    ``probs`` (len(tokens), vocab) holds the distribution each draft was drawn from, or is None
    for a deterministic proposer (a point mass on each token, as rejection sampling reads it).
    """

    tokens: list[int]
    probs: torch.Tensor | None = None

    def truncated(self, k: int) -> Proposal:
        if k >= len(self.tokens):
            return self
        return Proposal(self.tokens[:k], None if self.probs is None else self.probs[:k])


class Proposer(Protocol):
    cost_ratio: float  # cost of one draft token relative to one target forward (0: free)

    def plan(self, seq: Sequence, k: int) -> int:
        """How many drafts (<= k) ``seq`` should get verification slots for in this step."""

    def propose(self, requests: list[tuple[Sequence, int]]) -> dict[int, Proposal]:
        """Up to ``k`` drafts per ``(seq, k)``; fewer (or none) is allowed."""

    def release(self, seq_id: int) -> None:
        """Forget a sequence (finished, aborted or preempted) and free what it held."""

    def release_finished(self) -> None:
        """Release every sequence whose target has finished."""
