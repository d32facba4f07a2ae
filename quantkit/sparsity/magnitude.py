"""Magnitude pruning: zero the weights of smallest absolute value; no calibration data.

The baseline of the SparseGPT and Wanda papers. Unstructured magnitude pruning compares the
weights of a whole layer by default (``comparison="layer"``, the classic form); per output row
(``"row"``) is the comparison group Wanda uses. N:M keeps the ``N`` largest of every ``M``.
"""

from __future__ import annotations

import torch

from quantkit.sparsity.masks import keep_mask
from quantkit.sparsity.structure import MaskStructure


def magnitude_keep_mask(weight: torch.Tensor, structure: MaskStructure, sparsity: float,
                        comparison: str = "layer") -> torch.Tensor:
    """Keep mask of ``weight`` (out, in) by |w|."""
    return keep_mask(weight.detach().abs().float(), structure, sparsity, comparison)
