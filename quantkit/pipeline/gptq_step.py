"""GPTQ for one decoder layer: collect each group's input Hessian, then quantize its linears.

The linears of a group read the same input, so they share one Hessian. With true-sequential
order (the default) the groups are handled one after another — attention inputs, attention
output, MLP inputs, MLP output — and each group's Hessian is collected with the groups before it
already quantized, so later layers learn to compensate for earlier rounding. Without it one pass
collects every group's Hessian from the float layer. Each pass stops once its group has seen its
input, and replays the outputs of finished groups (``pipeline/replay.py``), so the extra passes
cost far less than whole forward passes.
"""

from __future__ import annotations

from quantkit.pipeline.context import LayerContext
from quantkit.quant.gptq import GPTQConfig, gptq_quantize
from quantkit.quant.hessian import HessianAccumulator
from quantkit.quant.weights import weight_out_in


def quantize_layer_gptq(ctx: LayerContext, config: GPTQConfig, true_sequential: bool = True) -> None:
    pending = [group for group in ctx.groups() if ctx.targets(group)]
    stages = [[group] for group in pending] if true_sequential else [pending]
    for stage in stages:
        hessians = _collect_hessians(ctx, stage)
        for group in stage:
            hessian = hessians.pop(group.name).take_hessian()
            targets = ctx.targets(group)
            for position, (name, module) in enumerate(targets):
                weight = weight_out_in(module)
                last = position == len(targets) - 1  # the last linear may use the Hessian as working memory
                qweight, _loss = gptq_quantize(weight, hessian, ctx.scheme, config, module_name=name,
                                               overwrite_hessian=last)
                ctx.record(name, module, qweight, reference=weight)
            del hessian
            if true_sequential:
                ctx.finish(group)


def _collect_hessians(ctx: LayerContext, groups) -> dict[str, HessianAccumulator]:
    return ctx.collect_group_inputs(groups, lambda width, device: HessianAccumulator(width, device=device))
