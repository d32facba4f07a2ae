"""Shared inputs and checks for the kernel tests: random paged batches, quantized weights, tolerances."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from quantkit.kernels import pack_quantized_weight, triton_available

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

needs_triton = pytest.mark.skipif(
    not triton_available() or not (INTERPRET or torch.cuda.is_available()),
    reason="Triton kernels need CUDA or TRITON_INTERPRET=1 (make test sets it) and the triton package",
)
not_interpreted = pytest.mark.skipif(
    INTERPRET, reason="realistic shapes are far too slow under TRITON_INTERPRET=1"
)
# Triton 3.9's interpreter multiplies the raw uint16 bits of bfloat16 operands in tl.dot, so
# bfloat16 through a dot is checked on the GPU only
SKIP_INTERPRETED_BF16_DOT = pytest.mark.skipif(
    INTERPRET, reason="the Triton interpreter's tl.dot mishandles bfloat16"
)
BF16_DOT = pytest.param(torch.bfloat16, marks=SKIP_INTERPRETED_BF16_DOT, id="bfloat16")

# max |actual - expected| / max |expected|: output rounding plus 16-bit products
RELATIVE_TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def triton_device() -> str:
    """Where the small Triton tests run: the CPU under the interpreter, else the GPU."""
    return "cpu" if INTERPRET else "cuda"


def assert_close_scaled(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype
) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert torch.isfinite(actual).all(), "non-finite output"
    scale = expected.float().abs().max().clamp_min(1e-6)
    error = (actual.float() - expected.float()).abs().max() / scale
    assert error <= RELATIVE_TOLERANCE[dtype], f"relative error {error:.3g} for {dtype}"


# (new tokens per sequence, total length per sequence) of paged batches: a full prefill, decodes, a
# prefill chunk behind a cached prefix, speculative verification (1 + 3 tokens), lengths off the block size
MIXED = ([7, 1, 5, 1, 4], [7, 23, 37, 1, 19])
PREFILL_ONLY = ([12, 3], [12, 30])
DECODE_ONLY = ([1, 1, 1, 1], [5, 16, 33, 70])


@dataclass
class PagedBatch:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    keys: list[torch.Tensor]  # per sequence, contiguous (L, Hkv, D)
    values: list[torch.Tensor]

    def args(self) -> tuple:
        return (
            self.q,
            self.k_cache,
            self.v_cache,
            self.block_tables,
            self.query_start_loc,
            self.seq_lens,
        )


def paged_batch(
    query_lens: list[int],
    seq_lens: list[int],
    *,
    kv_heads: int = 2,
    group: int = 2,
    head_dim: int = 32,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
) -> PagedBatch:
    """Random sequences scattered over shuffled cache blocks; unused cache slots hold NaN."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-length // block_size) for length in seq_lens]
    num_blocks = sum(blocks_needed) + 3
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"))
    v_cache = torch.full(shape, float("nan"))
    block_ids = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.zeros(len(seq_lens), max(blocks_needed) + 1, dtype=torch.int32)
    keys, values, used = [], [], 0
    for b, length in enumerate(seq_lens):
        table = block_ids[used : used + blocks_needed[b]]
        used += blocks_needed[b]
        block_tables[b, : len(table)] = table.to(torch.int32)
        key = torch.randn(length, kv_heads, head_dim, generator=gen)
        value = torch.randn(length, kv_heads, head_dim, generator=gen)
        positions = torch.arange(length)
        slots = table[positions // block_size] * block_size + positions % block_size
        k_cache.view(-1, kv_heads, head_dim)[slots] = key
        v_cache.view(-1, kv_heads, head_dim)[slots] = value
        keys.append(key.to(dtype).to(device))
        values.append(value.to(dtype).to(device))
    starts = torch.tensor([0, *query_lens]).cumsum(0).to(torch.int32)
    q = torch.randn(sum(query_lens), kv_heads * group, head_dim, generator=gen)
    return PagedBatch(
        q.to(dtype).to(device),
        k_cache.to(dtype).to(device),
        v_cache.to(dtype).to(device),
        block_tables.to(device),
        starts.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        keys,
        values,
    )


@dataclass
class QuantizedCase:
    codes: torch.Tensor  # (out, in), columns in packed order
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    bits: int
    perm: torch.Tensor | None

    def pack(self):
        return pack_quantized_weight(
            self.codes,
            self.scales,
            self.zeros,
            self.group_size,
            self.bits,
            perm=self.perm,
        )

    def weight(self) -> torch.Tensor:
        """float32 (out, in) in the original input order, straight from the defining formula."""
        in_features = self.codes.shape[1]
        span = in_features if self.group_size == -1 else self.group_size
        groups = torch.arange(in_features, device=self.codes.device) // span
        weight = (
            self.scales[:, groups].float()
            * (self.codes - self.zeros[:, groups]).float()
        )
        if self.perm is None:
            return weight
        original = torch.empty_like(weight)
        original[:, self.perm] = weight
        return original


def quantized_case(
    out_features: int,
    in_features: int,
    group_size: int,
    bits: int,
    *,
    act_order: bool = False,
    scale_dtype: torch.dtype = torch.float16,
    device: str = "cpu",
    seed: int = 0,
) -> QuantizedCase:
    gen = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == -1 else -(-in_features // group_size)
    levels = 1 << bits
    codes = torch.randint(0, levels, (out_features, in_features), generator=gen)
    zeros = torch.randint(0, levels, (out_features, n_groups), generator=gen)
    scales = (torch.rand(out_features, n_groups, generator=gen) + 0.5) * (0.2 / levels)
    perm = torch.randperm(in_features, generator=gen) if act_order else None
    return QuantizedCase(
        codes.to(device),
        scales.to(scale_dtype).to(device),
        zeros.to(device),
        group_size,
        bits,
        None if perm is None else perm.to(device),
    )
