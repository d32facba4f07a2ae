"""GPTQ on one weight matrix, and the Hessian it needs, checked against RTN and against identities.

Identities used:
* with a diagonal Hessian the error feedback vanishes (H⁻¹ is diagonal), so GPTQ is RTN, taken
  over the columns in processing order;
* the reported loss Σ err²/2 equals ½ tr(Δ H_d Δᵀ) for Δ = W - Ŵ and the damped Hessian H_d, which
  ties the returned codes, scales and g_idx to the algorithm's internal errors;
* each processed column's code is the nearest grid point of the column as updated by the errors
  of the columns before it.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.quant import gptq as gptq_module
from quantkit.quant.gptq import GPTQConfig, gptq_quantize, prepare_hessian
from quantkit.quant.hessian import HessianAccumulator
from quantkit.quant.qdq import max_code
from quantkit.quant.rtn import QuantizedWeight, default_g_idx, rtn_quantize
from quantkit.quant.scheme import QuantScheme

IN_FEATURES, OUT_FEATURES, TOKENS = 256, 128, 2048

SCHEMES_AND_CONFIGS = [
    (QuantScheme(bits=4, group_size=128), GPTQConfig()),
    (QuantScheme(bits=3, group_size=128), GPTQConfig()),
    (QuantScheme(bits=4, group_size=128, symmetric=False), GPTQConfig()),
    (QuantScheme(bits=4, group_size=-1), GPTQConfig()),
    (QuantScheme(bits=4, group_size=128), GPTQConfig(act_order=True)),
    (
        QuantScheme(bits=4, group_size=128),
        GPTQConfig(act_order=True, static_groups=True),
    ),
    (QuantScheme(bits=3, group_size=32, symmetric=False), GPTQConfig(act_order=True)),
    (QuantScheme(bits=2, group_size=64, symmetric=False), GPTQConfig(block_size=48)),
    (QuantScheme(bits=8, group_size=64), GPTQConfig(static_groups=True)),
]


def correlated_inputs(seed: int = 0, tokens: int = TOKENS) -> torch.Tensor:
    """Activations mixed by a random matrix, with a few high-variance channels."""
    return _correlated_inputs(seed, tokens).clone()


@functools.cache
def _correlated_inputs(seed: int, tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(IN_FEATURES, IN_FEATURES, generator=gen) / IN_FEATURES**0.5
    x = torch.randn(tokens, IN_FEATURES, generator=gen) @ mixing
    x[:, [3, 77, 200]] *= 12.0
    return x


def random_weight(seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen) * 0.05


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    accumulator = HessianAccumulator(x.shape[-1])
    accumulator.add_batch(x)
    return accumulator.hessian


def output_error(x: torch.Tensor, weight: torch.Tensor, approx: torch.Tensor) -> float:
    return float(((x @ weight.T - x @ approx.T) ** 2).sum())


def damped(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    h = h.clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    h.diagonal().add_(damp_percent * h.diagonal().mean())
    return h


def processing_order(h: torch.Tensor, config: GPTQConfig) -> torch.Tensor:
    if not config.act_order:
        return torch.arange(h.shape[0])
    return torch.argsort(h.diagonal(), descending=True, stable=True)


def assert_valid_record(qw: QuantizedWeight, scheme: QuantScheme) -> None:
    n_groups = 1 if scheme.group_size == -1 else IN_FEATURES // scheme.group_size
    assert (
        qw.codes.shape == (OUT_FEATURES, IN_FEATURES) and qw.codes.dtype == torch.int32
    )
    assert (
        qw.scales.shape == (OUT_FEATURES, n_groups) and qw.scales.dtype == torch.float32
    )
    assert qw.zeros.shape == (OUT_FEATURES, n_groups) and qw.zeros.dtype == torch.int32
    assert qw.g_idx.shape == (IN_FEATURES,) and qw.g_idx.dtype == torch.int32
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) <= max_code(scheme.bits)
    assert int(qw.zeros.min()) >= 1 and int(qw.zeros.max()) <= max_code(scheme.bits)
    assert torch.equal(
        qw.scales.half().float(), qw.scales
    )  # what an fp16 checkpoint holds
    if scheme.symmetric:
        assert bool((qw.zeros == 2 ** (scheme.bits - 1)).all())
    assert (qw.bits, qw.group_size, qw.symmetric) == (
        scheme.bits,
        scheme.group_size,
        scheme.symmetric,
    )


@pytest.mark.parametrize(("scheme", "config"), SCHEMES_AND_CONFIGS)
def test_gptq_beats_rtn_on_correlated_inputs(scheme, config):
    x, weight = correlated_inputs(), random_weight()
    qw, loss = gptq_quantize(weight, hessian_of(x), scheme, config)
    assert_valid_record(qw, scheme)
    rtn_error = output_error(x, weight, rtn_quantize(weight, scheme).dequantize())
    gptq_error = output_error(x, weight, qw.dequantize())
    # 2-bit grids are so coarse that error feedback recovers less
    assert gptq_error < (0.8 if scheme.bits == 2 else 0.7) * rtn_error
    assert loss > 0


@pytest.mark.parametrize(("scheme", "config"), SCHEMES_AND_CONFIGS)
def test_reported_loss_matches_returned_weight(scheme, config):
    # Σ err²/2 from the loop equals ½ tr(Δ H_d Δᵀ) only if the returned codes, scales and
    # g_idx (act-order included) describe the weight the loop actually settled on.
    x, weight = correlated_inputs(), random_weight()
    h = hessian_of(x)
    qw, loss = gptq_quantize(weight, h, scheme, config)
    delta = (weight - qw.dequantize()).double()
    expected = 0.5 * float(
        torch.trace(delta @ damped(h, config.damp_percent).double() @ delta.T)
    )
    assert loss == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize(("scheme", "config"), SCHEMES_AND_CONFIGS)
def test_each_code_is_nearest_grid_point_of_updated_column(scheme, config):
    x, weight = correlated_inputs(), random_weight()
    h = hessian_of(x)
    qw, _ = gptq_quantize(weight, h, scheme, config)
    order = processing_order(h, config)
    h_d = damped(h, config.damp_percent).double()[order][:, order]
    upper = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(h_d)), upper=True
    )
    settled = qw.dequantize().double()[:, order]
    # Δ = E U with E the loop's scaled errors; the column it rounded was q_j + e_j U_jj.
    errors = torch.linalg.solve_triangular(
        upper, (weight.double()[:, order] - settled), upper=True, left=False
    )
    rounded = settled + errors * upper.diagonal()
    groups = qw.g_idx.long()[order]
    scales, zeros = qw.scales.double()[:, groups], qw.zeros.double()[:, groups]
    nearest = (torch.round(rounded / scales) + zeros).clamp(0, max_code(scheme.bits))
    same = (nearest - zeros) * scales == settled
    assert float(same.double().mean()) > 0.999


@pytest.mark.parametrize(
    "scheme",
    [
        QuantScheme(bits=4, group_size=128),
        QuantScheme(bits=3, group_size=32, symmetric=False),
        QuantScheme(bits=2, group_size=64, symmetric=False),
        QuantScheme(bits=8, group_size=-1),
    ],
)
@pytest.mark.parametrize("static_groups", [False, True])
def test_identity_hessian_gives_rtn_exactly(scheme, static_groups):
    weight = random_weight()
    h = torch.eye(IN_FEATURES)
    qw, _ = gptq_quantize(weight, h, scheme, GPTQConfig(static_groups=static_groups, clip_search=False))
    rtn = rtn_quantize(weight, scheme)
    assert torch.equal(qw.codes, rtn.codes)
    assert torch.equal(qw.scales, rtn.scales)
    assert torch.equal(qw.zeros, rtn.zeros)
    assert torch.equal(qw.g_idx, rtn.g_idx)


@pytest.mark.parametrize(
    "scheme",
    [QuantScheme(bits=4, group_size=32), QuantScheme(bits=3, group_size=64, symmetric=False),
     QuantScheme(bits=4, group_size=-1, symmetric=False)],
)
@pytest.mark.parametrize("static_groups", [False, True])
def test_clip_search_with_identity_hessian_never_loses_to_rtn_per_group(scheme, static_groups):
    # With H = I there is no error feedback: each (row, group) is rounded on its own grid, and
    # the search keeps the unclipped range (RTN's) unless a shrunk one has less squared error.
    weight = random_weight() * torch.linspace(0.2, 3.0, IN_FEATURES)  # uneven column ranges
    config = GPTQConfig(clip_search=True, static_groups=static_groups)
    qw, _ = gptq_quantize(weight, torch.eye(IN_FEATURES), scheme, config)
    assert_valid_record(qw, scheme)
    rtn = rtn_quantize(weight, scheme)
    size = IN_FEATURES if scheme.group_size == -1 else scheme.group_size

    def group_errors(q):
        return (weight - q.dequantize()).pow(2).reshape(weight.shape[0], -1, size).sum(-1)

    clipped, plain = group_errors(qw), group_errors(rtn)
    assert (clipped <= plain * (1 + 1e-5) + 1e-9).all()
    assert clipped.sum() < 0.95 * plain.sum()  # and the shrunk ranges do win somewhere


def test_clip_search_lowers_the_output_error_on_correlated_inputs():
    x, weight = correlated_inputs(), random_weight()
    scheme = QuantScheme(bits=3, group_size=32)
    h = hessian_of(x)
    plain, _ = gptq_quantize(weight, h, scheme, GPTQConfig(clip_search=False))
    clipped, _ = gptq_quantize(weight, h, scheme, GPTQConfig(clip_search=True))
    assert output_error(x, weight, clipped.dequantize()) < output_error(x, weight, plain.dequantize())


@pytest.mark.parametrize(("field", "value"), [("clip_grid", 0), ("clip_max_shrink", 1.0), ("clip_search", "yes")])
def test_bad_clip_options_are_refused(field, value):
    with pytest.raises(QuantkitError, match=field):
        GPTQConfig(**{field: value})


def test_act_order_with_diagonal_hessian_is_rtn_over_permuted_columns():
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    weight = random_weight()
    h = torch.diag(torch.randperm(IN_FEATURES).float() + 1.0)
    perm = torch.argsort(h.diagonal(), descending=True)
    qw, _ = gptq_quantize(weight, h, scheme, GPTQConfig(act_order=True, clip_search=False))
    rtn = rtn_quantize(weight[:, perm], scheme)
    assert torch.equal(qw.codes[:, perm], rtn.codes)
    assert torch.equal(qw.scales, rtn.scales)
    assert torch.equal(qw.zeros, rtn.zeros)
    assert torch.equal(qw.g_idx[perm], default_g_idx(IN_FEATURES, 32))
    assert not torch.equal(qw.g_idx, default_g_idx(IN_FEATURES, 32))
    assert torch.equal(qw.dequantize()[:, perm], rtn.dequantize())


def test_act_order_with_static_groups_keeps_consecutive_groups():
    scheme = QuantScheme(bits=4, group_size=32)
    weight = random_weight()
    h = torch.diag(torch.randperm(IN_FEATURES).float() + 1.0)
    config = GPTQConfig(act_order=True, static_groups=True, clip_search=False)
    qw, _ = gptq_quantize(weight, h, scheme, config)
    rtn = rtn_quantize(weight, scheme)
    assert torch.equal(qw.g_idx, default_g_idx(IN_FEATURES, 32))
    assert torch.equal(qw.codes, rtn.codes)
    assert torch.equal(qw.scales, rtn.scales)


def test_block_size_does_not_change_the_result():
    scheme = QuantScheme(bits=3, group_size=32, symmetric=False)
    x, weight = correlated_inputs(), random_weight()
    h = hessian_of(x)
    results = [
        gptq_quantize(weight, h, scheme, GPTQConfig(block_size=size))[0].codes
        for size in (7, 32, 100, 256)
    ]
    for codes in results[1:]:
        assert float((codes == results[0]).double().mean()) > 0.999


def test_dead_input_channel_gets_zero_weight():
    x = correlated_inputs()
    x[:, 10] = 0.0
    x[:, 130] = 0.0
    weight = random_weight()
    scheme = QuantScheme(bits=4, group_size=64, symmetric=False)
    for config in (GPTQConfig(), GPTQConfig(act_order=True)):
        qw, loss = gptq_quantize(weight, hessian_of(x), scheme, config)
        dequantized = qw.dequantize()
        assert torch.isfinite(dequantized).all() and math.isfinite(loss)
        assert torch.equal(dequantized[:, [10, 130]], torch.zeros(OUT_FEATURES, 2))
        assert output_error(x, weight, dequantized) < 0.7 * output_error(
            x, weight, rtn_quantize(weight, scheme).dequantize()
        )


def test_input_is_not_modified_and_half_weights_work():
    x, weight = correlated_inputs(), random_weight().half()
    h = hessian_of(x)
    weight_before, h_before = weight.clone(), h.clone()
    qw, _ = gptq_quantize(weight, h, QuantScheme(), GPTQConfig(act_order=True))
    assert torch.equal(weight, weight_before) and torch.equal(h, h_before)
    assert qw.codes.device == weight.device


@pytest.mark.parametrize("damp", [0, 0.0, 1, 1.5, -0.01, True, "0.01"])
def test_bad_damp_percent_is_rejected(damp):
    with pytest.raises(QuantkitError, match="damp_percent"):
        GPTQConfig(damp_percent=damp)


def test_bad_block_size_is_rejected():
    with pytest.raises(QuantkitError, match="block_size"):
        GPTQConfig(block_size=0)


def test_hessian_of_wrong_shape_is_rejected():
    with pytest.raises(QuantkitError, match="must be \\(256, 256\\)"):
        gptq_quantize(random_weight(), torch.eye(128), QuantScheme())


def test_group_size_that_does_not_divide_is_rejected():
    with pytest.raises(QuantkitError, match="does not divide"):
        gptq_quantize(
            random_weight(), torch.eye(IN_FEATURES), QuantScheme(group_size=96)
        )


def test_indefinite_hessian_asks_for_more_damping():
    h = -torch.eye(IN_FEATURES)
    with pytest.raises(QuantkitError, match="raise damp_percent"):
        gptq_quantize(random_weight(), h, QuantScheme(), module_name="model.layers.0.q")


def test_hessian_accumulator_matches_direct_formula():
    x = correlated_inputs(tokens=300).reshape(3, 100, IN_FEATURES)
    accumulator = HessianAccumulator(IN_FEATURES)
    accumulator.add_batch(x[0])
    accumulator.add_batch(x[1:])  # any leading dimensions
    flat = x.reshape(-1, IN_FEATURES).double()
    expected = 2.0 / 300 * flat.T @ flat
    assert accumulator.num_tokens == 300
    assert accumulator.hessian.dtype == torch.float32
    torch.testing.assert_close(
        accumulator.hessian.double(), expected, rtol=1e-5, atol=1e-6
    )


def test_hessian_split_and_merge_equals_one_accumulator():
    x = correlated_inputs(tokens=512)
    whole = HessianAccumulator(IN_FEATURES)
    for chunk in x.split(64):
        whole.add_batch(chunk)
    first, second = HessianAccumulator(IN_FEATURES), HessianAccumulator(IN_FEATURES)
    first.add_batch(x[:100])
    second.add_batch(x[100:300])
    second.add_batch(x[300:])
    first.merge(second)
    assert first.num_tokens == whole.num_tokens == 512
    # batches' float32 products and float32 sums round differently from one big product
    tolerance = {"rtol": 1e-5, "atol": 1e-6 * float(whole.hessian.abs().max())}
    torch.testing.assert_close(first.hessian, whole.hessian, **tolerance)
    # what data-parallel ranks do: all-reduce (sum) the raw sums and counts
    ranks = [HessianAccumulator(IN_FEATURES) for _ in range(2)]
    ranks[0].add_batch(x[:256])
    ranks[1].add_batch(x[256:])
    sums, counts = zip(*(rank.state for rank in ranks))
    reduced = HessianAccumulator.from_sum(sums[0] + sums[1], counts[0] + counts[1])
    assert sums[0].dtype == torch.float64  # CPU sums are float64; accelerator sums float32
    torch.testing.assert_close(reduced.hessian, whole.hessian, **tolerance)
    torch.testing.assert_close(reduced.state[0], sums[0] + sums[1], rtol=0, atol=0)


def test_wide_layers_accumulate_a_block_of_columns_at_a_time(monkeypatch):
    from quantkit.quant import hessian as hessian_module

    x = correlated_inputs(tokens=200)
    whole = HessianAccumulator(IN_FEATURES)
    whole.add_batch(x)
    monkeypatch.setattr(hessian_module, "_BLOCK_COLUMNS", 24)  # uneven slices of the columns
    blocked = HessianAccumulator(IN_FEATURES)
    blocked.add_batch(x[:120])
    blocked.add_batch(x[120:])
    torch.testing.assert_close(blocked.hessian, whole.hessian, rtol=1e-5, atol=1e-5)


def test_take_hessian_reuses_the_sum_and_empties_the_accumulator():
    accumulator = HessianAccumulator(IN_FEATURES)
    accumulator.add_batch(correlated_inputs(tokens=100))
    expected = accumulator.hessian
    taken = accumulator.take_hessian()
    torch.testing.assert_close(taken, expected, rtol=0, atol=0)
    assert accumulator.num_tokens == 0


@pytest.mark.parametrize("act_order", [False, True])
def test_overwriting_the_hessian_gives_the_same_result_and_frees_it(act_order):
    x, weight = correlated_inputs(), random_weight()
    scheme, config = QuantScheme(bits=4, group_size=32), GPTQConfig(act_order=act_order)
    copied, _ = gptq_quantize(weight, hessian_of(x), scheme, config)
    h = hessian_of(x)
    reused, _ = gptq_quantize(weight, h, scheme, config, overwrite_hessian=True)
    assert torch.equal(copied.codes, reused.codes) and torch.equal(copied.scales, reused.scales)
    assert h.numel() == 0  # its memory went back as soon as the factorisation no longer needed it


@pytest.mark.parametrize(("scheme", "config"), SCHEMES_AND_CONFIGS)
def test_linears_sharing_a_prepared_hessian_equal_separate_calls(scheme, config):
    # q, k and v read the same inputs (two of them dead): factored once, each result is the one
    # gptq_quantize gives from the raw Hessian, bit for bit
    x = correlated_inputs()
    x[:, [10, 130]] = 0.0
    q, k, v = random_weight(1), random_weight(2)[:32] * 3, random_weight(3)[:32].half()
    separate = [gptq_quantize(weight, hessian_of(x), scheme, config) for weight in (q, k, v)]
    h = hessian_of(x)
    prepared = prepare_hessian(h, scheme, config, overwrite_hessian=True)
    assert h.numel() == 0  # only the factor is kept
    for weight, (expected, expected_loss) in zip((q, k, v), separate):
        qw, loss = gptq_quantize(weight, prepared, scheme, config)
        assert torch.equal(qw.codes, expected.codes) and torch.equal(qw.scales, expected.scales)
        assert torch.equal(qw.zeros, expected.zeros) and torch.equal(qw.g_idx, expected.g_idx)
        assert loss == expected_loss


def test_prepared_hessian_is_refused_with_other_settings():
    scheme, config = QuantScheme(bits=4, group_size=128), GPTQConfig()
    prepared = prepare_hessian(hessian_of(correlated_inputs()), scheme, config)
    with pytest.raises(QuantkitError, match="prepared for group size 128"):
        gptq_quantize(random_weight(), prepared, QuantScheme(bits=4, group_size=64), config)
    with pytest.raises(QuantkitError, match="prepare it with the settings"):
        gptq_quantize(random_weight(), prepared, scheme, GPTQConfig(act_order=True))
    with pytest.raises(QuantkitError, match="must be \\(128, 128\\)"):
        gptq_quantize(random_weight()[:, :128], prepared, scheme, config)
    with pytest.raises(QuantkitError, match="square"):
        prepare_hessian(torch.eye(IN_FEATURES)[:100], scheme, config)


def test_empty_hessian_accumulator_is_an_error():
    accumulator = HessianAccumulator(8)
    accumulator.add_batch(torch.zeros(0, 8))
    with pytest.raises(QuantkitError, match="no calibration tokens"):
        _ = accumulator.hessian
    with pytest.raises(ValueError, match="last dimension 8"):
        accumulator.add_batch(torch.zeros(4, 9))


@pytest.mark.gpu
@pytest.mark.parametrize(("scheme", "config"), SCHEMES_AND_CONFIGS[::2])
def test_cuda_matches_cpu(scheme, config):
    x, weight = correlated_inputs(), random_weight()
    h_cpu = hessian_of(x)
    cuda_accumulator = HessianAccumulator(IN_FEATURES)
    cuda_accumulator.add_batch(x.cuda().half())
    h_cuda = cuda_accumulator.hessian
    torch.testing.assert_close(
        h_cuda.cpu(), hessian_of(x.half().float()), rtol=1e-4, atol=1e-4
    )
    cpu, cpu_loss = gptq_quantize(weight, h_cpu, scheme, config)
    cuda, cuda_loss = gptq_quantize(weight.cuda(), h_cpu.cuda(), scheme, config)
    assert cuda.codes.is_cuda and cuda.g_idx.is_cuda
    assert torch.equal(cuda.g_idx.cpu(), cpu.g_idx)
    assert float((cuda.codes.cpu() == cpu.codes).double().mean()) > 0.999
    assert cuda_loss == pytest.approx(cpu_loss, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("scheme", "config"),
    [
        (
            QuantScheme(bits=4, group_size=32, symmetric=False),
            GPTQConfig(block_size=32),
        ),
        (QuantScheme(bits=3, group_size=64), GPTQConfig(block_size=16, act_order=True)),
        (QuantScheme(bits=4, group_size=-1), GPTQConfig(block_size=24)),
    ],
)
def test_cuda_graph_replay_equals_eager_cuda(scheme, config, monkeypatch):
    monkeypatch.setattr(gptq_module, "GPTQ_BLOCK_KERNEL", False)  # the graph path, not the kernel
    weight, h = random_weight().cuda(), hessian_of(correlated_inputs()).cuda()
    graphed, graphed_loss = gptq_quantize(weight, h, scheme, config)
    monkeypatch.setattr(gptq_module, "CUDA_GRAPHS", False)
    eager, eager_loss = gptq_quantize(weight, h, scheme, config)
    assert torch.equal(graphed.codes, eager.codes)
    assert torch.equal(graphed.scales, eager.scales)
    assert torch.equal(graphed.zeros, eager.zeros)
    assert torch.equal(graphed.g_idx, eager.g_idx)
    assert graphed_loss == eager_loss


@pytest.mark.parametrize("size", [1, 7, 64, 200])
def test_inverse_cholesky_by_reversal_equals_the_reference_form(size):
    # the accelerator path: U = J L⁻¹ J for J H J = L Lᵀ must be the upper Cholesky factor of H⁻¹
    from quantkit.quant.gptq import _inverse_cholesky_upper_by_reversal

    gen = torch.Generator().manual_seed(size)
    x = torch.randn(3 * size, size, generator=gen, dtype=torch.float64)
    h = x.T @ x / x.shape[0] + 0.01 * torch.eye(size, dtype=torch.float64)
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    upper, info = _inverse_cholesky_upper_by_reversal(h.clone())
    assert int(info) == 0
    assert torch.equal(upper, upper.triu()) and bool((upper.diagonal() > 0).all())
    torch.testing.assert_close(upper, reference, rtol=1e-9, atol=1e-9)
    _, info = _inverse_cholesky_upper_by_reversal(-torch.eye(size, dtype=torch.float64))
    assert int(info) != 0  # not positive definite: reported, so GPTQ asks for more damping
