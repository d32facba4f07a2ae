"""W8A8 INT8 and FP8 linear kernels against their plain-torch references.

CPU: ``torch._int_mm`` is bit-identical to the exact reference; the Triton activation-quantization
and INT8 GEMM kernels (under TRITON_INTERPRET=1) are too; ``torch._scaled_mm`` agrees to float32
rounding. The Triton tests run where ``triton_device()`` says: the CPU under the interpreter, the
GPU otherwise — there the activation codes are still bit-identical (IEEE division in the kernel)
and the GEMM's int32 sums exact, but the float32 epilogue may contract ``acc·a·b + bias`` into one
fused multiply-add: a float32 rounding step of difference. GPU (marked ``gpu``): the same
comparisons at Llama-shaped sizes in bfloat16.
"""

import pytest
import torch
from kernel_cases import INTERPRET, needs_triton, triton_device

from quantkit.kernels.fp8_linear import (
    fp8_linear,
    fp8_linear_reference,
    fp8_linear_scaled_mm,
)
from quantkit.kernels.int8_linear import (
    int8_linear,
    int8_linear_int_mm,
    int8_linear_reference,
    int8_linear_triton,
)
from quantkit.kernels.w8a8 import W8A8Weight, pack_w8a8_weights, w8a8_linear
from quantkit.quant.w8a8 import (
    qmax,
    quantize_activation,
    quantize_weight,
    scale_from_absmax,
)


def packed_weight(n, k, kind, activations="dynamic", strategy="channel", seed=0, device="cpu", x_absmax=4.0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / k**0.5
    input_scale = scale_from_absmax(torch.tensor([x_absmax]), kind) if activations == "static" else None
    record = quantize_weight(w, kind, strategy, activations, input_scale)
    return pack_w8a8_weights([record.weight], [record.weight_scale], [record.input_scale], kind, activations, device), w


def assert_epilogue_close(got, want):
    """Exact under the interpreter; on the GPU within float32 rounding of the scaled epilogue."""
    if INTERPRET:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def inputs(m, k, seed=1, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, 3] *= 20  # an outlier channel
    if m > 2:
        x[1] = 0.0  # an all-zero token
    return x.to(device, dtype)


@pytest.mark.parametrize("activations", ["dynamic", "static"])
@pytest.mark.parametrize("m, k, n", [(1, 96, 40), (5, 256, 24), (33, 100, 72)])
def test_int_mm_equals_reference_exactly(activations, m, k, n):
    packed, _ = packed_weight(n, k, "int", activations)
    x, bias = inputs(m, k), torch.randn(n)
    want = int8_linear_reference(x, packed, bias)
    torch.testing.assert_close(int8_linear_int_mm(x, packed, bias), want, rtol=0, atol=0)
    assert int8_linear(x.reshape(1, m, k), packed, bias).shape == (1, m, n)


def test_int8_output_is_close_to_float():
    packed, w = packed_weight(64, 512, "int")
    x = inputs(16, 512)
    got, want = int8_linear_reference(x, packed), x @ w.t()
    assert float((got - want).norm() / want.norm()) < 0.06  # the 20x outlier channel costs precision


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kind", ["int", "float"])
def test_scales_are_the_correctly_rounded_quotient(kind, device):
    # torch on CUDA divides by a Python number as a multiplication by its reciprocal, a rounding
    # step off for some values; the scales (and the Triton kernels, which use div_rn) must not be
    absmax = torch.linspace(0.5, 300.0, 100_003, dtype=torch.float32)
    want = (absmax.double() / qmax(kind)).float()  # double rounding is innocuous for float32 division
    assert torch.equal(scale_from_absmax(absmax.to(device), kind).cpu(), want)
    assert not torch.equal(absmax * (1 / torch.tensor(qmax(kind))), want)  # the reciprocal does differ


@needs_triton
@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("one_block", [True, False], ids=["row-in-registers", "row-in-blocks"])
def test_triton_activation_quantization_equals_torch(kind, static, one_block, monkeypatch):
    import quantkit.kernels.act_quant_triton as act_quant
    from quantkit.kernels.act_quant_triton import quantize_activation_triton

    if not one_block:
        monkeypatch.setattr(act_quant, "ONE_BLOCK_MAX", 64)  # the two-pass path, rows of 300 in 5 blocks

    device = triton_device()
    x = (inputs(9, 300) * torch.logspace(-2, 2, 300)).to(device)  # values across many binades
    scale = scale_from_absmax(torch.tensor([5.0]), kind).to(device) if static else None  # static: clips outliers
    got_q, got_s = quantize_activation_triton(x, kind, scale)
    want_q, want_s = quantize_activation(x, kind, scale)
    assert torch.equal(got_q.view(torch.int8), want_q.view(torch.int8))  # bit patterns, fp8 included
    assert torch.equal(got_s.reshape(-1), want_s.reshape(-1))


@needs_triton
@pytest.mark.parametrize("activations", ["dynamic", "static"])
@pytest.mark.parametrize("m, k, n", [(1, 96, 40), (20, 256, 72), (70, 136, 24)])
def test_triton_int8_gemm_equals_reference_exactly(activations, m, k, n):
    device = triton_device()
    packed, _ = packed_weight(n, k, "int", activations, device=device)
    x, bias = inputs(m, k, device=device), torch.randn(n).to(device)
    assert_epilogue_close(int8_linear_triton(x, packed, bias), int8_linear_reference(x, packed, bias))


@needs_triton
def test_triton_int8_gemm_tiles_beyond_the_matrix():
    from quantkit.kernels.int8_gemm_triton import Int8GemmConfig

    device = triton_device()
    packed, _ = packed_weight(50, 80, "int", device=device)
    x = inputs(19, 80, device=device)
    config = Int8GemmConfig(block_m=16, block_n=32, block_k=32, group_m=2)  # ragged in every dimension
    assert_epilogue_close(int8_linear_triton(x, packed, None, config), int8_linear_reference(x, packed))


@needs_triton
@pytest.mark.parametrize("m, k, n", [(1, 64, 40), (20, 96, 72), (70, 160, 24)])
def test_tma_int8_gemm_equals_the_tiled_one(m, k, n, monkeypatch):
    from quantkit.kernels.int8_gemm_triton import (
        Int8GemmConfig,
        int8_gemm_tma_triton,
        int8_gemm_triton,
    )

    device = triton_device()
    packed, _ = packed_weight(n, k, "int", device=device)
    x = inputs(m, k, device=device)
    codes, scale = quantize_activation(x, "int")
    bias = torch.randn(n).to(device)
    configs = (None, Int8GemmConfig(16, 32, 32, group_m=2),  # more tiles than programs: each walks several
               Int8GemmConfig(16, 32, 32, group_m=2, epilogue_subtile=True, flatten=True),
               Int8GemmConfig(32, 16, 64, group_m=1, epilogue_subtile=True),
               Int8GemmConfig(16, 32, 32, group_m=2, epilogue_subtile=True, warp_specialize=True))
    for config in configs:
        want = int8_gemm_triton(codes, scale, packed.weight, packed.weight_scale, bias, torch.float32, config)
        got = int8_gemm_tma_triton(codes, scale, packed.weight, packed.weight_scale, bias, torch.float32, config)
        assert_epilogue_close(got, want)
    monkeypatch.setenv("QUANTKIT_KERNELS", "triton")
    monkeypatch.setenv("QUANTKIT_INT8_GEMM", "tma")
    assert_epilogue_close(int8_linear(x, packed, bias), int8_linear_reference(x, packed, bias))


@needs_triton
def test_auto_gemm_takes_the_tma_kernel_for_large_gemms(monkeypatch):
    import quantkit.kernels.int8_gemm_triton as gemms
    import quantkit.kernels.int8_linear as linear

    calls = []
    tma = gemms.int8_gemm_tma_triton
    monkeypatch.setattr(gemms, "int8_gemm_tma_triton", lambda *args: calls.append(args[0].shape) or tma(*args))
    monkeypatch.setattr(linear, "TMA_FROM_ROWS", 20)  # stand-ins for 4096 rows and N >= 4096
    monkeypatch.setattr(linear, "TMA_MIN_N", 32)
    monkeypatch.setenv("QUANTKIT_KERNELS", "triton")
    monkeypatch.delenv("QUANTKIT_INT8_GEMM", raising=False)
    device = triton_device()
    if not linear._has_tma(torch.device(device)):
        pytest.skip("tensor descriptors need Hopper or newer")
    for m, n, used in ((19, 40, False), (20, 24, False), (20, 40, True)):
        packed, _ = packed_weight(n, 64, "int", device=device)
        x = inputs(m, 64, device=device)
        calls.clear()
        assert_epilogue_close(int8_linear(x, packed), int8_linear_reference(x, packed))
        assert calls == ([(m, 64)] if used else [])
    monkeypatch.setenv("QUANTKIT_INT8_GEMM", "tiled")
    calls.clear()
    int8_linear(x, packed)
    assert calls == []


H100_SHARED_MEMORY = 232448  # bytes per block (opt-in), what Triton 3.6 compares against


def default_configs():
    from quantkit.kernels.int8_gemm_triton import (
        choose_int8_config,
        choose_int8_tma_config,
    )

    rows = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
    shapes = ((4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024))  # (K, N) of Llama-3-8B
    tiled = {choose_int8_config(m, n) for m in rows for _, n in shapes}
    tma = {choose_int8_tma_config(m, n, k) for m in rows for k, n in shapes}
    return tiled, tma


def test_every_default_tile_fits_the_h100_shared_memory():
    from quantkit.kernels.int8_gemm_triton import shared_memory_bytes

    tiled, tma = default_configs()
    for config in tiled | tma:
        assert config.block_k >= 32 and config.block_m >= 16 and config.block_n >= 16  # tensor-core minimums
        assert shared_memory_bytes(config, 2, config in tma) <= H100_SHARED_MEMORY, config  # bf16 / fp16 out
        assert shared_memory_bytes(config, 4, False) <= H100_SHARED_MEMORY, config


def test_a_config_too_large_for_shared_memory_is_shrunk_or_refused():
    from quantkit.kernels.int8_gemm_triton import (
        Int8GemmConfig,
        fit_shared_memory,
        shared_memory_bytes,
    )

    big = Int8GemmConfig(128, 256, 128, group_m=8, num_warps=8, num_stages=3)
    # what the H100 refused with a float32 output (OutOfResources: Required 278552 > 232448)
    assert shared_memory_bytes(big, 4, tma=True) == 278552
    fitted = fit_shared_memory(big, 4, True, H100_SHARED_MEMORY)
    assert fitted == Int8GemmConfig(128, 256, 128, group_m=8, num_warps=8, num_stages=3, epilogue_subtile=True)
    assert fit_shared_memory(big, 2, True, H100_SHARED_MEMORY) == big  # bf16 output: 213,016 bytes
    four = Int8GemmConfig(256, 128, 128, group_m=8, num_warps=8, num_stages=4, epilogue_subtile=True, flatten=True)
    assert fit_shared_memory(four, 4, True, H100_SHARED_MEMORY).num_stages == 3
    assert fit_shared_memory(big, 4, True, None) == big  # no limit known (CPU): unchanged
    with pytest.raises(ValueError, match="fits in 1000 bytes"):
        fit_shared_memory(big, 4, True, 1000)


def test_a_launch_refused_for_shared_memory_runs_a_smaller_config(monkeypatch):
    from triton.runtime.errors import OutOfResources

    import quantkit.kernels.int8_gemm_triton as gemms

    big = gemms.Int8GemmConfig(128, 256, 128, num_stages=3)
    tried = []

    def launch(config):  # a device that has less shared memory than the estimate says
        tried.append(config)
        if gemms.shared_memory_bytes(config, 2, False) > 100_000:
            raise OutOfResources(gemms.shared_memory_bytes(config, 2, False), 100_000, "shared memory")
        return config

    monkeypatch.setattr(gemms, "_FITTED", {})
    ran = gemms._launch_fitting(launch, big, torch.bfloat16, False, torch.device("cpu"))
    assert ran.num_stages == 2 and ran.block_k == 128 and len(tried) == 2
    tried.clear()
    assert gemms._launch_fitting(launch, big, torch.bfloat16, False, torch.device("cpu")) == ran
    assert tried == [ran]  # remembered: no second refusal


def test_auto_takes_the_tma_kernel_where_the_h100_sweep_measured_it_faster():
    from quantkit.kernels.int8_linear import _tma_pays

    # (M, N, K): q/o_proj from 4096 rows, gate/up_proj and down_proj from 2048, k/v_proj never
    for m, n, k, used in ((2048, 4096, 4096, False), (4096, 4096, 4096, True), (1024, 14336, 4096, False),
                          (2048, 14336, 4096, True), (2048, 4096, 14336, True), (8192, 1024, 4096, False)):
        assert _tma_pays(m, n, k) == used, (m, n, k)


@needs_triton
def test_every_default_tile_computes_the_same_gemm():
    from quantkit.kernels.int8_gemm_triton import int8_gemm_tma_triton, int8_gemm_triton

    tiled, tma = default_configs()
    device = triton_device()
    packed, _ = packed_weight(40, 96, "int", device=device)  # far smaller than every tile: edges everywhere
    codes, scale = quantize_activation(inputs(21, 96, device=device), "int")
    want = int8_linear_reference(inputs(21, 96, device=device), packed)
    for config in sorted(tiled | tma, key=str):
        # float32 output: the TMA kernel's largest defaults run shrunk to fit (fit_shared_memory)
        for gemm in (int8_gemm_triton, int8_gemm_tma_triton):
            got = gemm(codes, scale, packed.weight, packed.weight_scale, None, torch.float32, config)
            assert_epilogue_close(got, want)
        got = int8_gemm_tma_triton(codes, scale, packed.weight, packed.weight_scale, None, torch.bfloat16, config)
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


@pytest.mark.parametrize("activations", ["dynamic", "static", "none"])
def test_scaled_mm_agrees_with_the_fp8_reference(activations):
    x, bias = inputs(6, 160), torch.randn(48)
    packed, w = packed_weight(48, 160, "float", activations, x_absmax=float(x.abs().max()))
    want = fp8_linear_reference(x, packed, bias)
    got = fp8_linear_scaled_mm(x, packed, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    exact = x @ w.t() + bias
    # e4m3 keeps 3 mantissa bits: a few percent relative error per operand
    assert float((want - exact).norm() / exact.norm()) < (0.04 if activations == "none" else 0.08)


def test_scaled_mm_without_cpu_row_wise_scales_falls_back_to_the_emulation(monkeypatch):
    import quantkit.kernels.fp8_linear as fp8

    # torch 2.11's CPU _scaled_mm refuses row-wise scales (2.13 takes them): the exact emulation runs
    monkeypatch.setattr(fp8, "_cpu_rowwise_scaled_mm_works", lambda: False)
    x, bias = inputs(6, 160), torch.randn(48)
    packed, _ = packed_weight(48, 160, "float", "dynamic")
    torch.testing.assert_close(fp8_linear_scaled_mm(x.reshape(2, 3, 160), packed, bias),
                               fp8_linear_reference(x, packed, bias).reshape(2, 3, 48), rtol=0, atol=0)


def test_fusing_layers_keeps_each_output():
    parts = [quantize_weight(torch.randn(n, 64), "int", "tensor", "static", torch.tensor([s]))
             for n, s in ((16, 0.02), (8, 0.05))]
    fused = pack_w8a8_weights([p.weight for p in parts], [p.weight_scale for p in parts],
                              [p.input_scale for p in parts], "int", "static")
    assert fused.weight_scale.shape == (24,) and float(fused.input_scale) == pytest.approx(0.05)
    x = inputs(4, 64)
    separate = [int8_linear_reference(x, W8A8Weight(p.weight, p.weight_scale.expand(p.out_features), "int",
                                                    "static", fused.input_scale)) for p in parts]
    torch.testing.assert_close(w8a8_linear(x, fused), torch.cat(separate, dim=-1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="input scale"):
        pack_w8a8_weights([parts[0].weight], [parts[0].weight_scale], [None], "int", "static")


def test_reference_mode_forces_the_reference(monkeypatch):
    packed, _ = packed_weight(16, 32, "int")
    x = inputs(3, 32)
    monkeypatch.setenv("QUANTKIT_KERNELS", "reference")
    torch.testing.assert_close(int8_linear(x, packed), int8_linear_reference(x, packed), rtol=0, atol=0)
    fp8, _ = packed_weight(16, 32, "float")
    torch.testing.assert_close(fp8_linear(x, fp8), fp8_linear_reference(x, fp8), rtol=0, atol=0)


# --- GPU -------------------------------------------------------------------------------------------

SHAPES = [(1, 4096, 4096), (16, 4096, 1024), (300, 4096, 14336), (2048, 14336, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("activations", ["dynamic", "static"])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_gpu_int8_paths_match_the_reference(activations, m, k, n):
    packed, _ = packed_weight(n, k, "int", activations, device="cuda")
    x = inputs(m, k, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    want = int8_linear_reference(x.float(), packed, bias.float())
    from quantkit.kernels.int8_gemm_triton import int8_gemm_tma_triton

    codes, scale = quantize_activation(x, "int", packed.input_scale)
    tma = int8_gemm_tma_triton(codes, scale, packed.weight, packed.weight_scale, bias, torch.bfloat16)
    for got in (int8_linear_triton(x, packed, bias), int8_linear_int_mm(x, packed, bias), int8_linear(x, packed, bias),
                tma):
        assert got.dtype == torch.bfloat16
        # same int32 sums; the only difference is the bfloat16 output rounding
        torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("activations", ["dynamic", "static", "none"])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_gpu_fp8_scaled_mm_matches_the_reference(activations, m, k, n):
    from quantkit.kernels.fp8_linear import fp8_supported

    if not fp8_supported(torch.device("cuda")):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    packed, _ = packed_weight(n, k, "float", activations, device="cuda")
    x = inputs(m, k, dtype=torch.bfloat16, device="cuda")
    want = fp8_linear_reference(x.float(), packed)
    # float32 promotion of the sums, what the reference computes: element by element
    promoted = fp8_linear_scaled_mm(x, packed, use_fast_accum=False)
    torch.testing.assert_close(promoted.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    got = fp8_linear(x, packed)  # fast accumulation (the default)
    assert got.dtype == torch.bfloat16
    # Fast accumulation's error follows the running sums, not the element: on the H100 (torch 2.11)
    # 0.072 and 0.075 at elements of 1.69 and 1.71 (1.3% of the largest output, 5.5), in rows whose
    # 20x outlier channel is the row's maximum (300x4096x14336 and 2048x14336x4096, dynamic), 7
    # and 25 elements past a 1% per-element bound; so bound it against the output's scale, and as
    # a whole (check_fp8_fast_accum.py measured 0.32% / 0.42% against the exact sums at K = 4096 /
    # 14336, against 0.29% / 0.30% promoted)
    error = (got.float() - want).abs().max() / want.abs().max()
    assert error < 3e-2, f"largest error {float(error):.3g} of the largest output"
    assert float((got.float() - want).norm() / want.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("k", [4096, 14336, 20000])  # rows in registers up to 16384, in blocks beyond
def test_gpu_activation_quantization_equals_torch(kind, k):
    from quantkit.kernels.act_quant_triton import quantize_activation_triton

    x = inputs(64, k, dtype=torch.bfloat16, device="cuda")
    got_q, got_s = quantize_activation_triton(x, kind)
    want_q, want_s = quantize_activation(x, kind)
    assert torch.equal(got_q.view(torch.int8), want_q.view(torch.int8))
    torch.testing.assert_close(got_s, want_s, rtol=0, atol=0)


def test_fast_accumulation_is_on_unless_turned_off(monkeypatch):
    from quantkit.kernels.fp8_linear import fast_accum_default

    monkeypatch.delenv("QUANTKIT_FP8_FAST_ACCUM", raising=False)
    assert fast_accum_default()
    for off in ("0", "off", "False"):
        monkeypatch.setenv("QUANTKIT_FP8_FAST_ACCUM", off)
        assert not fast_accum_default()
    monkeypatch.setenv("QUANTKIT_FP8_FAST_ACCUM", "1")
    assert fast_accum_default()


@pytest.mark.gpu
def test_gpu_fp8_fast_accumulation_error_is_bounded_at_long_k():
    from quantkit.kernels.fp8_linear import fp8_supported

    if not fp8_supported(torch.device("cuda")):
        pytest.skip("FP8 tensor cores need compute capability 8.9+")
    m, k, n = 512, 14336, 1024  # down_proj's K
    packed, w = packed_weight(n, k, "float", device="cuda")
    x = inputs(m, k, dtype=torch.bfloat16, device="cuda")
    exact = fp8_linear_reference(x.float(), packed)  # float32 sums of the same e4m3 products
    unquantized = x.float() @ w.cuda().t()

    def relative(got, want):
        return float((got.float() - want).norm() / want.norm())

    # float32 promotion: bf16 output rounding (0.17% here) and the tensor cores' limited-precision
    # sums between two promotions; 0.33% on the H100 (torch 2.11), 0.30% in check_fp8_fast_accum.py
    assert relative(fp8_linear_scaled_mm(x, packed, use_fast_accum=False), exact) < 5e-3
    fast = fp8_linear_scaled_mm(x, packed, use_fast_accum=True)
    # Hopper's FP8 accumulator keeps ~13 mantissa bits; emulated (check_fp8_fast_accum.py --emulate) it
    # costs 1.1% at this K if it truncates, 0.04% if it rounds
    assert relative(fast, exact) < 2e-2
    # small beside what rounding the operands to e4m3 already costs (3.7% here)
    assert relative(fast, unquantized) < 1.1 * relative(exact, unquantized)
