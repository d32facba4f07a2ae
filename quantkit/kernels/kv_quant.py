"""What a quantized paged KV cache adds to the kernels' contract.

A cache tensor of dtype int8 or float8_e4m3fn holds 8-bit keys or values: ``k ≈ k_scale[h] · q``
with one float32 scale per KV head (``k_scale`` and ``v_scale`` of shape (num_kv_heads,), from
the checkpoint's per-head or per-tensor scales). ``write_kv`` quantizes on the way in (round to
nearest even, INT8 clamped to [-128, 127], FP8 saturated at ±448); the attention kernels read the
codes and apply the per-head scales to the scores (keys) and to the output (values), so the cache
holds half the bytes of a 16-bit one and nothing is dequantized outside the kernels.
"""

from __future__ import annotations

import torch

from quantkit.quant.w8a8 import FP8_DTYPE

KV_CACHE_DTYPES = {"int": torch.int8, "float": FP8_DTYPE}


def cache_kind(cache: torch.Tensor) -> str | None:
    """``"int"`` or ``"float"`` for an 8-bit cache, None for a 16/32-bit one."""
    if cache.dtype == torch.int8:
        return "int"
    if cache.dtype == FP8_DTYPE:
        return "float"
    return None


def check_kv_scales(k_cache: torch.Tensor, k_scale: torch.Tensor | None, v_scale: torch.Tensor | None) -> str | None:
    """ValueError unless an 8-bit cache comes with per-head float32 scales (and a wider one without)."""
    kind = cache_kind(k_cache)
    if kind is None:
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"KV scales were given for a {k_cache.dtype} cache, which holds unscaled values")
        return None
    heads = k_cache.shape[2]
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale is None:
            raise ValueError(f"an {k_cache.dtype} KV cache needs {name}: there is no default scale")
        if scale.shape != (heads,) or scale.dtype != torch.float32 or not scale.is_contiguous():
            raise ValueError(f"{name} must be contiguous float32 of shape ({heads},), got {scale.dtype} "
                             f"{tuple(scale.shape)}")
    return kind
