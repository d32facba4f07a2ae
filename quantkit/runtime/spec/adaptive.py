"""How many drafts to ask for: the k that buys the most tokens per unit of work.

With a per-token acceptance probability ``a`` (drafts accepted independently, until the first
rejection), a step that verifies ``k`` drafts emits ``1 + a + a^2 + ... + a^k`` tokens on average.
Its cost, in target forwards, is modelled as ``1 + verify_cost * k`` (the target's verification
of k extra tokens: small while decoding is memory-bound) plus ``draft_cost * k`` (k draft forwards,
each the draft/target size ratio of a target forward). The controller keeps an exponential moving
average of ``a`` from what the verifier reports and picks ``k`` in ``[1, max_k]`` maximising
tokens per cost. Whether to speculate at all is the speculator's call (batch size), not this one's.
"""

from __future__ import annotations

from collections.abc import Iterable


def expected_tokens(rate: float, k: int) -> float:
    """Mean tokens one verification of ``k`` drafts emits at per-token acceptance ``rate``."""
    return sum(rate ** i for i in range(k + 1))


class AdaptiveK:
    def __init__(self, max_k: int, *, draft_cost: float = 0.0, verify_cost: float = 0.05,
                 smoothing: float = 0.1, initial_rate: float = 0.7, adaptive: bool = True) -> None:
        if max_k < 1:
            raise ValueError(f"num_speculative_tokens = {max_k} must be >= 1")
        self.max_k, self.draft_cost, self.verify_cost = max_k, draft_cost, verify_cost
        self.smoothing, self.adaptive = smoothing, adaptive
        self.rate = initial_rate

    def observe(self, results: Iterable[tuple[int, int]]) -> None:
        """Fold one step's ``(num_drafts, num_accepted)`` per verified sequence into the average.

        Each draft up to and including the first rejected one was a trial; later ones were never
        tested, so they say nothing about the rate.
        """
        successes = trials = 0
        for num_drafts, num_accepted in results:
            successes += num_accepted
            trials += num_accepted + (1 if num_accepted < num_drafts else 0)
        if trials:
            self.rate += self.smoothing * (successes / trials - self.rate)

    def cost(self, k: int) -> float:
        return 1.0 + (self.verify_cost + self.draft_cost) * k

    @property
    def k(self) -> int:
        if not self.adaptive:
            return self.max_k
        return max(range(1, self.max_k + 1), key=lambda k: (expected_tokens(self.rate, k) / self.cost(k), -k))
