"""Causal paged attention in Triton: a flash-attention kernel over (query block, kv head) tiles.

Same contract as ``attention_reference.paged_attention_reference``. A tile is BLOCK_M rows, each a
(query, query head) pair: BLOCK_Q = BLOCK_M // group consecutive queries of one sequence times
the ``group`` query heads that share a kv head, so each key/value tile is loaded once per group.
The kernel walks the keys BLOCK_N at a time, looking up each key's cache block in the block
table (so BLOCK_N and the cache block size are independent), with an online softmax in float32.

Sequences' query blocks are numbered without a host sync: sequence ``b``'s blocks start at
``query_start_loc[b] // BLOCK_Q + b``, so ``T // BLOCK_Q + B`` programs cover every batch and a
program finds its sequence by binary search (programs past a sequence's last query exit).
When every sequence has one query (decode), ``paged_attention_triton`` runs the flash-decoding
kernel of ``attention_decode_triton`` instead.

8-bit cache (KV_QUANT): the codes are widened to q's dtype in registers (exact: int8 and e4m3
values are 16-bit floats), the key scale of the program's kv head multiplies the scores and the
value scale the output, so ``q · (s_k k) = s_k (q · k)`` and ``Σ p (s_v v) = s_v Σ p v`` cost one
multiply each per tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from quantkit.kernels.attention_reference import check_paged_attention_args
from quantkit.kernels.backend import dot_precision, next_power_of_2
from quantkit.kernels.kv_quant import check_kv_scales

LOG2_E = 1.4426950408889634


@triton.jit
def find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose query blocks hold ``q_block`` (see the module docstring)."""
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _paged_prefill_kernel(
    out_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    k_scale_ptr,
    v_scale_ptr,
    scale_log2,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    stride_table,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = find_sequence(query_start_loc_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    num_queries = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_block = q_block - (q_start // BLOCK_Q + seq)
    if local_block * BLOCK_Q >= num_queries:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - num_queries

    rows = tl.arange(0, BLOCK_M)
    query = local_block * BLOCK_Q + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_valid = (rows < BLOCK_Q * GROUP) & (query < num_queries)
    query_pos = context_len + query
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    q = tl.load(
        q_ptr
        + (q_start + query)[:, None] * stride_qt
        + head[:, None] * stride_qh
        + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # keys up to the last query of this tile; every row sees key 0, so no row's max stays -inf
    kv_end = context_len + tl.minimum((local_block + 1) * BLOCK_Q, num_queries)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    cache_head = kv_head * stride_cache_head
    if KV_QUANT:
        scale_log2 = scale_log2 * tl.load(k_scale_ptr + kv_head)
    for start in range(0, kv_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_valid = keys < kv_end
        block = tl.load(table + keys // CACHE_BLOCK, mask=key_valid, other=0).to(
            tl.int64
        )
        slot = (
            block * stride_cache_block
            + (keys % CACHE_BLOCK) * stride_cache_offset
            + cache_head
        )
        tile_mask = key_valid[:, None] & dim_valid[None, :]
        k = tl.load(
            k_cache_ptr + slot[:, None] + dims[None, :], mask=tile_mask, other=0.0
        )
        if KV_QUANT:
            k = k.to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = (keys[None, :] <= query_pos[:, None]) & key_valid[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + slot[:, None] + dims[None, :], mask=tile_mask, other=0.0
        )
        if KV_QUANT:
            v = v.to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(
            p.to(v.dtype), v, input_precision=DOT_PRECISION
        )
        m_i = m_new

    out = acc / l_i[:, None]
    if KV_QUANT:
        out = out * tl.load(v_scale_ptr + kv_head)
    tl.store(
        out_ptr
        + (q_start + query)[:, None] * stride_ot
        + head[:, None] * stride_oh
        + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )


def paged_attention_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int | None = None,
    block_m: int = 64,
    block_n: int = 64,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of ``paged_attention_reference``; flash-decoding when every sequence has one query.

    ``max_seq_len`` (an upper bound of ``seq_lens``, default the block tables' capacity) sizes the
    decode kernel's split of the keys; it never changes the result. No host synchronisation.
    """
    check_paged_attention_args(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens
    )
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides")
    if seq_lens.stride(0) != 1 or query_start_loc.stride(0) != 1 or block_tables.stride(1) != 1:
        raise ValueError("seq_lens, query_start_loc and block-table rows must be contiguous")
    if q.shape[0] == seq_lens.shape[0]:
        from quantkit.kernels.attention_decode_triton import paged_decode_triton

        return paged_decode_triton(
            q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len=max_seq_len,
            k_scale=k_scale, v_scale=v_scale,
        )
    return paged_prefill_triton(
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        scale,
        block_m=block_m,
        block_n=block_n,
        k_scale=k_scale,
        v_scale=v_scale,
    )


def paged_prefill_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    block_m: int = 64,
    block_n: int = 64,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The general kernel, for any mix of query counts per sequence."""
    quantized = check_kv_scales(k_cache, k_scale, v_scale) is not None
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q)
    if q.shape[0] == 0:
        return out
    kv_heads, head_dim = k_cache.shape[2:]
    group = q.shape[1] // kv_heads
    block_m = max(block_m, next_power_of_2(group), 16)
    block_q = block_m // group
    grid = (q.shape[0] // block_q + seq_lens.shape[0], kv_heads)
    _paged_prefill_kernel[grid](
        out,
        q,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        k_scale if quantized else seq_lens,  # never read without KV_QUANT
        v_scale if quantized else seq_lens,
        scale * LOG2_E,
        seq_lens.shape[0],
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_D=max(next_power_of_2(head_dim), 16),
        CACHE_BLOCK=k_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        BLOCK_N=max(block_n, 16),
        DOT_PRECISION=dot_precision(q.dtype),
        KV_QUANT=quantized,
        num_warps=8,  # at 4 warps a 64 x 64 tile of head_dim 128 spills registers on sm_90
        num_stages=2,
    )
    return out
