"""Round-to-nearest for one decoder layer: weights alone, no calibration data."""

from __future__ import annotations

from quantkit.pipeline.context import LayerContext
from quantkit.quant.rtn import rtn_quantize
from quantkit.quant.weights import weight_out_in


def quantize_layer_rtn(ctx: LayerContext) -> None:
    for group in ctx.groups():
        for name, module in ctx.targets(group):
            ctx.record(name, module, rtn_quantize(weight_out_in(module).float(), ctx.scheme, module_name=name))
