"""Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models").

A weight's score is its magnitude times the norm of the input channel it multiplies,
``|W_ij| * ||X_j||_2`` over every calibration token, and the lowest scores of each output row
are pruned (N:M: of each run of M inputs). No weight is updated. The paper compares weights
within each output row (``comparison="row"``, the default); ``"layer"`` compares the whole matrix.

The statistic is a plain sum per input channel (``Σ x_j²``) and a token count, so data-parallel
ranks all-reduce it exactly like GPTQ's Hessians before anyone prunes (see
``pipeline/data_parallel.py``).

Both the sums and the scores are float64 (one vector per linear, one score matrix at a time):
two scores that round to the same float32 would otherwise tie and be broken by position, not by
which is truly smaller.
"""

from __future__ import annotations

import torch

from quantkit.sparsity.masks import keep_mask
from quantkit.sparsity.structure import MaskStructure


class InputNorms:
    """``Σ x_j²`` per input channel and the token count of one linear group's inputs."""

    def __init__(self, in_features: int, *, device: torch.device | str | None = None) -> None:
        if not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(f"in_features must be a positive integer, got {in_features!r}")
        self.in_features = in_features
        self._device = None if device is None else torch.device(device)
        self._sum: torch.Tensor | None = None
        self._count = 0

    @property
    def num_tokens(self) -> int:
        return self._count

    @property
    def squared_sum(self) -> torch.Tensor:
        return self._raw_sum()

    @property
    def norms(self) -> torch.Tensor:
        """``||X_j||_2`` over every token added (in,) float64."""
        return self._raw_sum().sqrt()

    def add_batch(self, x: torch.Tensor) -> None:
        """Add activations (..., in_features): every leading index is one token."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected activations with last dimension {self.in_features}, got shape {tuple(x.shape)}")
        tokens = x.detach().reshape(-1, self.in_features)
        total = self._raw_sum(tokens.device)
        total += tokens.to(total.device, torch.float64).square().sum(0)
        self._count += tokens.shape[0]

    def all_reduce(self, group) -> None:
        """Sum over the ranks of ``group`` (a ``DataParallel``): every rank then holds all tokens' sums."""
        total = self._raw_sum()
        group.all_reduce_sum(total)
        count = torch.tensor([float(self._count)], dtype=torch.float64, device=total.device)
        self._count = int(group.all_reduce_sum(count).item())

    def _raw_sum(self, device: torch.device | None = None) -> torch.Tensor:
        if self._sum is None:
            place = self._device or device or torch.device("cpu")
            # float64 on every device (one vector): squares of float32 inputs are exact, the sum
            # barely depends on how the tokens were split over batches or ranks, and scores that
            # float32 cannot tell apart are still ordered
            self._sum = torch.zeros(self.in_features, dtype=torch.float64, device=place)
        return self._sum


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||`` (out, in) float64 for ``weight`` (out, in) and ``norms`` (in,)."""
    return weight.detach().abs().double() * norms.to(weight.device, torch.float64).unsqueeze(0)


def wanda_keep_mask(weight: torch.Tensor, norms: torch.Tensor, structure: MaskStructure, sparsity: float,
                    comparison: str = "row") -> torch.Tensor:
    """Keep mask of ``weight`` (out, in) by Wanda's score."""
    return keep_mask(wanda_scores(weight, norms), structure, sparsity, comparison)
