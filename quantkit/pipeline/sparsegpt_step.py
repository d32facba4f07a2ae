"""SparseGPT for one decoder layer: collect each group's input Hessian, then prune its linears
with error feedback, quantizing the survivors in the same pass when the step has a scheme.

The structure is GPTQ's (``pipeline/gptq_step.py``): linears that read the same input share one
Hessian; with true-sequential order (the default) the groups are handled one after another and
each group's Hessian is collected with the groups before it already pruned, so later linears
compensate for earlier pruning; the Hessians are summed over data-parallel ranks first.
"""

from __future__ import annotations

from quantkit.pipeline.context import LayerContext
from quantkit.pipeline.magnitude_step import record_pruned
from quantkit.quant.hessian import HessianAccumulator
from quantkit.quant.weights import weight_out_in
from quantkit.sparsity.sparsegpt import sparsegpt_prune
from quantkit.sparsity.step import SparsityStep


def prune_layer_sparsegpt(ctx: LayerContext, step: SparsityStep) -> None:
    structure, config, scheme = step.structure(), step.sparsegpt_config(), step.quant_scheme()
    true_sequential = step.option("true_sequential")
    pending = [group for group in ctx.groups() if ctx.targets(group)]
    stages = [[group] for group in pending] if true_sequential else [pending]
    for stage in stages:
        hessians = ctx.collect_group_inputs(stage, lambda width, device: HessianAccumulator(width, device=device))
        for group in stage:
            hessian = hessians.pop(group.name).take_hessian()
            targets = ctx.targets(group)
            for position, (name, module) in enumerate(targets):
                weight = weight_out_in(module)
                last = position == len(targets) - 1  # the last linear may use the Hessian as working memory
                result = sparsegpt_prune(weight, hessian, structure, step.sparsity, config, scheme=scheme,
                                         module_name=name, overwrite_hessian=last)
                if result.qweight is not None:
                    ctx.record(name, module, result.qweight, reference=weight)
                else:
                    record_pruned(ctx, name, module, weight, result.weight)
            del hessian
            if true_sequential:
                ctx.finish(group)
