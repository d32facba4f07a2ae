"""Write new tokens' keys and values into the paged KV cache: the Triton kernel (one program per token).

Same contract as ``kv_write.write_kv_reference``; k and v may be strided views (for example
slices of a fused QKV projection) as long as their last dimension is contiguous. An 8-bit cache
(QUANT 1: int8, 2: float8_e4m3fn) stores ``k / k_scale[head]`` rounded as the reference rounds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.act_quant_triton import _round_half_even, round_to_e4m3
from quantkit.kernels.backend import next_power_of_2
from quantkit.kernels.kv_quant import check_kv_scales
from quantkit.kernels.kv_write import check_kv_write_args


@triton.jit
def _to_8bit_cache(x, scale_ptr, heads, head_mask, QUANT: tl.constexpr):
    """x (BLOCK_H, BLOCK_D) divided by the head's scale and rounded to INT8 (QUANT 1) or to e4m3
    (QUANT 2), as float32. (The 16-bit case stays in the caller: Triton 3.6 refuses a function whose
    branches return different dtypes, even under a constexpr condition.)"""
    scale = tl.load(scale_ptr + heads, mask=head_mask, other=1.0)
    y = tl.math.div_rn(x.to(tl.float32), scale)  # IEEE division, as torch (see act_quant_triton)
    if QUANT == 1:
        return tl.minimum(tl.maximum(_round_half_even(y), -128.0), 127.0)
    return round_to_e4m3(tl.minimum(tl.maximum(y, -448.0), 448.0))


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    k_scale_ptr,
    v_scale_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    stride_cache_head,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < NUM_HEADS) & (dims < HEAD_DIM)
    cache_offsets = slot * stride_cache_slot + heads * stride_cache_head + dims
    head_mask = heads < NUM_HEADS
    k = tl.load(k_ptr + token * stride_kt + heads * stride_kh + dims, mask=mask)
    if QUANT != 0:
        k = _to_8bit_cache(k, k_scale_ptr, heads, head_mask, QUANT)
    tl.store(k_cache_ptr + cache_offsets, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads * stride_vh + dims, mask=mask)
    if QUANT != 0:
        v = _to_8bit_cache(v, v_scale_ptr, heads, head_mask, QUANT)
    tl.store(v_cache_ptr + cache_offsets, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_triton(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Triton version of ``write_kv_reference`` (in place; no host synchronisation)."""
    check_kv_write_args(k, v, k_cache, v_cache, slot_mapping)
    kind = check_kv_scales(k_cache, k_scale, v_scale)
    if k.shape[0] == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    heads, dim = k.shape[1:]
    _write_kv_kernel[(k.shape[0],)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k_scale if kind is not None else slot_mapping,  # never read without QUANT
        v_scale if kind is not None else slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_HEADS=heads,
        HEAD_DIM=dim,
        BLOCK_H=next_power_of_2(heads),
        BLOCK_D=next_power_of_2(dim),
        QUANT={None: 0, "int": 1, "float": 2}[kind],
    )
