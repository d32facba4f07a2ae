"""Magnitude pruning of one decoder layer: each linear's smallest weights become zero (no data).

``record_pruned`` is shared by the pruning steps that write float weights (magnitude, Wanda,
SparseGPT without a quantization scheme): it puts the pruned weight into the model and reports
its relative weight error, as ``LayerContext.record`` does for quantized weights.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.pipeline.context import LayerContext
from quantkit.quant.weights import set_weight_out_in, weight_out_in
from quantkit.sparsity.magnitude import magnitude_keep_mask
from quantkit.sparsity.step import SparsityStep


def prune_layer_magnitude(ctx: LayerContext, step: SparsityStep) -> None:
    structure, comparison = step.structure(), step.option("comparison")
    for group in ctx.groups():
        for name, module in ctx.targets(group):
            weight = weight_out_in(module)
            keep = magnitude_keep_mask(weight, structure, step.sparsity, comparison)
            record_pruned(ctx, name, module, weight, weight.float() * keep)


def record_pruned(ctx: LayerContext, name: str, module: nn.Module, original: torch.Tensor,
                  pruned: torch.Tensor) -> None:
    """Write ``pruned`` (out, in) into ``module`` and report ``||original - pruned|| / ||original||``."""
    original = original.float()
    diff = torch.linalg.norm(original - pruned.float())
    ctx.report.errors[name] = (diff / torch.linalg.norm(original).clamp_min(1e-12)).item()
    set_weight_out_in(module, pruned.to(module.weight.dtype))
