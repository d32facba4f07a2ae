"""Causal attention of packed new tokens over a paged KV cache: the plain-torch reference.

One function serves prefill, chunked prefill, prefix-cache hits, decode and speculative
verification. ``q`` (T, Hq, D) packs the new tokens of B sequences: sequence ``b`` owns rows
``query_start_loc[b]:query_start_loc[b + 1]`` (``n_b`` rows, at least one). ``seq_lens[b]`` is the
sequence's total length including those new tokens, whose keys and values are already in the
cache; the new tokens are the last ``n_b`` of the sequence, so its query ``i`` sits at position
``seq_lens[b] - n_b + i`` and attends to the keys at positions ``0`` to that position. Key ``j``
of sequence ``b`` lives in cache block ``block_tables[b, j // block_size]`` at offset
``j % block_size``. Grouped-query attention: query head ``h`` reads kv head ``h // (Hq // Hkv)``.
An int8 or float8_e4m3fn cache holds 8-bit codes: ``k_scale``/``v_scale`` (Hkv,) dequantize them
(``kernels/kv_quant.py``).
"""

from __future__ import annotations

import torch

from quantkit.kernels.kv_quant import check_kv_scales


def check_paged_attention_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
) -> None:
    """ValueError naming the first argument whose shape breaks the contract above."""
    if q.dim() != 3:
        raise ValueError(f"q must be (tokens, q_heads, head_dim), got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be (num_blocks, block_size, kv_heads, head_dim), "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    kv_heads, head_dim = k_cache.shape[2:]
    if q.shape[2] != head_dim or q.shape[1] % kv_heads != 0:
        raise ValueError(
            f"q has {q.shape[1]} heads of dim {q.shape[2]}; the cache has {kv_heads} kv heads of "
            f"dim {head_dim} (q heads must be a multiple of kv heads)"
        )
    batch = seq_lens.shape[0]
    if seq_lens.dim() != 1 or query_start_loc.shape != (batch + 1,):
        raise ValueError(
            f"seq_lens must be (B,) and query_start_loc (B + 1,), got {tuple(seq_lens.shape)} "
            f"and {tuple(query_start_loc.shape)}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(
            f"block_tables must be ({batch}, max_blocks), got {tuple(block_tables.shape)}"
        )


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention output (T, Hq, D) in q's dtype, softmax in float32, one sequence at a time."""
    check_paged_attention_args(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens
    )
    quantized = check_kv_scales(k_cache, k_scale, v_scale) is not None
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    for b, seq_len in enumerate(seq_lens.tolist()):
        rows = slice(starts[b], starts[b + 1])
        keys, values = gather_sequence_kv(k_cache, v_cache, block_tables[b], seq_len)
        if quantized:
            keys = keys.float() * k_scale.view(1, -1, 1)
            values = values.float() * v_scale.view(1, -1, 1)
        out[rows] = _causal_attention(q[rows], keys, values, scale).to(q.dtype)
    return out


def gather_sequence_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's keys and values (seq_len, Hkv, D), in position order, read through its block table."""
    block_size = k_cache.shape[1]
    blocks = block_table[: -(-seq_len // block_size)].to(torch.int64)
    keys = k_cache[blocks].flatten(0, 1)[:seq_len]
    values = v_cache[blocks].flatten(0, 1)[:seq_len]
    return keys, values


def _causal_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> torch.Tensor:
    """float32 attention of the last n positions (q: n, Hq, D) over all L keys (L, Hkv, D)."""
    n, q_heads, _ = q.shape
    seq_len, kv_heads, _ = keys.shape
    group = q_heads // kv_heads
    keys = keys.float().repeat_interleave(group, dim=1)
    values = values.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), keys) * scale
    query_pos = torch.arange(seq_len - n, seq_len, device=q.device)
    key_pos = torch.arange(seq_len, device=q.device)
    scores.masked_fill_(key_pos[None, :] > query_pos[:, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values)
