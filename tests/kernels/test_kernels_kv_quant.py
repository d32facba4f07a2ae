"""8-bit paged KV cache (INT8 and FP8 e4m3 with per-head scales): the reference write quantizes,
the reference attention equals attention over the dequantized cache, and the Triton write and
attention kernels (prefill, decode split and direct) match the references."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    DECODE_ONLY,
    MIXED,
    PREFILL_ONLY,
    assert_close_scaled,
    needs_triton,
    not_interpreted,
    paged_batch,
    triton_device,
)

from quantkit.kernels import paged_attention_reference, write_kv_reference
from quantkit.kernels.kv_quant import KV_CACHE_DTYPES
from quantkit.quant.w8a8 import dequantize, quantize

KINDS = ["int", "float"]


def quantized_cache(batch, kind):
    """The batch's caches as 8-bit codes with per-head scales; unused slots hold garbage codes."""
    out = []
    for cache in (batch.k_cache, batch.v_cache):
        unused = torch.isnan(cache)
        clean = torch.nan_to_num(cache.float(), nan=0.0)
        scale = (clean.abs().amax(dim=(0, 1, 3)) / (127 if kind == "int" else 448)).contiguous()
        codes = quantize(clean, scale.view(1, 1, -1, 1), kind)
        garbage = torch.full_like(codes.view(torch.int8), 0x7F)  # the byte 0x7F: 127 in int8, NaN in e4m3
        codes = torch.where(unused, garbage, codes.view(torch.int8)).view(KV_CACHE_DTYPES[kind])
        out += [codes, scale]
    return out  # k_codes, k_scale, v_codes, v_scale


def dequantized(codes, scale, like):
    values = dequantize(codes, scale.view(1, 1, -1, 1)).to(like.dtype)
    return torch.where(torch.isnan(like), like, values)  # unused slots stay NaN


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lens", [MIXED, DECODE_ONLY])
def test_reference_reads_the_dequantized_cache(kind, lens):
    batch = paged_batch(*lens, group=2, seed=3)
    k_codes, k_scale, v_codes, v_scale = quantized_cache(batch, kind)
    got = paged_attention_reference(batch.q, k_codes, v_codes, *batch.args()[3:], 0.3, k_scale, v_scale)
    want = paged_attention_reference(batch.q, dequantized(k_codes, k_scale, batch.k_cache),
                                     dequantized(v_codes, v_scale, batch.v_cache), *batch.args()[3:], 0.3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    exact = paged_attention_reference(*batch.args(), 0.3)
    assert float((got - exact).abs().max()) < (0.05 if kind == "int" else 0.15)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_write_quantizes_per_head(kind):
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(5, 2, 32, generator=gen), torch.randn(5, 2, 32, generator=gen)
    k_scale, v_scale = torch.tensor([0.01, 0.02]), torch.tensor([0.03, 0.005])
    k_cache = torch.zeros(3, 4, 2, 32, dtype=KV_CACHE_DTYPES[kind])
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([3, -1, 0, 9, 4])
    write_kv_reference(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    flat_k, flat_v = k_cache.view(-1, 2, 32), v_cache.view(-1, 2, 32)
    for token, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        assert torch.equal(flat_k[slot].view(torch.int8), quantize(k[token], k_scale.view(2, 1), kind).view(torch.int8))
        assert torch.equal(flat_v[slot].view(torch.int8), quantize(v[token], v_scale.view(2, 1), kind).view(torch.int8))
    assert not bool(flat_k[[1, 2, 5, 6, 7, 8, 10, 11]].view(torch.int8).any())  # nothing else was written


def test_scales_are_required_exactly_for_8bit_caches():
    k = torch.randn(2, 2, 8)
    slots = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="needs k_scale"):
        write_kv_reference(k, k, torch.zeros(1, 4, 2, 8, dtype=torch.int8), torch.zeros(1, 4, 2, 8, dtype=torch.int8),
                           slots)
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        write_kv_reference(k, k, torch.zeros(1, 4, 2, 8, dtype=torch.int8), torch.zeros(1, 4, 2, 8, dtype=torch.int8),
                           slots, torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="unscaled"):
        write_kv_reference(k, k, torch.zeros(1, 4, 2, 8), torch.zeros(1, 4, 2, 8), slots, torch.ones(2), torch.ones(2))


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_triton_write_equals_reference(kind):
    from quantkit.kernels.kv_write_triton import write_kv_triton

    device = triton_device()
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(6, 4 * 32 + 2 * 2 * 32, generator=gen).to(device)  # k and v as strided slices
    k = qkv[:, 128:192].view(6, 2, 32)
    v = qkv[:, 192:].view(6, 2, 32)
    k_scale = torch.tensor([0.004, 0.02], device=device)  # small: some values saturate
    v_scale = torch.tensor([0.01, 0.03], device=device)
    slots = torch.tensor([5, -1, 0, 11, 2, 7], device=device)
    caches = []
    for write in (write_kv_reference, write_kv_triton):
        k_cache = torch.zeros(3, 4, 2, 32, dtype=KV_CACHE_DTYPES[kind], device=device)
        v_cache = torch.zeros_like(k_cache)
        write(k, v, k_cache, v_cache, slots, k_scale, v_scale)
        caches.append((k_cache.view(torch.int8), v_cache.view(torch.int8)))
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lens, group", [(MIXED, 4), (PREFILL_ONLY, 1), (DECODE_ONLY, 4)],
                         ids=["mixed", "prefill", "decode"])
def test_triton_attention_reads_8bit_caches(kind, lens, group):
    from quantkit.kernels.attention_triton import paged_attention_triton

    device = triton_device()
    batch = paged_batch(*lens, group=group, seed=group, device=device)
    k_codes, k_scale, v_codes, v_scale = quantized_cache(batch, kind)
    args = (batch.q, k_codes, v_codes, *batch.args()[3:])
    want = paged_attention_reference(*args, 0.3, k_scale, v_scale)
    got = paged_attention_triton(*args, 0.3, k_scale=k_scale, v_scale=v_scale)
    assert_close_scaled(got, want, torch.float32)


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_decode_splits_read_8bit_caches(kind, splits):
    from quantkit.kernels.attention_decode_triton import paged_decode_triton

    device = triton_device()
    batch = paged_batch(*DECODE_ONLY, group=2, seed=7, device=device)
    k_codes, k_scale, v_codes, v_scale = quantized_cache(batch, kind)
    want = paged_attention_reference(batch.q, k_codes, v_codes, *batch.args()[3:], 0.3, k_scale, v_scale)
    got = paged_decode_triton(batch.q, k_codes, v_codes, batch.block_tables, batch.seq_lens, 0.3,
                              num_splits=splits, k_scale=k_scale, v_scale=v_scale)
    assert_close_scaled(got, want, torch.float32)


@pytest.mark.gpu
@not_interpreted
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens", [([1] * 16, [2048] * 16), ([512, 1, 300], [512, 1800, 900])], ids=["decode", "mixed"])
def test_gpu_attention_over_8bit_caches(kind, dtype, lens):
    from quantkit.kernels.attention_triton import paged_attention_triton

    batch = paged_batch(*lens, kv_heads=8, group=4, head_dim=128, dtype=dtype, device="cuda")
    k_codes, k_scale, v_codes, v_scale = quantized_cache(batch, kind)
    args = (batch.q, k_codes, v_codes, *batch.args()[3:])
    want = paged_attention_reference(*args, 128**-0.5, k_scale, v_scale)
    got = paged_attention_triton(*args, 128**-0.5, k_scale=k_scale, v_scale=v_scale, max_seq_len=max(lens[1]))
    assert_close_scaled(got, want, dtype)
