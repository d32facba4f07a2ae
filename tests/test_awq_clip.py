"""The clip search scores every shrink ratio in one batch; it must choose exactly what the
one-ratio-at-a-time loop it replaced chose (kept here as the reference), ties and NaNs included."""

from __future__ import annotations

import pytest
import torch

from quantkit.quant import awq_clip
from quantkit.quant.awq_clip import full_ranges, search_clip_ranges
from quantkit.quant.awq_error import gram_blocks, row_chunks
from quantkit.quant.qdq import max_code
from quantkit.quant.scheme import QuantScheme

RATIOS = torch.linspace(1.0, 0.5, 20).tolist()


def _reference_fake_quantize(weight, ranges, scheme):
    """``fake_quantize_clipped`` as it was: one range per group."""
    scales, zeros = awq_clip.range_qparams(ranges, scheme)
    groups = awq_clip._grouped(weight.float(), scheme.group_size)
    step = scales.unsqueeze(-1)
    low = -zeros.to(torch.float32).unsqueeze(-1)
    steps = torch.round(groups / step).clamp_(min=low, max=low + max_code(scheme.bits))
    return (steps * step).reshape(weight.shape)


def _reference_best_ratios(weight, full, blocks, scheme, ratios):
    """The replaced loop: keep a ratio only where its error is strictly below the best so far."""
    best_error = torch.full(full.shape[:2], torch.inf, device=weight.device)
    best_ratio = torch.ones_like(best_error)
    for ratio in ratios:
        delta = weight - _reference_fake_quantize(weight, full * ratio, scheme)
        error = awq_clip.group_output_errors(delta, blocks)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_ratio = torch.where(better, torch.full_like(best_ratio, ratio), best_ratio)
    return best_ratio


def _reference_search(weight, blocks, scheme, ratios):
    weight = weight.float()
    full = full_ranges(weight, scheme)
    best = torch.ones(full.shape[:2], device=weight.device)
    for rows in row_chunks(weight.shape[0], weight.shape[1]):
        best[rows] = _reference_best_ratios(weight[rows], full[rows], blocks, scheme, ratios)
    return full * best.unsqueeze(-1)


def _problem(rows, cols, group_size, seed=0):
    """Random weights with rows that tie across ratios (zero, constant, repeated) and blocks of
    correlated inputs, one block all zero (every ratio scores 0 there)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * torch.linspace(0.01, 0.1, cols)
    weight[0] = 0.0
    weight[1] = 0.03
    weight[2] = -0.02
    weight[3] = weight[4]
    x = torch.randn(4 * cols, cols, generator=gen) @ (torch.eye(cols) + 0.2 * torch.randn(cols, cols, generator=gen))
    blocks = gram_blocks(x, group_size)
    if blocks.shape[0] > 1:
        blocks[-1] = 0.0
    return weight, blocks


SCHEMES = [
    QuantScheme(bits=bits, group_size=group_size, symmetric=symmetric)
    for bits in (4, 8)
    for group_size in (32, 64, 128, -1)
    for symmetric in (True, False)
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize(("rows", "cols"), [(67, 128), (200, 256)])
def test_batched_search_equals_the_ratio_loop(scheme, rows, cols):
    weight, blocks = _problem(rows, cols, scheme.group_size)
    expected = _reference_search(weight, blocks, scheme, RATIOS)
    assert torch.equal(search_clip_ranges(weight, blocks, scheme, RATIOS), expected)
    # GPTQ passes a group's columns as a transposed view
    transposed = weight.t().contiguous().t()
    assert torch.equal(search_clip_ranges(transposed, blocks, scheme, RATIOS), expected)


@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, group_size=32), QuantScheme(bits=4, group_size=-1, symmetric=False)],
                         ids=str)
def test_row_batches_do_not_change_the_choice(scheme, monkeypatch):
    weight, blocks = _problem(101, 128, scheme.group_size, seed=1)
    expected = _reference_search(weight, blocks, scheme, RATIOS)
    monkeypatch.setattr(awq_clip, "_CPU_BATCH_ELEMENTS", 7 * len(RATIOS) * 128)  # 7 rows a batch, 3 left over
    monkeypatch.setattr(awq_clip, "_CPU_MIN_BATCH_ROWS", 1)
    assert len(awq_clip._row_batches(101, 128, len(RATIOS), weight.device)) == 15
    assert torch.equal(search_clip_ranges(weight, blocks, scheme, RATIOS), expected)
    monkeypatch.setattr(awq_clip, "_CPU_MIN_BATCH_ROWS", 10 * len(RATIOS))  # the floor wins: 10 rows a batch
    assert len(awq_clip._row_batches(101, 128, len(RATIOS), weight.device)) == 11
    assert torch.equal(search_clip_ranges(weight, blocks, scheme, RATIOS), expected)


def test_ratio_as_python_float_and_as_float32_tensor_scale_alike():
    # the loop scaled ranges by a Python float, the batch by a float32 tensor of the ratios
    gen = torch.Generator().manual_seed(2)
    full = torch.randn(4096, 4, 2, generator=gen) * torch.logspace(-20, 20, 4096).reshape(-1, 1, 1)
    ratios = RATIOS + torch.rand(50, generator=gen, dtype=torch.float64).tolist()
    batched = full * torch.tensor(ratios, dtype=torch.float32).reshape(-1, 1, 1, 1)
    for scaled, ratio in zip(batched, ratios):
        assert torch.equal(scaled, full * ratio)


def test_nan_errors_never_win_and_all_nan_groups_keep_the_full_range(monkeypatch):
    # The least errors become NaN: the loop skipped them (NaN < x is false) for the best finite
    # one, and groups with no finite error kept ratio 1.0; infinite errors never won either.
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    weight, blocks = _problem(64, 128, scheme.group_size, seed=3)
    exact = awq_clip.group_output_errors
    unclipped = exact(weight - _reference_fake_quantize(weight, full_ranges(weight, scheme), scheme), blocks)
    threshold = float(unclipped.median())  # a constant: each error is spoiled by its own value alone

    def spoiled(delta, blocks):
        errors = exact(delta, blocks)
        errors = torch.where(errors < threshold, torch.nan, errors)
        errors[:, 1] = torch.nan
        errors[:, 2] = torch.where(errors[:, 2] > threshold, torch.inf, torch.nan)
        return errors

    monkeypatch.setattr(awq_clip, "group_output_errors", spoiled)
    expected = _reference_search(weight, blocks, scheme, RATIOS)
    chosen = search_clip_ranges(weight, blocks, scheme, RATIOS)
    assert torch.equal(chosen, expected)
    assert torch.equal(chosen[:, 1:3], full_ranges(weight, scheme)[:, 1:3])
    assert not torch.equal(chosen, full_ranges(weight, scheme))
