"""Write new tokens' keys and values into the paged KV cache: the plain-torch reference.

Cache layout (shared with the model runner and every attention kernel): per layer ``k_cache`` and
``v_cache`` of shape (num_blocks, block_size, num_kv_heads, head_dim), contiguous; token slot
``s`` is row ``s`` of the cache viewed as (num_blocks * block_size, num_kv_heads, head_dim), that
is block ``s // block_size`` at offset ``s % block_size``.
"""

from __future__ import annotations

import torch


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
) -> None:
    """Copy token ``t``'s k and v (T, Hkv, D) to cache slot ``slot_mapping[t]``; -1 skips the token."""
    check_kv_write_args(k, v, k_cache, v_cache, slot_mapping)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].to(torch.int64)
    for new, cache in ((k, k_cache), (v, v_cache)):
        cache.view(-1, *cache.shape[2:]).index_copy_(
            0, slots, new[keep].to(cache.dtype)
        )
