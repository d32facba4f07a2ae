"""SparseGPT against a plain transcription of the reference algorithm, on small matrices."""

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.quant.hessian import HessianAccumulator
from quantkit.quant.qdq import compute_qparams
from quantkit.quant.scheme import QuantScheme
from quantkit.sparsity.masks import follows_nm, row_keep_mask
from quantkit.sparsity.sparsegpt import SparseGPTConfig, sparsegpt_prune
from quantkit.sparsity.structure import MaskStructure


def problem(rows=24, cols=64, tokens=256, seed=0):
    """A weight and the Hessian of correlated inputs (a random mixing of a few directions)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, cols // 4, generator=gen) @ torch.randn(cols // 4, cols, generator=gen)
    x += 0.3 * torch.randn(tokens, cols, generator=gen)
    w = torch.randn(rows, cols, generator=gen)
    acc = HessianAccumulator(cols)
    acc.add_batch(x)
    return w, acc.hessian, x


def reference(w, h, structure, sparsity, block, damp=0.01, bits=None, group=-1):
    """SparseGPT as the reference code states it (IST-DASLab/sparsegpt ``fasterprune``), without
    lazy batching: every column's error updates all later columns at once."""
    w, h = w.clone().double(), h.clone().double()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    scale = zero = None
    maxq = 2**bits - 1 if bits else None
    if bits and group == -1:
        s, z = compute_qparams(w.float(), bits, -1, True, min_zero=1, fp16_scales=True)
        scale, zero = s[:, 0].double(), z[:, 0].double()
    for b in range(0, cols, block):
        e = min(b + block, cols)
        if structure.m is None:
            saliency = w[:, b:e] ** 2 / torch.diag(hinv)[b:e].reshape(1, -1) ** 2
            prune = int(saliency.numel() * sparsity)
            order = torch.sort(saliency.flatten(), stable=True).indices[:prune]
            block_keep = torch.ones(saliency.numel(), dtype=torch.bool)
            block_keep[order] = False
            keep[:, b:e] = block_keep.view(rows, e - b)
        for i in range(b, e):
            if structure.m is not None and (i - b) % structure.m == 0:
                run = w[:, i : i + structure.m] ** 2 / torch.diag(hinv)[i : i + structure.m].reshape(1, -1) ** 2
                low = torch.sort(run, dim=1, stable=True).indices[:, : structure.m - structure.n]
                keep[:, i : i + structure.m].scatter_(1, low, False)
            if bits and group != -1 and i % group == 0:
                s, z = compute_qparams((w[:, i : i + group] * keep[:, i : i + group]).float(), bits, -1, True,
                                       min_zero=1, fp16_scales=True)
                scale, zero = s[:, 0].double(), z[:, 0].double()
            q = w[:, i] * keep[:, i]
            if bits:
                q = scale * (torch.clamp(torch.round(q / scale) + zero, 0, maxq) - zero)
            err = (w[:, i] - q) / hinv[i, i]
            w[:, i:] -= err.unsqueeze(1) * hinv[i, i:].unsqueeze(0)
            w[:, i] = q
    return w.float(), keep


CASES = [(MaskStructure(), 0.5), (MaskStructure(), 0.7), (MaskStructure(2, 4), 0.5), (MaskStructure(4, 8), 0.5)]


@pytest.mark.parametrize("structure, sparsity", CASES, ids=["50%", "70%", "2:4", "4:8"])
def test_pruning_matches_the_reference(structure, sparsity):
    w, h, _x = problem()
    result = sparsegpt_prune(w, h, structure, sparsity, SparseGPTConfig(block_size=32, nm_selection="diagonal"))
    want, keep = reference(w, h, structure, sparsity, block=32)
    assert torch.equal(result.keep, keep)
    torch.testing.assert_close(result.weight, want, rtol=1e-4, atol=1e-4)
    assert torch.equal(result.weight == 0, ~keep)
    if structure.is_nm:
        assert follows_nm(result.weight, structure.n, structure.m)
        assert ((~keep).view(24, -1, structure.m).sum(-1) == structure.m - structure.n).all()
    else:  # exactly floor(block * rows * sparsity) per block of 32 columns
        assert ((~keep).view(24, 2, 32).sum((0, 2)) == int(24 * 32 * sparsity)).all()
    assert result.qweight is None and result.loss > 0


@pytest.mark.parametrize("structure, group", [(MaskStructure(2, 4), 32), (MaskStructure(), 32), (MaskStructure(2, 4), -1)])
def test_quantizing_the_survivors_matches_the_reference(structure, group):
    w, h, _x = problem()
    scheme = QuantScheme(bits=4, group_size=group)
    config = SparseGPTConfig(block_size=32, clip_search=False, nm_selection="diagonal")
    result = sparsegpt_prune(w, h, structure, 0.5, config, scheme=scheme)
    want, keep = reference(w, h, structure, 0.5, block=32, bits=4, group=group)
    assert torch.equal(result.keep, keep)
    torch.testing.assert_close(result.weight, want, rtol=1e-4, atol=1e-4)
    # the record a checkpoint stores decodes to the same weights, with zeros where pruned
    torch.testing.assert_close(result.qweight.dequantize(), result.weight, rtol=0, atol=1e-6)
    assert torch.equal(result.qweight.dequantize() == 0, ~keep | (result.weight == 0))
    assert (result.qweight.dequantize()[~keep] == 0).all()


def test_joint_selection_picks_the_least_obs_error_of_each_run():
    """The first 2:4 run of a layer: for every row, the chosen pair to prune is the one whose joint
    OBS error w_S [(H⁻¹)_SS]⁻¹ w_Sᵀ is least, found here by trying all six pairs on H⁻¹ itself."""
    from itertools import combinations

    from quantkit.sparsity.sparsegpt import joint_nm_keep

    w, h, _x = problem(rows=40, cols=16, tokens=128, seed=2)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(16)
    hinv = torch.linalg.inv(damped.double())
    upper = torch.linalg.cholesky(hinv, upper=True)
    keep = joint_nm_keep(w.t()[:4].double(), upper[:4, :4], 2, 4)
    for row in range(40):
        costs = {pair: (w[row, list(pair)].double() @ torch.linalg.inv(hinv[list(pair)][:, list(pair)])
                        @ w[row, list(pair)].double()).item() for pair in combinations(range(4), 2)}
        assert set(torch.nonzero(~keep[:, row]).flatten().tolist()) == set(min(costs, key=costs.get))


@pytest.mark.parametrize("structure", [MaskStructure(2, 4), MaskStructure(4, 8)], ids=["2:4", "4:8"])
def test_joint_selection_reconstructs_better_than_the_diagonal_rule(structure):
    w, h, x = problem(rows=32, cols=128, tokens=512, seed=0)
    errors = {}
    for selection in ("joint", "diagonal"):
        result = sparsegpt_prune(w, h, structure, 0.5, SparseGPTConfig(block_size=64, nm_selection=selection))
        assert follows_nm(result.weight, structure.n, structure.m)
        errors[selection] = ((x @ (w - result.weight).t()) ** 2).sum().item()
    assert errors["joint"] < 0.95 * errors["diagonal"], errors


def test_error_feedback_beats_masking_alone():
    """On the calibration inputs, SparseGPT's output error is well below magnitude pruning's,
    and below zeroing SparseGPT's own mask without the weight updates."""
    w, h, x = problem(rows=32, cols=128, tokens=512, seed=4)
    structure = MaskStructure(2, 4)
    result = sparsegpt_prune(w, h, structure, 0.5, SparseGPTConfig(block_size=64))

    def output_error(pruned):
        return ((x @ (w - pruned).t()) ** 2).sum().item()

    magnitude = w * torch.stack([row_keep_mask(r.abs().view(-1, 4), 0.5).view(-1) for r in w])
    mask_only = w * result.keep
    assert output_error(result.weight) < 0.7 * output_error(mask_only) < 0.7 * output_error(magnitude)


def test_dead_inputs_and_the_last_linear_may_reuse_the_hessian():
    w, h, _x = problem()
    h[5, :] = 0
    h[:, 5] = 0
    working = h.clone()
    result = sparsegpt_prune(w, working, MaskStructure(2, 4), 0.5, SparseGPTConfig(block_size=32),
                             overwrite_hessian=True)
    assert (result.weight[:, 5] == 0).all() and torch.isfinite(result.weight).all()
    again = sparsegpt_prune(w, h, MaskStructure(2, 4), 0.5, SparseGPTConfig(block_size=32))
    torch.testing.assert_close(again.weight, result.weight)


def test_bad_settings_are_clear_errors():
    w, h, _x = problem()
    with pytest.raises(QuantkitError, match="block_size 30 must be a multiple of 4"):
        sparsegpt_prune(w, h, MaskStructure(2, 4), 0.5, SparseGPTConfig(block_size=30))
    with pytest.raises(QuantkitError, match="divisible by 8"):
        sparsegpt_prune(w[:, :60], h[:60, :60], MaskStructure(4, 8), 0.5, SparseGPTConfig(block_size=32))
    with pytest.raises(QuantkitError, match="block_size must be a positive integer"):
        SparseGPTConfig(block_size=0)
    with pytest.raises(QuantkitError, match="damp_percent"):
        SparseGPTConfig(damp_percent=1.5)
    with pytest.raises(QuantkitError, match="nm_selection must be one of joint, diagonal"):
        SparseGPTConfig(nm_selection="best")
    with pytest.raises(QuantkitError, match="SparseGPT could not factor the Hessian"):
        sparsegpt_prune(w, -torch.eye(64), MaskStructure(), 0.5, SparseGPTConfig(block_size=32))
