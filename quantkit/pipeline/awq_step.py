"""AWQ for one decoder layer: search per-channel scales on the float layer's inputs, fold them,
then quantize every linear on a clipped grid.

Each group's input is captured from the float layer in one pass. All groups' scales are searched
before any is folded, because folding one group rewrites another group's weights (the MLP output
group folds into ``up_proj``); then each linear's clipping range is searched on the folded input
``x / s`` and the folded weight. Group inputs are kept to at most ``MAX_ROWS`` tokens (a seeded
random subset of every batch) so memory stays bounded on large models.
"""

from __future__ import annotations

import torch

from quantkit.models.folding import fold_input_scales
from quantkit.pipeline.context import LayerContext
from quantkit.quant.awq import (
    AWQConfig,
    awq_quantize,
    awq_search_clip,
    awq_search_scales,
)
from quantkit.quant.weights import weight_out_in

MAX_ROWS = 32768
FOLDABLE = ("norm", "linear", "linear_slice")


def quantize_layer_awq(ctx: LayerContext, config: AWQConfig) -> None:
    groups = [group for group in ctx.groups() if ctx.targets(group)]
    inputs = _capture_group_inputs(ctx, groups)
    scales = {}
    for group in groups:
        if group.prev_kind not in FOLDABLE:
            continue
        weights = [weight_out_in(module) for _name, module in ctx.targets(group)]
        found, report = awq_search_scales(inputs[group.name], weights, ctx.scheme, config)
        if report["scaled"]:
            scales[group.name] = found
    for group in groups:
        if group.name in scales:
            fold_input_scales(ctx.layer, group, scales[group.name], ctx.adapter)
    for group in groups:
        x = inputs.pop(group.name)
        if group.name in scales:
            x = x / scales[group.name]
        for name, module in ctx.targets(group):
            weight = weight_out_in(module).float()
            clip = awq_search_clip(x, weight, ctx.scheme, config) if config.clip else None
            ctx.record(name, module, awq_quantize(weight, ctx.scheme, clip, module_name=name), reference=weight)


def _capture_group_inputs(ctx: LayerContext, groups) -> dict[str, torch.Tensor]:
    total = sum(batch.hidden.shape[0] * batch.hidden.shape[1] for batch in ctx.batches)
    keep = min(1.0, MAX_ROWS / total)
    generator = torch.Generator(device=ctx.device).manual_seed(ctx.index)
    rows: dict[str, list[torch.Tensor]] = {group.name: [] for group in groups}
    handles, observed = [], []
    for group in groups:
        _name, first = ctx.targets(group)[0]
        handles.append(first.register_forward_pre_hook(_collector(rows[group.name], keep, generator)))
        observed.append(first)
    try:
        ctx.forward_all(stop_before=observed)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(parts).float() for name, parts in rows.items()}


def _collector(parts: list[torch.Tensor], keep: float, generator: torch.Generator):
    def hook(_module, inputs):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
        if keep < 1.0:
            mask = torch.rand(x.shape[0], device=x.device, generator=generator) < keep
            x = x[mask]
        parts.append(x)

    return hook
