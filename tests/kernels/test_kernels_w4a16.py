"""quantized_linear: the reference equals x @ W.T of the dequantized weight; the Triton kernels match the reference."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import (
    BF16_DOT,
    assert_close_scaled,
    needs_triton,
    not_interpreted,
    quantized_case,
    triton_device,
)

from quantkit.kernels import (
    act_order_perm,
    pack_quantized_weight,
    quantized_linear_reference,
)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 48, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_reference_equals_dequantized_matmul(bits, group_size, act_order):
    case = quantized_case(
        24, 96, group_size, bits, act_order=act_order, scale_dtype=torch.float32
    )
    x = torch.randn(2, 3, 96)
    bias = torch.randn(24)
    expected = x @ case.weight().t() + bias
    torch.testing.assert_close(
        quantized_linear_reference(x, case.pack(), bias), expected, rtol=1e-5, atol=1e-5
    )


def test_packed_dequantize_round_trips_the_codes():
    case = quantized_case(
        8, 40, 16, 4, act_order=True
    )  # 40 columns: the last word is padded
    packed = case.pack()
    assert packed.qweight.shape == (5, 8) and packed.qweight.dtype == torch.int32
    assert torch.equal(packed.codes(), case.codes.t().to(torch.int32))
    torch.testing.assert_close(packed.dequantize(), case.weight())


def test_act_order_perm_makes_groups_consecutive():
    g_idx = torch.randint(0, 4, (64,))
    perm = act_order_perm(g_idx)
    assert torch.equal(g_idx[perm], g_idx.sort().values)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"bits": 3}, "support"),
        ({"codes_max": 16}, r"\[0, 15\]"),
        ({"scales_shape": (8, 3)}, "scales must be"),
        ({"perm": torch.zeros(32, dtype=torch.int64)}, "permutation"),
    ],
)
def test_pack_rejects_bad_input(change, message):
    codes = torch.randint(0, change.get("codes_max", 15) + 1, (8, 32))
    codes[0, 0] = change.get("codes_max", 15)
    scales = torch.rand(change.get("scales_shape", (8, 2)))
    with pytest.raises(ValueError, match=message):
        pack_quantized_weight(
            codes,
            scales,
            torch.zeros(8, 2),
            16,
            change.get("bits", 4),
            perm=change.get("perm"),
        )


def _check_triton(case, m, dtype, config=None, bias=True, keep_dense=False):
    from quantkit.kernels.w4a16_triton import quantized_linear_triton

    packed = case.pack()
    packed.keep_dense = keep_dense
    device = case.codes.device
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, case.codes.shape[1], generator=gen).to(dtype).to(device)
    b = (
        torch.randn(case.codes.shape[0], generator=gen).to(dtype).to(device)
        if bias
        else None
    )
    expected = quantized_linear_reference(x, packed, b)
    assert_close_scaled(
        quantized_linear_triton(x, packed, b, config=config), expected, dtype
    )
    return packed


def _config(kernel, **kwargs):
    from quantkit.kernels.w4a16_triton import GemmConfig

    return GemmConfig(kernel, **kwargs)


@needs_triton
@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16]
)  # the GEMV uses no tl.dot
@pytest.mark.parametrize(
    "bits, group_size, act_order",
    [(4, 64, False), (4, 32, True), (8, -1, False), (2, 128, False)],
)
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("fast_codes", [True, False], ids=["fast-codes", "convert"])
def test_triton_gemv_matches_reference(bits, group_size, act_order, split_k, dtype, fast_codes):
    case = quantized_case(
        80, 256, group_size, bits, act_order=act_order, device=triton_device()
    )
    config = _config("gemv", block_n=32, block_k=64, split_k=split_k, fast_codes=fast_codes)
    _check_triton(case, 2, dtype, config, bias=split_k == 1)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, BF16_DOT])
@pytest.mark.parametrize(
    "bits, group_size, act_order, in_features",
    [
        (4, 64, False, 256),  # a K tile inside one group: scales applied after the dot
        (
            4,
            32,
            True,
            200,
        ),  # several groups per K tile, act-order, K not a multiple of the tile
        (8, -1, False, 192),
    ],
)
@pytest.mark.parametrize("split_k", [1, 2])
@pytest.mark.parametrize("fast_codes", [True, False], ids=["fast-codes", "convert"])
def test_triton_gemm_matches_reference(
    bits, group_size, act_order, in_features, split_k, dtype, fast_codes
):
    case = quantized_case(
        48, in_features, group_size, bits, act_order=act_order, device=triton_device()
    )
    config = _config("gemm", block_m=16, block_n=32, block_k=64, split_k=split_k, fast_codes=fast_codes)
    _check_triton(case, 21, dtype, config)


@needs_triton
@pytest.mark.parametrize("act_order", [False, True])
def test_triton_dense_path_matches_reference_and_caches(act_order):
    from quantkit.kernels.w4a16_triton import quantized_linear_triton

    case = quantized_case(40, 96, 32, 4, act_order=act_order, device=triton_device())
    packed = _check_triton(case, 5, torch.float16, _config("dense"), keep_dense=True)
    dense = packed._dense[("triton", torch.float16)]
    x = torch.randn(3, 96, dtype=torch.float16, device=case.codes.device)
    quantized_linear_triton(x, packed, config=_config("dense"))
    assert packed._dense[("triton", torch.float16)] is dense


@needs_triton
def test_triton_default_choice_handles_every_batch_size():
    case = quantized_case(32, 128, 64, 4, device=triton_device())
    for m in (1, 6, 300):
        _check_triton(case, m, torch.float16)


@needs_triton
@pytest.mark.parametrize("bits, group_size", [(4, 32), (8, 128)])
def test_triton_dequantize_matches_reference(bits, group_size):
    from quantkit.kernels.w4a16_dequant_triton import dequantize_triton

    case = quantized_case(
        24, 72, group_size, bits, act_order=True, device=triton_device()
    )
    packed = case.pack()
    expected = packed.dequantize()[:, packed.perm].t()
    torch.testing.assert_close(dequantize_triton(packed, torch.float32), expected)


# Llama-3-8B linear shapes (in, out): attention projections, MLP up/gate, MLP down
LLAMA_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096)]


@pytest.mark.gpu
@not_interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_features, out_features", LLAMA_SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 16, 64, 200, 512])
def test_triton_matches_reference_llama_shapes(m, in_features, out_features, dtype):
    case = quantized_case(
        out_features, in_features, 128, 4, scale_dtype=dtype, device="cuda"
    )
    _check_triton(case, m, dtype)


@pytest.mark.gpu
@not_interpreted
@pytest.mark.parametrize(
    "bits, group_size, act_order", [(8, 128, False), (4, -1, False), (4, 128, True)]
)
@pytest.mark.parametrize("m", [1, 16, 100])
def test_triton_matches_reference_other_schemes(m, bits, group_size, act_order):
    case = quantized_case(
        4096,
        4096,
        group_size,
        bits,
        act_order=act_order,
        scale_dtype=torch.bfloat16,
        device="cuda",
    )
    _check_triton(case, m, torch.bfloat16)


@pytest.mark.gpu
@not_interpreted
def test_triton_gemv_replays_in_cuda_graph():
    from quantkit.kernels.w4a16_triton import quantized_linear_triton

    packed = quantized_case(
        14336, 4096, 128, 4, scale_dtype=torch.bfloat16, device="cuda"
    ).pack()
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    quantized_linear_triton(x, packed)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = quantized_linear_triton(x, packed)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert_close_scaled(y, quantized_linear_reference(x, packed), torch.bfloat16)
