"""Wanda for one decoder layer: collect each group's input norms, then prune its linears by
``|W| * ||X||``.

As in the paper's code, one pass over the calibration batches observes every group's input from
the layer as it came in (the layer's inputs themselves come from the already pruned earlier
layers); with ``true_sequential`` each group is observed after the groups before it are pruned,
as quantkit's GPTQ does. The norms are summed over data-parallel ranks before anything is pruned
(``LayerContext.collect_group_inputs``).
"""

from __future__ import annotations

from quantkit.pipeline.context import LayerContext
from quantkit.pipeline.magnitude_step import record_pruned
from quantkit.quant.weights import weight_out_in
from quantkit.sparsity.step import SparsityStep
from quantkit.sparsity.wanda import InputNorms, wanda_keep_mask


def prune_layer_wanda(ctx: LayerContext, step: SparsityStep) -> None:
    structure, comparison = step.structure(), step.option("comparison")
    true_sequential = step.option("true_sequential")
    pending = [group for group in ctx.groups() if ctx.targets(group)]
    stages = [[group] for group in pending] if true_sequential else [pending]
    for stage in stages:
        statistics = ctx.collect_group_inputs(stage, lambda width, device: InputNorms(width, device=device))
        for group in stage:
            norms = statistics.pop(group.name).norms
            for name, module in ctx.targets(group):
                weight = weight_out_in(module)
                keep = wanda_keep_mask(weight, norms, structure, step.sparsity, comparison)
                record_pruned(ctx, name, module, weight, weight.float() * keep)
            if true_sequential:
                ctx.finish(group)
