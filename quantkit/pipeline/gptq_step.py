"""GPTQ for one decoder layer: collect each group's input Hessian, then quantize its linears.

The linears of a group read the same input, so they share one Hessian, damped and factored once
for all of them. With true-sequential order (the default) the groups are handled one after
another — attention inputs, attention output, MLP inputs, MLP output — and each group's Hessian
is collected with the groups before it already quantized, so later layers learn to compensate
for earlier rounding. Without it one pass collects every group's Hessian from the float layer.
Each pass stops once its group has seen its input, and replays the outputs of finished groups
(``pipeline/replay.py``), so the extra passes cost far less than whole forward passes.

Under data parallelism every rank holds the same all-reduced Hessian, and GPTQ treats the rows
(output channels) of a weight independently given it: each rank solves its own block of rows
and the blocks are gathered, so the column solve of a big linear is shared instead of repeated
on every rank. Each row goes through exactly the arithmetic it would in the whole matrix, so the
result is the single process's (``tests/test_gptq_row_split.py`` checks it on the CPU and, marked ``gpu``,
on a GPU, where cuBLAS picks kernels by shape). ``SPLIT_SOLVE_MIN_ROWS_PER_RANK = None`` turns it off.
"""

from __future__ import annotations

import torch

from quantkit.pipeline.context import LayerContext
from quantkit.quant.gptq import (
    GPTQConfig,
    PreparedHessian,
    gptq_quantize,
    prepare_hessian,
)
from quantkit.quant.hessian import HessianAccumulator
from quantkit.quant.rtn import QuantizedWeight
from quantkit.quant.scheme import QuantScheme
from quantkit.quant.weights import weight_out_in

SPLIT_SOLVE_MIN_ROWS_PER_RANK: int | None = 256  # share a linear's solve when every rank gets this many rows


def quantize_layer_gptq(ctx: LayerContext, config: GPTQConfig, true_sequential: bool = True) -> None:
    pending = [group for group in ctx.groups() if ctx.targets(group)]
    stages = [[group] for group in pending] if true_sequential else [pending]
    for stage in stages:
        hessians = _collect_hessians(ctx, stage)
        for group in stage:
            targets = ctx.targets(group)
            hessian = _shared_hessian(hessians.pop(group.name).take_hessian(), targets, ctx.scheme, config)
            for name, module in targets:
                weight = weight_out_in(module)
                qweight = _solve(ctx, weight, hessian, config, name)
                ctx.record(name, module, qweight, reference=weight)
            del hessian
            if true_sequential:
                ctx.finish(group)


def _collect_hessians(ctx: LayerContext, groups) -> dict[str, HessianAccumulator]:
    return ctx.collect_group_inputs(groups, lambda width, device: HessianAccumulator(width, device=device))


def _shared_hessian(hessian: torch.Tensor, targets: list, scheme: QuantScheme,
                    config: GPTQConfig) -> torch.Tensor | PreparedHessian:
    """The group's Hessian prepared (damped, factored) once for all its linears, and freed. A lone
    linear gets it as it is, to use up: ``gptq_quantize`` then runs a per-channel clip search
    before factoring, so the search's (in, in) block and the factor are never held together."""
    if len(targets) == 1:
        return hessian
    return prepare_hessian(hessian, scheme, config, module_name=targets[0][0], overwrite_hessian=True)


def _solve(ctx: LayerContext, weight: torch.Tensor, hessian: torch.Tensor | PreparedHessian, config: GPTQConfig,
           name: str) -> QuantizedWeight:
    """GPTQ of one linear: alone, or this rank's block of rows and then every rank's, gathered.
    ``hessian`` is prepared (never changed) or the group's only linear's, which may use it up."""
    group, rows = ctx.data_parallel, weight.shape[0]
    minimum = SPLIT_SOLVE_MIN_ROWS_PER_RANK
    if group is None or minimum is None or rows // group.world_size < minimum:
        return gptq_quantize(weight, hessian, ctx.scheme, config, module_name=name, overwrite_hessian=True)[0]
    start, end = group.row_bounds(rows)[group.rank]
    part, _loss = gptq_quantize(weight[start:end], hessian, ctx.scheme, config, module_name=name,
                                overwrite_hessian=True)
    codes = part.codes.to(torch.uint8) if part.bits <= 8 else part.codes  # a quarter of the traffic
    return QuantizedWeight(codes=group.gather_rows(codes, rows).to(part.codes.dtype),
                           scales=group.gather_rows(part.scales, rows), zeros=group.gather_rows(part.zeros, rows),
                           g_idx=part.g_idx, bits=part.bits, group_size=part.group_size, symmetric=part.symmetric)
