"""paged_attention: the reference equals causal SDPA on contiguous K/V; the Triton kernels match the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_cases import (
    BF16_DOT,
    DECODE_ONLY,
    MIXED,
    PREFILL_ONLY,
    SKIP_INTERPRETED_BF16_DOT,
    assert_close_scaled,
    needs_triton,
    not_interpreted,
    paged_batch,
    triton_device,
)

from quantkit.kernels import paged_attention_reference


def _sdpa(q, keys, values, scale):
    """Attention of the last n positions over L contiguous keys, by torch SDPA with an explicit mask."""
    n, q_heads, _ = q.shape
    length, kv_heads, _ = keys.shape
    group = q_heads // kv_heads
    query_pos = torch.arange(length - n, length)[:, None]
    mask = torch.arange(length)[None, :] <= query_pos
    out = F.scaled_dot_product_attention(
        q.float().transpose(0, 1),
        keys.float().repeat_interleave(group, 1).transpose(0, 1),
        values.float().repeat_interleave(group, 1).transpose(0, 1),
        attn_mask=mask.to(q.device),
        scale=scale,
    )
    return out.transpose(0, 1)


@pytest.mark.parametrize("lens", [MIXED, PREFILL_ONLY, DECODE_ONLY])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [8, 16])
def test_reference_equals_causal_sdpa(lens, group, block_size):
    batch = paged_batch(
        *lens, group=group, block_size=block_size, seed=group + block_size
    )
    scale = 0.3
    out = paged_attention_reference(*batch.args(), scale)
    starts = batch.query_start_loc.tolist()
    for b in range(len(lens[0])):
        rows = slice(starts[b], starts[b + 1])
        expected = _sdpa(batch.q[rows], batch.keys[b], batch.values[b], scale)
        torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)


def test_reference_keeps_q_dtype():
    batch = paged_batch(*MIXED, dtype=torch.bfloat16)
    assert paged_attention_reference(*batch.args(), 0.2).dtype == torch.bfloat16


def test_reference_rejects_head_mismatch():
    batch = paged_batch(*MIXED)
    with pytest.raises(ValueError, match="kv heads"):
        paged_attention_reference(batch.q[:, :3], *batch.args()[1:], 0.2)


def _check_triton(batch, dtype, **kwargs):
    from quantkit.kernels.attention_triton import paged_attention_triton

    scale = batch.q.shape[-1] ** -0.5
    expected = paged_attention_reference(*batch.args(), scale)
    assert_close_scaled(
        paged_attention_triton(*batch.args(), scale, **kwargs), expected, dtype
    )


@needs_triton
@pytest.mark.parametrize(
    "lens, kv_heads, group, head_dim, block_size, dtype",
    [
        (MIXED, 2, 2, 32, 16, torch.float32),
        (MIXED, 1, 4, 64, 8, torch.float16),
        (MIXED, 2, 3, 32, 32, torch.float16),  # a group that is not a power of two
        pytest.param(
            MIXED, 2, 2, 32, 16, torch.bfloat16, marks=SKIP_INTERPRETED_BF16_DOT
        ),
        (PREFILL_ONLY, 2, 1, 32, 8, torch.float16),
        (MIXED, 1, 2, 48, 16, torch.float16),  # a head_dim that is not a power of two
    ],
)
def test_triton_prefill_matches_reference(
    lens, kv_heads, group, head_dim, block_size, dtype
):
    batch = paged_batch(
        *lens,
        kv_heads=kv_heads,
        group=group,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        device=triton_device(),
        seed=head_dim,
    )
    # small tiles: several query tiles per sequence and key tiles that cross cache blocks
    _check_triton(batch, dtype, block_m=16, block_n=16)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16_DOT])
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("head_dim", [32, 48])
def test_triton_decode_matches_reference(head_dim, num_splits, dtype):
    from quantkit.kernels.attention_decode_triton import paged_decode_triton

    batch = paged_batch(
        *DECODE_ONLY,
        kv_heads=2,
        group=4,
        head_dim=head_dim,
        block_size=8,
        dtype=dtype,
        device=triton_device(),
    )
    scale = 0.2
    expected = paged_attention_reference(*batch.args(), scale)
    out = paged_decode_triton(
        batch.q,
        batch.k_cache,
        batch.v_cache,
        batch.block_tables,
        batch.seq_lens,
        scale,
        num_splits=num_splits,
        block_n=16,
    )
    assert_close_scaled(out, expected, dtype)


@needs_triton
def test_triton_prefill_kernel_also_serves_decode_batches():
    from quantkit.kernels.attention_triton import paged_prefill_triton

    batch = paged_batch(*DECODE_ONLY, group=4, device=triton_device())
    expected = paged_attention_reference(*batch.args(), 0.3)
    out = paged_prefill_triton(*batch.args(), 0.3, block_m=16, block_n=32)
    assert_close_scaled(out, expected, torch.float32)


@needs_triton
def test_triton_dispatch_picks_decode_for_one_query_per_sequence(monkeypatch):
    import quantkit.kernels.attention_decode_triton as decode
    import quantkit.kernels.attention_triton as prefill

    calls = []
    original = decode.paged_decode_triton
    monkeypatch.setattr(
        decode,
        "paged_decode_triton",
        lambda *a, **k: calls.append(1) or original(*a, **k),
    )
    monkeypatch.setattr(
        prefill,
        "paged_prefill_triton",
        lambda *a, **k: pytest.fail("prefill kernel used"),
    )
    batch = paged_batch(*DECODE_ONLY, device=triton_device())
    _check_triton(batch, torch.float32)
    assert calls == [1]


# Llama-3-8B attention: 32 query heads, 8 kv heads, head_dim 128, cache blocks of 16
LLAMA = {"kv_heads": 8, "group": 4, "head_dim": 128, "block_size": 16}


def _random_lens(batch, low, high, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch,), generator=gen).tolist()


@pytest.mark.gpu
@not_interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "lens",
    [
        ([1000, 37], [1000, 37]),  # prefill
        ([512, 512], [3001, 515]),  # chunked prefill / prefix hits
        ([5] * 8, _random_lens(8, 100, 4000, 1)),  # speculative verification
        ([300, 1, 1, 64, 1], [300, 8191, 17, 2063, 4097]),  # mixed
    ],
)
def test_triton_prefill_matches_reference_llama(lens, dtype):
    _check_triton(paged_batch(*lens, **LLAMA, dtype=dtype, device="cuda"), dtype)


@pytest.mark.gpu
@not_interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch_size, max_len", [(1, 8192), (7, 3000), (64, 2048)])
def test_triton_decode_matches_reference_llama(batch_size, max_len, dtype):
    seq_lens = _random_lens(batch_size, 1, max_len, batch_size)
    _check_triton(
        paged_batch([1] * batch_size, seq_lens, **LLAMA, dtype=dtype, device="cuda"),
        dtype,
    )


@pytest.mark.gpu
@not_interpreted
def test_triton_decode_replays_in_cuda_graph():
    """Decode launches need no host sync, so a captured graph gives right answers for new lengths."""
    from quantkit.kernels.attention_triton import paged_attention_triton

    batch = paged_batch(
        [1] * 8,
        [100, 2000, 17, 4000, 1, 64, 999, 3333],
        **LLAMA,
        dtype=torch.bfloat16,
        device="cuda",
    )
    args = batch.args()
    paged_attention_triton(*args, 0.1)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_attention_triton(*args, 0.1)
    batch.seq_lens.copy_(
        torch.tensor([99, 1999, 16, 3999, 1, 63, 998, 3332], dtype=torch.int32)
    )
    graph.replay()
    assert_close_scaled(out, paged_attention_reference(*args, 0.1), torch.bfloat16)
