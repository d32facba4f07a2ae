"""GPTQ's column loop in one Triton launch (``gptq_block_triton``) against the plain-torch loop
that GPTQ runs on the CPU and in its CUDA graphs (``gptq_block_reference``)."""

from __future__ import annotations

import itertools

import pytest
import torch
from kernel_cases import INTERPRET, needs_triton, triton_device

from quantkit.kernels.backend import next_power_of_2
from quantkit.kernels.gptq_block import gptq_block_reference
from quantkit.quant import gptq as gptq_module
from quantkit.quant.gptq import GPTQConfig, gptq_quantize
from quantkit.quant.qdq import compute_qparams, max_code
from quantkit.quant.scheme import QuantScheme

GROUP = 16  # columns per group inside a test block


def _hinv_upper(size: int, gen: torch.Generator, damp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse of a correlated inputs' XᵀX, as GPTQ uses."""
    x = torch.randn(4 * size, size, generator=gen) @ (torch.eye(size) + 0.3 * torch.randn(size, size, generator=gen))
    h = (x.t() @ x).double()
    h.diagonal().add_(damp * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()


def _block_problem(size, rows, bits, symmetric, *, shuffled=False, seed=0):
    """Weights (size, rows), hinv, per-group (scales, low, high) of shape (groups, rows) from the
    weights' ranges (so later columns, moved by the error feedback, get clamped), and each
    column's group: in order, or shuffled as under act-order with static groups."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(size, rows, generator=gen)
    groups = -(-size // GROUP)
    group_index = torch.arange(size) // GROUP
    if shuffled:
        group_index = group_index[torch.randperm(size, generator=gen)]
    scales, zeros = [], []
    for g in range(groups):
        s, z = compute_qparams(weight[group_index == g].t(), bits, -1, symmetric, min_zero=1, fp16_scales=True)
        scales.append(s[:, 0])
        zeros.append(z[:, 0].float())
    zeros = torch.stack(zeros)
    params = torch.stack(scales), -zeros, max_code(bits) - zeros
    return weight, _hinv_upper(size, gen), params, group_index


def _reference(weight, hinv, params, group_index):
    """Codes, errors, and the magnitude of the errors' terms: max |w / hinv[j, j]| of the
    updated columns (float32 rounding of the weights, not of the errors, bounds their gap)."""
    codes, errors, updated = torch.empty_like(weight), torch.empty_like(weight), weight.clone()
    gathered = (p.index_select(0, group_index) for p in params)
    gptq_block_reference(updated, hinv, *gathered, codes=codes, errors=errors)
    return codes, errors, float((updated.abs() / hinv.diagonal()[:, None]).max())


def _kernel(weight, hinv, params, group_index, block_r=None):
    from quantkit.kernels.gptq_block_triton import gptq_block_triton

    codes, errors = torch.full_like(weight, float("nan")), torch.full_like(weight, float("nan"))
    gptq_block_triton(weight, hinv, *params, group_index, codes=codes, errors=errors, block_r=block_r)
    return codes, errors


def _to(device, *tensors):
    return [t.to(device) if isinstance(t, torch.Tensor) else tuple(p.to(device) for p in t) for t in tensors]


def _assert_matches(codes, errors, want_codes, want_errors, magnitude):
    """Codes equal but for rare ties an fma's rounding flips; on the rows without a flip (a flip
    changes its row's later columns), errors equal to a few roundings of the weights' magnitude
    (w - code * s cancels most of w, more so on 8-bit grids: relative to the errors themselves
    the gap is 256 times larger at 8 bits than the same roundings at 4)."""
    same = codes == want_codes
    assert float(same.double().mean()) >= 0.999, f"{int((~same).sum())} codes differ"
    rows_ok = same.all(0)
    gap = float((errors[:, rows_ok] - want_errors[:, rows_ok]).abs().max()) if rows_ok.any() else 0.0
    assert gap <= 1e-6 * magnitude, f"errors differ by {gap / magnitude:.3g} of max |w / d|"


# (size, rows, bits, symmetric, shuffled groups): under the interpreter, each size, row count and
# grid at least once; on a GPU, all of them
SIZES, ROWS = (128, 64, 37), (1, 17, 256, 1000)
INTERPRETED_CASES = [
    (128, 1, 4, False, False),
    (128, 17, 8, True, True),
    (128, 256, 4, True, False),
    (128, 1000, 4, False, False),
    (64, 17, 4, False, True),
    (64, 256, 8, False, False),
    (37, 1, 8, True, False),
    (37, 1000, 8, False, True),
]
GPU_CASES = [(*shape, bits, symmetric, False) for shape, bits, symmetric in
             itertools.product(itertools.product(SIZES, ROWS), (4, 8), (True, False))]


@needs_triton
@pytest.mark.parametrize(("size", "rows", "bits", "symmetric", "shuffled"), INTERPRETED_CASES if INTERPRET else GPU_CASES)
def test_kernel_matches_reference(size, rows, bits, symmetric, shuffled):
    weight, hinv, params, group_index = _block_problem(size, rows, bits, symmetric, shuffled=shuffled)
    want_codes, want_errors, magnitude = _reference(weight, hinv, params, group_index)
    low, high = params[1].index_select(0, group_index), params[2].index_select(0, group_index)
    assert (want_codes == low).any() or (want_codes == high).any(), "the case should clamp"
    # under the interpreter a program costs the same for any tile, so one tile covers all rows
    block_r = min(256, next_power_of_2(rows)) if INTERPRET else None
    device = triton_device()
    codes, errors = _kernel(*_to(device, weight, hinv, params, group_index), block_r=block_r)
    _assert_matches(codes.cpu(), errors.cpu(), want_codes, want_errors, magnitude)


@needs_triton
def test_rows_do_not_depend_on_the_tiling_or_the_views():
    # rows are independent: a tile boundary or solving some rows alone changes nothing, and hinv
    # may be a strided view of the whole factor (as GPTQ passes its diagonal blocks)
    size, rows = 37, 40
    weight, hinv, params, group_index = _block_problem(size, rows, 4, False)
    whole = torch.zeros(size + 5, size + 5)
    whole[5:, 5:] = hinv
    weight, whole, params, group_index = _to(triton_device(), weight, whole, params, group_index)
    hinv = whole[5:, 5:]
    wide = _kernel(weight, hinv, params, group_index, block_r=64)
    narrow = _kernel(weight, hinv, params, group_index, block_r=16)
    part = _kernel(weight[:, 7:30], hinv, tuple(p[:, 7:30] for p in params), group_index, block_r=16)
    for a, b, c in zip(wide, narrow, part):
        assert torch.equal(a, b)
        assert torch.equal(a[:, 7:30], c)


@needs_triton
def test_codes_round_half_to_even_and_clamp_like_torch():
    # exact ties w / s = k + 0.5 (s a power of two) over and beyond the 4-bit range; hinv = I, so
    # no column moves another
    size, rows = 4, 64
    steps = torch.arange(rows, dtype=torch.float32) - rows // 2 + 0.5
    weight = torch.stack([steps * 0.25, -steps * 0.25, steps * 0.125, steps * 0.5])
    params = torch.full((1, rows), 0.25), torch.full((1, rows), -8.0), torch.full((1, rows), 7.0)
    group_index = torch.zeros(size, dtype=torch.long)
    want_codes, want_errors, _ = _reference(weight, torch.eye(size), params, group_index)
    device = triton_device()
    codes, errors = _kernel(*_to(device, weight, torch.eye(size), params, group_index))
    assert torch.equal(codes.cpu(), want_codes)
    assert torch.equal(codes.cpu()[0, 28:36], torch.tensor([-4.0, -2, -2, 0, 0, 2, 2, 4]))
    assert torch.equal(errors.cpu(), want_errors)


def _gptq_problem(rows, cols, device):
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(rows, cols, generator=gen) * 0.02
    x = torch.randn(4 * cols, cols, generator=gen) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen))
    hessian = 2 * x.t() @ x / x.shape[0]
    hessian[:, 3] = hessian[3, :] = 0  # a dead input
    return weight.to(device), hessian.to(device)


def _assert_gptq_paths_agree(weight, hessian, scheme, config, monkeypatch):
    monkeypatch.setenv("QUANTKIT_KERNELS", "triton")
    kernel, kernel_loss = gptq_quantize(weight, hessian, scheme, config)
    monkeypatch.setenv("QUANTKIT_KERNELS", "reference")
    reference, reference_loss = gptq_quantize(weight, hessian, scheme, config)
    assert float((kernel.codes == reference.codes).double().mean()) >= 0.999
    assert float((kernel.scales == reference.scales).double().mean()) >= 0.999
    assert torch.equal(kernel.g_idx, reference.g_idx)
    assert kernel_loss == pytest.approx(reference_loss, rel=1e-4)


GPTQ_CASES = {  # one group for all columns, dynamic groups (blocks cut at each), static groups shuffled
    "per-channel": (QuantScheme(bits=4, group_size=-1, symmetric=False), GPTQConfig(block_size=48)),
    "act-order g32": (QuantScheme(bits=4, group_size=32, symmetric=False), GPTQConfig(block_size=64, act_order=True)),
    "act-order static": (QuantScheme(bits=4, group_size=32), GPTQConfig(block_size=64, act_order=True,
                                                                        static_groups=True, clip_search=False)),
}


@needs_triton
@pytest.mark.parametrize("case", GPTQ_CASES)
def test_gptq_with_the_kernel_equals_gptq_without(case, monkeypatch):
    weight, hessian = _gptq_problem(24, 96, triton_device())
    _assert_gptq_paths_agree(weight, hessian, *GPTQ_CASES[case], monkeypatch)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["default", "act-order"])
def test_gptq_with_the_kernel_equals_the_cuda_graph(case, monkeypatch):
    config = GPTQConfig(act_order=case == "act-order")
    weight, hessian = _gptq_problem(1024, 1024, "cuda")
    assert gptq_module.GPTQ_BLOCK_KERNEL and gptq_module.CUDA_GRAPHS
    _assert_gptq_paths_agree(weight, hessian, QuantScheme(bits=4, group_size=128), config, monkeypatch)
