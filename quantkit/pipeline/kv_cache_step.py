"""KV-cache scales for one decoder layer: observe the keys (after the rotary embedding) and the
values of every calibration token, per KV head, then store the scales on the attention module.

The pass routes the layer's attention through ``quant.kv_cache.kv_quantized_attention``, which
sees exactly the K/V the cache will hold, and stops before the attention's output projection.
Once the scales are set, the rest of the layer's passes (the next layer's inputs) run with K/V
rounded through the 8-bit cache, as the quantized model will.
"""

from __future__ import annotations

from quantkit.errors import QuantkitError
from quantkit.pipeline.capture import run_layer
from quantkit.pipeline.context import LayerContext
from quantkit.pipeline.replay import StopLayer
from quantkit.quant.kv_cache import (
    KVAbsMax,
    attach_kv_scales,
    kv_scale,
    use_kv_quantized_attention,
)
from quantkit.recipe_w8a8 import KVCacheStep


def calibrate_layer_kv(ctx: LayerContext, step: KVCacheStep) -> None:
    if not ctx.batches:
        raise QuantkitError("KV-cache scales are calibrated on data; this run has no calibration samples")
    attention = ctx.adapter.attention(ctx.layer)
    config = attention.config
    previous = use_kv_quantized_attention(config)
    ctx.cleanups.append(lambda: setattr(config, "_attn_implementation", previous))
    stats = KVAbsMax()
    attention.kv_observer = stats.observe
    # Run the attention itself on every batch: a replayed recording (true-sequential GPTQ keeps
    # them) would skip the observer. Stop before the output projection.
    stop = attention.o_proj.register_forward_pre_hook(_stop) if hasattr(attention, "o_proj") else None
    try:
        for batch in ctx.batches:
            try:
                run_layer(ctx.layer, batch, ctx.device)
            except StopLayer:
                pass
    finally:
        del attention.kv_observer
        if stop is not None:
            stop.remove()
    ctx.reduce([stats])
    attach_kv_scales(attention, kv_scale(stats.key, step.type, step.strategy),
                     kv_scale(stats.value, step.type, step.strategy), step.type)
    # Recordings of the attention were made without the 8-bit cache: forget them, so the next
    # layer's inputs are computed with K/V rounded as the checkpoint's model rounds them.
    ctx.__dict__.pop("replay", None)  # the cached property rebuilds an empty ReplayCache on next use


def _stop(_module, _inputs):
    raise StopLayer
