"""The one place that picks a kernel implementation (rule in ``backend``): Triton on CUDA, else the reference.

Each function imports its Triton module only when it runs the Triton path, so this module (and
quantkit) imports without triton installed.
"""

from __future__ import annotations

import torch

from quantkit.kernels.attention_reference import paged_attention_reference
from quantkit.kernels.backend import use_triton
from quantkit.kernels.kv_write import write_kv_reference
from quantkit.kernels.layer_ops_reference import (
    add_rms_norm_reference,
    rotary_reference,
    silu_and_mul_reference,
)
from quantkit.kernels.packed_weight import PackedWeight, quantized_linear_reference


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store token ``t``'s k, v (T, Hkv, D) in cache slot ``slot_mapping[t]`` (int64; -1 skips);
    an 8-bit cache (int8, float8_e4m3fn) takes per-head scales (Hkv,) and stores codes."""
    if use_triton(k):
        from quantkit.kernels.kv_write_triton import write_kv_triton

        write_kv_triton(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        write_kv_reference(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention (T, Hq, D) of packed new tokens over the paged cache (see ``attention_reference``).

    An 8-bit cache (int8, float8_e4m3fn) needs its per-head ``k_scale``/``v_scale`` (Hkv,).

    Every sequence must have at least one new token; when each has exactly one (T == B) the GPU
    runs the flash-decoding kernel. ``max_seq_len``: optional upper bound of ``seq_lens``, a
    tuning hint for that kernel (pass the same value to every call a CUDA graph replays).
    """
    if use_triton(q):
        from quantkit.kernels.attention_triton import paged_attention_triton

        return paged_attention_triton(
            q,
            k_cache,
            v_cache,
            block_tables,
            query_start_loc,
            seq_lens,
            scale,
            max_seq_len=max_seq_len,
            k_scale=k_scale,
            v_scale=v_scale,
        )
    return paged_attention_reference(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, k_scale, v_scale
    )


def quantized_linear(
    x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` for x (..., in) with W held as a ``PackedWeight``."""
    if use_triton(x):
        from quantkit.kernels.w4a16_triton import quantized_linear_triton

        return quantized_linear_triton(x, packed, bias)
    return quantized_linear_reference(x, packed, bias)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual) * weight, x + residual) for x (T, N); residual None: x alone."""
    if use_triton(x):
        from quantkit.kernels.layer_ops_triton import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (T, H, D) rotated by cos/sin (T, D): in place on the GPU, a new tensor on the reference path."""
    if use_triton(x):
        from quantkit.kernels.layer_ops_triton import rotary_triton

        return rotary_triton(x, cos, sin)
    return rotary_reference(x, cos, sin)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for (T, N) operands."""
    if use_triton(gate):
        from quantkit.kernels.layer_ops_triton import silu_and_mul_triton

        return silu_and_mul_triton(gate, up)
    return silu_and_mul_reference(gate, up)
