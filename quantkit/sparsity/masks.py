"""Pick the weights to keep from a score per weight: the lowest scores are pruned.

Every function returns a boolean *keep* mask shaped like the scores (True = the weight survives)
and prunes an exact number of weights: ``floor(count * sparsity)`` of each comparison group
(a row, or the whole matrix), or ``M - N`` of every run of ``M`` input columns for N:M. Ties are
broken by position (a stable sort), so the same scores always give the same mask.
"""

from __future__ import annotations

import math

import torch

from quantkit.errors import QuantkitError
from quantkit.sparsity.structure import MaskStructure

COMPARISONS = ("row", "layer")


def pruned_count(count: int, sparsity: float) -> int:
    """How many of ``count`` weights an unstructured ``sparsity`` prunes (robust to 0.7 * 10 = 6.999...)."""
    return math.floor(count * sparsity + 1e-9)


def keep_mask(scores: torch.Tensor, structure: MaskStructure, sparsity: float, comparison: str = "row") -> torch.Tensor:
    """The keep mask of ``scores`` (out, in): N:M along the input dimension, else unstructured
    within each output row (``comparison="row"``) or across the whole matrix (``"layer"``)."""
    if structure.is_nm:
        return nm_keep_mask(scores, structure.n, structure.m)
    if comparison == "row":
        return row_keep_mask(scores, sparsity)
    if comparison == "layer":
        return layer_keep_mask(scores, sparsity)
    raise ValueError(f"comparison must be one of {COMPARISONS}, got {comparison!r}")


def row_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(in * sparsity)`` lowest scores of every row."""
    prune = pruned_count(scores.shape[-1], sparsity)
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if prune:
        order = torch.sort(scores, dim=-1, stable=True).indices[..., :prune]
        keep.scatter_(-1, order, False)
    return keep


def layer_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``floor(numel * sparsity)`` lowest scores of the whole matrix."""
    prune = pruned_count(scores.numel(), sparsity)
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if prune:
        order = torch.sort(scores.reshape(-1), stable=True).indices[:prune]
        keep[order] = False
    return keep.view(scores.shape)


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every run of ``m`` consecutive input columns."""
    rows, cols = scores.shape
    if cols % m:
        raise QuantkitError(f"{n}:{m} sparsity needs an input size divisible by {m}, got {cols}")
    runs = scores.reshape(rows, cols // m, m)
    order = torch.sort(runs, dim=-1, stable=True).indices[..., : m - n]
    keep = torch.ones(runs.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, order, False)
    return keep.view(rows, cols)


def follows_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every run of ``m`` consecutive input columns of ``weight`` (out, in) has at most
    ``n`` non-zeros (weights that happen to be zero count as pruned)."""
    rows, cols = weight.shape
    if cols % m:
        return False
    nonzero = (weight.reshape(rows, cols // m, m) != 0).sum(-1)
    return bool((nonzero <= n).all())


def sparsity_of(weight: torch.Tensor) -> float:
    """Share of exactly-zero entries."""
    return (weight == 0).sum().item() / max(weight.numel(), 1)
