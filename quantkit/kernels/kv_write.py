"""Write new tokens' keys and values into the paged KV cache: the plain-torch reference.

Cache layout (shared with the model runner and every attention kernel): per layer ``k_cache`` and
``v_cache`` of shape (num_blocks, block_size, num_kv_heads, head_dim), contiguous; token slot
``s`` is row ``s`` of the cache viewed as (num_blocks * block_size, num_kv_heads, head_dim), that
is block ``s // block_size`` at offset ``s % block_size``. An int8 or float8_e4m3fn cache holds
8-bit codes with per-head scales (``kernels/kv_quant.py``): writing quantizes.
"""

from __future__ import annotations

import torch

from quantkit.kernels.kv_quant import check_kv_scales
from quantkit.quant.w8a8 import FP8_DTYPE, quantize


def check_kv_write_args(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """ValueError naming the first argument whose shape does not fit the cache layout."""
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"k and v must both be (tokens, kv_heads, head_dim), got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be (num_blocks, block_size, kv_heads, head_dim), "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k.shape[1:] != k_cache.shape[2:]:
        raise ValueError(
            f"k has heads x dim {tuple(k.shape[1:])} but the cache holds {tuple(k_cache.shape[2:])}"
        )
    if slot_mapping.shape != (k.shape[0],):
        raise ValueError(
            f"slot_mapping must be ({k.shape[0]},), got {tuple(slot_mapping.shape)}"
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous")


def write_kv_reference(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Copy token ``t``'s k and v (T, Hkv, D) to cache slot ``slot_mapping[t]``; -1 skips the token.

    An 8-bit cache stores ``round(k / k_scale[h])`` (and likewise v) with per-head scales (Hkv,)."""
    check_kv_write_args(k, v, k_cache, v_cache, slot_mapping)
    kind = check_kv_scales(k_cache, k_scale, v_scale)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(torch.int64)
    for new, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        values = new[keep]
        values = values.to(cache.dtype) if kind is None else quantize(values, scale.view(1, -1, 1), kind)
        flat = cache.view(-1, *cache.shape[2:])
        if cache.dtype == FP8_DTYPE:  # index_copy_ has no float8 kernel on the CPU: copy the bytes
            flat, values = flat.view(torch.uint8), values.view(torch.uint8)
        flat.index_copy_(0, slots, values)
