"""write_kv: the reference puts each token at its slot; the Triton kernel matches the reference."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import needs_triton, not_interpreted, triton_device

from quantkit.kernels import write_kv_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(
    tokens, num_blocks, block_size, heads, dim, dtype, device, seed=0, strided=False
):
    gen = torch.Generator().manual_seed(seed)
    cache_shape = (num_blocks, block_size, heads, dim)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype).to(device)
    # k and v as slices of one fused projection, as a model runner produces them
    fused = torch.randn(tokens, 3, heads, dim, generator=gen).to(dtype).to(device)
    k, v = (
        (fused[:, 1], fused[:, 2])
        if strided
        else (fused[:, 1].contiguous(), fused[:, 2].contiguous())
    )
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[torch.randperm(tokens, generator=gen)[: tokens // 4]] = -1
    return k, v, k_cache, v_cache, slots.to(device)


def test_reference_places_each_token_at_its_slot():
    k, v, k_cache, v_cache, slots = _case(12, 4, 8, 2, 16, torch.float32, "cpu")
    before_k, before_v = k_cache.clone(), v_cache.clone()
    write_kv_reference(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, 16), v_cache.view(-1, 2, 16)
    written = set()
    for token, slot in enumerate(slots.tolist()):
        if slot < 0:
            continue
        written.add(slot)
        block, offset = divmod(slot, 8)
        assert torch.equal(k_cache[block, offset], k[token])
        assert torch.equal(v_cache[block, offset], v[token])
    untouched = [s for s in range(32) if s not in written]
    assert torch.equal(flat_k[untouched], before_k.view(-1, 2, 16)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(-1, 2, 16)[untouched])


def test_reference_rejects_mismatched_heads():
    k, v, k_cache, v_cache, slots = _case(4, 2, 8, 2, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="heads x dim"):
        write_kv_reference(k[:, :1], v[:, :1], k_cache, v_cache, slots)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("shape", [(9, 3, 8, 2, 32), (20, 4, 16, 3, 64)])
def test_triton_matches_reference(shape, strided, dtype):
    from quantkit.kernels.kv_write_triton import write_kv_triton

    k, v, k_cache, v_cache, slots = _case(
        *shape, dtype, triton_device(), strided=strided
    )
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv_reference(k, v, expected_k, expected_v, slots)
    write_kv_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.gpu
@not_interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_matches_reference_llama_shapes(dtype):
    from quantkit.kernels.kv_write_triton import write_kv_triton

    k, v, k_cache, v_cache, slots = _case(
        4096, 2048, 16, 8, 128, dtype, "cuda", strided=True
    )
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    write_kv_reference(k, v, expected_k, expected_v, slots)
    write_kv_triton(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
