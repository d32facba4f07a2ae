"""Counters of speculative decoding, exposed as ``Engine.spec_metrics``."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class SpecMetrics:
    num_proposed: int = 0  # draft tokens sent to verification
    num_accepted: int = 0  # of those, accepted by the target
    num_verified_seqs: int = 0  # sequence-steps that verified at least one draft
    num_emitted: int = 0  # tokens those sequence-steps produced (accepted + correction/bonus)
    steps_on: int = 0  # steps with decoding sequences that speculated
    steps_off: int = 0  # steps with decoding sequences where speculation was switched off
    current_k: int = 0  # drafts per sequence the controller asks for now
    acceptance_ema: float = 0.0  # the controller's running per-token acceptance estimate

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts over proposed drafts (drafts after a rejection count as not accepted)."""
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Accepted drafts per verifying sequence-step."""
        return self.num_accepted / self.num_verified_seqs if self.num_verified_seqs else 0.0

    @property
    def tokens_per_verification(self) -> float:
        """Tokens emitted per verifying sequence-step (accepted drafts plus one)."""
        return self.num_emitted / self.num_verified_seqs if self.num_verified_seqs else 0.0

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.num_proposed += num_drafts
        self.num_accepted += num_accepted
        self.num_verified_seqs += 1
        self.num_emitted += num_accepted + 1

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate,
                "mean_accepted_length": self.mean_accepted_length,
                "tokens_per_verification": self.tokens_per_verification}
