"""KV-cache quantization: per-head (or per-tensor) scales for 8-bit keys and values.

What the scales describe is what the cache stores: keys after the rotary embedding (and after a
k-norm, where the family has one) and values, per KV head, exactly the tensors transformers hands
to its attention function and vLLM writes to its cache. compressed-tensors observes the same
tensors (``modeling/kvcache.py``: a hook on the cache's ``update``) and stores them as
``<layer>.self_attn.k_scale`` / ``v_scale`` with shape (num_kv_heads, 1, 1) for the ``attn_head``
strategy and (1,) for ``tensor`` (``quantization/lifecycle/initialize.py``,
``initialize_qparams``); vLLM loads them into the attention layer
(``model_loader/weight_utils.py``, ``maybe_remap_kv_scale_name``: ``self_attn.k_scale`` ->
``self_attn.attn.k_scale``) and quantizes ``k / k_scale`` into an FP8 cache.

A scale is ``max|K_h| / 448`` (FP8 e4m3) or ``/ 127`` (INT8) over every calibration token, rounded
up to a float16 value (checkpoints store scales in 16 bits; rounding up never clips). There is
no default scale: a head that saw no data is an error, never a silent 1.0.

Evaluation: ``use_kv_quantized_attention`` routes a transformers model's attention through
``kv_quantized_attention``, which rounds K and V through their 8-bit codes with the stored scales
(the numbers the runtime's quantized paged cache holds) before SDPA.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.quant.w8a8 import dequantize, qmax, quantize

KV_ATTENTION = "quantkit_kv"


class KVAbsMax:
    """Largest |K| and |V| per KV head over every token observed (attention's (B, H, L, D) layout)."""

    def __init__(self) -> None:
        self.key: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.tokens = 0

    def observe(self, key: torch.Tensor, value: torch.Tensor) -> None:
        k = key.detach().abs().to(torch.float32).amax(dim=(0, 2, 3))
        v = value.detach().abs().to(torch.float32).amax(dim=(0, 2, 3))
        self.key = k if self.key is None else torch.maximum(self.key, k)
        self.value = v if self.value is None else torch.maximum(self.value, v)
        self.tokens += key.shape[0] * key.shape[2]

    def all_reduce(self, group) -> None:
        from quantkit.quant.smoothquant import all_reduce_max

        if self.key is None:
            raise QuantkitError("KV-cache calibration saw no tokens on this rank")
        all_reduce_max(group, self.key)
        all_reduce_max(group, self.value)


def kv_scale(absmax: torch.Tensor, kind: str, strategy: str) -> torch.Tensor:
    """Scales from per-head maxima (H,): (H, 1, 1) for ``attn_head``, (1,) for ``tensor``; float32
    holding float16 values, each at least ``absmax / qmax``."""
    if absmax is None or absmax.numel() == 0:
        raise QuantkitError("KV-cache calibration saw no tokens: no scale can be derived")
    absmax = absmax.to(torch.float32)
    if strategy == "tensor":
        absmax = absmax.amax().reshape(1)
    elif strategy != "attn_head":
        raise ValueError(f"unknown KV-cache strategy {strategy!r}")
    if not bool((absmax > 0).all()):
        raise QuantkitError("a KV head was zero on every calibration token; its scale cannot be calibrated")
    wanted = absmax / qmax(kind)
    half = wanted.to(torch.float16)
    half = torch.where(half.to(torch.float32) < wanted, torch.nextafter(half, torch.full_like(half, torch.inf)), half)
    scale = half.to(torch.float32)
    return scale.reshape(-1, 1, 1) if strategy == "attn_head" else scale


def attach_kv_scales(attention: nn.Module, k_scale: torch.Tensor, v_scale: torch.Tensor, kind: str) -> None:
    """Give an attention module its ``k_scale``/``v_scale`` buffers (checkpoint names) and type."""
    for name, value in (("k_scale", k_scale), ("v_scale", v_scale)):
        if name in attention._buffers:
            attention._buffers[name] = value.to(torch.float32)
        else:
            attention.register_buffer(name, value.to(torch.float32))
    attention.kv_cache_type = kind


def fake_quantize_kv(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """K or V (B, H, L, D) rounded through 8-bit codes with per-head (H, 1, 1) or (1,) scales."""
    scale = scale.to(device=x.device, dtype=torch.float32)
    return dequantize(quantize(x, scale, kind), scale).to(x.dtype)


def kv_quantized_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """transformers attention function: observe K/V (calibration) and/or fake-quantize them
    (evaluation of a checkpoint with a quantized KV cache), then scaled dot-product attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    observer = getattr(module, "kv_observer", None)
    if observer is not None:
        observer(key, value)
    kind = getattr(module, "kv_cache_type", None)
    if kind is not None:
        key = fake_quantize_kv(key, module.k_scale, kind)
        value = fake_quantize_kv(value, module.v_scale, kind)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_kv_attention() -> str:
    """Register ``kv_quantized_attention`` (and SDPA's mask) with transformers under ``KV_ATTENTION``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(KV_ATTENTION, kv_quantized_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(KV_ATTENTION, sdpa_mask)
    return KV_ATTENTION


def use_kv_quantized_attention(config) -> str:
    """Point a model config at the KV-quantizing attention; returns the implementation it had."""
    previous = config._attn_implementation
    config._attn_implementation = register_kv_attention()
    return previous


def kv_cache_scheme_args(kind: str, strategy: str) -> dict:
    """compressed-tensors ``QuantizationArgs`` of the KV cache (``kv_cache_scheme`` in config.json)."""
    return {
        "num_bits": 8,
        "type": kind,
        "symmetric": True,
        "group_size": None,
        "strategy": strategy,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }
