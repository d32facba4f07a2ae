"""Paged decode attention in Triton (flash-decoding): one query per sequence, keys split across programs.

A decode step has too few queries to fill the GPU with one program per (sequence, head), so the
keys of each sequence are cut into ``num_splits`` ranges of ``split_len`` keys. Program
(sequence, kv head, split) attends the ``group`` query heads that share the kv head (loaded once,
as one padded tile of BLOCK_G rows) over its key range and writes a partial result (normalised
output, running max, sum of exponentials); a second kernel combines the splits. With one split
the first kernel writes the output directly. The split is sized from shapes only (the block
tables' capacity, or a caller's bound), so launches need no host sync and CUDA graphs can hold them.
An 8-bit cache is read as in ``attention_triton`` (KV_QUANT: per-head scales on scores and output).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from quantkit.kernels.attention_triton import LOG2_E
from quantkit.kernels.backend import dot_precision, next_power_of_2
from quantkit.kernels.kv_quant import check_kv_scales

MIN_SPLIT_LEN = (
    256  # fewer keys per program than this costs more in the combine than it gains
)


@triton.jit
def _paged_decode_kernel(
    out_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    k_scale_ptr,
    v_scale_ptr,
    scale_log2,
    split_len,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    stride_table,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CACHE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    KV_QUANT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    key_begin = split * split_len
    if key_begin >= seq_len:
        return
    key_end = tl.minimum(key_begin + split_len, seq_len)

    rows = tl.arange(0, BLOCK_G)
    head = kv_head * GROUP + rows
    row_valid = rows < GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_valid = dims < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_table
    cache_head = kv_head * stride_cache_head
    if KV_QUANT:
        scale_log2 = scale_log2 * tl.load(k_scale_ptr + kv_head)
    for start in range(key_begin, key_end, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        key_valid = keys < key_end
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
        s = tl.where(key_valid[None, :], s, float("-inf"))
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
    out_mask = row_valid[:, None] & dim_valid[None, :]
    if NUM_SPLITS == 1:
        out_ptrs = out_ptr + seq * stride_ot + head[:, None] * stride_oh + dims[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # partials are (B, Hq, NUM_SPLITS[, BLOCK_D]) float32, contiguous
        partial = (seq * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(
            partial_out_ptr + partial[:, None] * BLOCK_D + dims[None, :],
            out,
            mask=out_mask,
        )
        tl.store(partial_max_ptr + partial, m_i, mask=row_valid)
        tl.store(partial_sum_ptr + partial, l_i, mask=row_valid)


@triton.jit
def _combine_splits_kernel(
    out_ptr,
    partial_out_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    seq_lens_ptr,
    split_len,
    stride_ot,
    stride_oh,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    splits = tl.arange(0, BLOCK_S)
    used = (splits < NUM_SPLITS) & (splits * split_len < seq_len)
    partial = (seq * NUM_HEADS + head) * NUM_SPLITS + splits
    m = tl.load(partial_max_ptr + partial, mask=used, other=float("-inf"))
    weight = tl.load(partial_sum_ptr + partial, mask=used, other=0.0) * tl.exp2(
        m - tl.max(m, 0)
    )
    weight = tl.where(used, weight, 0.0)
    dims = tl.arange(0, BLOCK_D)
    outs = tl.load(
        partial_out_ptr + partial[:, None] * BLOCK_D + dims[None, :],
        mask=used[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )
    out = tl.sum(outs * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(
        out_ptr + seq * stride_ot + head * stride_oh + dims,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_split(
    batch: int,
    kv_heads: int,
    max_seq_len: int,
    block_n: int,
    device: torch.device,
    num_splits: int | None = None,
) -> tuple[int, int]:
    """(num_splits, split_len), split_len a multiple of block_n.

    Unless ``num_splits`` is given: about two programs per multiprocessor, each with at least
    MIN_SPLIT_LEN keys.
    """
    max_seq_len = max(max_seq_len, 1)
    if num_splits is None:
        sms = _multiprocessors(device.index or 0) if device.type == "cuda" else 4
        by_occupancy = _cdiv(2 * sms, batch * kv_heads)
        by_length = max(1, max_seq_len // MIN_SPLIT_LEN)
        num_splits = max(1, min(by_occupancy, by_length))
    split_len = _cdiv(_cdiv(max_seq_len, num_splits), block_n) * block_n
    return _cdiv(max_seq_len, split_len), split_len


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def paged_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    block_n: int = 32,
    num_warps: int = 4,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query per sequence (q: (B, Hq, D)) over its whole sequence.

    ``max_seq_len`` bounds ``seq_lens`` (default: the block tables' capacity); ``num_splits``
    overrides the heuristic (tests use it to exercise both the split and the direct path).
    The default tile (32 keys, 4 warps) keeps a head_dim-128 program within the register file
    without spilling on sm_90 (64 keys at 4 warps spills).
    """
    quantized = check_kv_scales(k_cache, k_scale, v_scale) is not None
    q = q if q.stride(-1) == 1 else q.contiguous()
    out = torch.empty_like(q)
    batch, q_heads, head_dim = q.shape
    if batch == 0:
        return out
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    block_n = max(block_n, 16)
    if max_seq_len is None:
        max_seq_len = block_tables.shape[1] * k_cache.shape[1]
    splits, split_len = choose_split(
        batch, kv_heads, max_seq_len, block_n, q.device, num_splits
    )
    block_d = max(next_power_of_2(head_dim), 16)
    partial_out = partial_max = partial_sum = (
        out  # unused placeholders when splits == 1
    )
    if splits > 1:
        partial_out = torch.empty(
            batch, q_heads, splits, block_d, dtype=torch.float32, device=q.device
        )
        partial_max = torch.empty(
            batch, q_heads, splits, dtype=torch.float32, device=q.device
        )
        partial_sum = torch.empty_like(partial_max)
    _paged_decode_kernel[(batch, kv_heads, splits)](
        out,
        partial_out,
        partial_max,
        partial_sum,
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        k_scale if quantized else seq_lens,  # never read without KV_QUANT
        v_scale if quantized else seq_lens,
        scale * LOG2_E,
        split_len,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        NUM_HEADS=q_heads,
        GROUP=group,
        BLOCK_G=max(next_power_of_2(group), 16),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        CACHE_BLOCK=k_cache.shape[1],
        BLOCK_N=block_n,
        NUM_SPLITS=splits,
        DOT_PRECISION=dot_precision(q.dtype),
        KV_QUANT=quantized,
        num_warps=num_warps,
        num_stages=2,
    )
    if splits > 1:
        _combine_splits_kernel[(batch, q_heads)](
            out,
            partial_out,
            partial_max,
            partial_sum,
            seq_lens,
            split_len,
            out.stride(0),
            out.stride(1),
            NUM_HEADS=q_heads,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            NUM_SPLITS=splits,
            BLOCK_S=next_power_of_2(splits),
        )
    return out
