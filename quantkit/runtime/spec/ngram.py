"""Prompt-lookup (n-gram) drafts: no model, just the sequence's own history.

The last ``n`` tokens (n from ``max_n`` down to ``min_n``) are looked up earlier in the prompt and
output; at the most recent earlier occurrence of the longest n-gram that occurs, the ``k`` tokens
that followed it become the drafts. Copying may run into the tokens it is proposing (a repeating
pattern shorter than ``k``), so a period-p loop yields k drafts, not p. Drafts are deterministic:
``Proposal.probs`` is None.
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError
from quantkit.runtime.sequence import Sequence
from quantkit.runtime.spec.proposal import Proposal


def find_continuation(tokens: list[int], k: int, min_n: int = 1, max_n: int = 3) -> list[int]:
    """Up to ``k`` tokens that followed the longest recent repeat of the tail of ``tokens``."""
    length = len(tokens)
    if k < 1 or length < 2:
        return []
    ids = torch.tensor(tokens, dtype=torch.int64)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        # Windows starting at 0 .. length-1-n: each has a following token, none is the tail itself.
        windows = ids[: length - 1].unfold(0, n, 1)
        hits = (windows == ids[length - n:]).all(dim=1).nonzero()
        if hits.numel():
            return _copy_forward(tokens, int(hits[-1]) + n, k)
    return []


def _copy_forward(tokens: list[int], start: int, k: int) -> list[int]:
    out: list[int] = []
    for i in range(start, start + k):
        out.append(tokens[i] if i < len(tokens) else out[i - len(tokens)])
    return out


class NgramProposer:
    cost_ratio = 0.0

    def __init__(self, min_n: int = 1, max_n: int = 3, window: int = 4096) -> None:
        if not 1 <= min_n <= max_n:
            raise QuantkitError(f"n-gram sizes must satisfy 1 <= ngram_min <= ngram_max, got {min_n}..{max_n}")
        self.min_n, self.max_n, self.window = min_n, max_n, window
        self._planned: dict[int, list[int]] = {}

    def plan(self, seq: Sequence, k: int) -> int:
        """Look the drafts up now, so a sequence without a match takes no verification slots."""
        start = max(0, seq.num_tokens - self.window)
        drafts = find_continuation(seq.token_ids_between(start, seq.num_tokens), k, self.min_n, self.max_n)
        self._planned[seq.seq_id] = drafts
        return len(drafts)

    def propose(self, requests: list[tuple[Sequence, int]]) -> dict[int, Proposal]:
        planned, self._planned = self._planned, {}
        out = {}
        for seq, k in requests:
            drafts = planned.get(seq.seq_id)
            if drafts is None:
                self.plan(seq, k)
                drafts = self._planned.pop(seq.seq_id)
            if drafts[:k]:
                out[seq.seq_id] = Proposal(drafts[:k])
        return out

    def release(self, seq_id: int) -> None:
        self._planned.pop(seq_id, None)

    def release_finished(self) -> None:
        pass
