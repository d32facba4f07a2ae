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
    accumulators, handles, observed = {}, [], []
    for group in groups:
        _name, first = ctx.targets(group)[0]
        accumulator = HessianAccumulator(weight_out_in(first).shape[1], device=ctx.device)
        accumulators[group.name] = accumulator
        handles.append(first.register_forward_pre_hook(_observer(accumulator)))
        observed.append(first)
    try:
        ctx.forward_all(stop_before=observed)
    finally:
        for handle in handles:
            handle.remove()
    ctx.reduce(accumulators.values())
    return accumulators


def _observer(accumulator: HessianAccumulator):
    def hook(_module, inputs):
        accumulator.add_batch(inputs[0].detach())

    return hook
