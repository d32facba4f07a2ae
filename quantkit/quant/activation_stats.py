"""What AWQ needs to know about a linear group's inputs, accumulated batch by batch.

AWQ's searches score candidates through ``XᵀX`` (``awq_error``) and build them from the mean
absolute activation per channel, so neither the captured activations nor a subsample of them has
to be kept: two sums and a count, over every calibration token, are enough. For a 14336-wide
layer that is 0.8 GB instead of the gigabytes that the rows themselves would take.
"""

from __future__ import annotations

import torch

from quantkit.quant.hessian import HessianAccumulator


class ActivationStats:
    """``Σ xᵀx``, ``Σ |x|`` per channel and the token count of inputs with ``in_features`` channels."""

    def __init__(self, in_features: int, *, device: torch.device | str | None = None) -> None:
        self._gram = HessianAccumulator(in_features, device=device)
        self._abs_sum: torch.Tensor | None = None

    @classmethod
    def of(cls, x: torch.Tensor) -> ActivationStats:
        """The statistics of one tensor of inputs (tokens, in)."""
        stats = cls(x.shape[-1], device=x.device)
        stats.add_batch(x)
        return stats

    @property
    def in_features(self) -> int:
        return self._gram.in_features

    @property
    def tokens(self) -> int:
        return self._gram.num_tokens

    @property
    def gram(self) -> torch.Tensor:
        """``XᵀX`` (in, in) float32 over every token added."""
        return self._gram.state[0].to(torch.float32)

    @property
    def abs_mean(self) -> torch.Tensor:
        """Mean ``|x|`` per channel (in,) float32."""
        if self._abs_sum is None:
            raise ValueError("no activations were added")
        return self._abs_sum / self.tokens

    def all_reduce(self, group) -> None:
        """Sum the statistics over the ranks of ``group`` (a ``DataParallel``)."""
        self._gram.all_reduce(group)
        if self._abs_sum is None:
            self._abs_sum = torch.zeros(self.in_features, dtype=torch.float32, device=self._gram.state[0].device)
        group.all_reduce_sum(self._abs_sum)

    def add_batch(self, x: torch.Tensor) -> None:
        """Add activations of shape (..., in_features): every leading index is one token."""
        self._gram.add_batch(x)
        tokens = x.detach().reshape(-1, self.in_features)
        partial = torch.linalg.vector_norm(tokens, ord=1, dim=0, dtype=torch.float32)
        if self._abs_sum is None:
            self._abs_sum = partial
        else:
            self._abs_sum += partial.to(self._abs_sum.device)
