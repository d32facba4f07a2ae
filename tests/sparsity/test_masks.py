"""Mask selection: exact counts, N:M patterns, ties, Wanda's statistic and score, structure parsing."""

import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.sparsity.magnitude import magnitude_keep_mask
from quantkit.sparsity.masks import (
    follows_nm,
    keep_mask,
    layer_keep_mask,
    nm_keep_mask,
    pruned_count,
    row_keep_mask,
)
from quantkit.sparsity.structure import (
    MaskStructure,
    check_sparsity_value,
    parse_mask_structure,
)
from quantkit.sparsity.wanda import InputNorms, wanda_keep_mask, wanda_scores


def scores(rows=12, cols=40, seed=0):
    return torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity", [0.5, 0.3, 0.7, 0.9])
def test_row_mask_prunes_exactly_floor_of_each_row(sparsity):
    keep = row_keep_mask(scores(), sparsity)
    assert ((~keep).sum(1) == pruned_count(40, sparsity)).all()
    # the pruned ones are the lowest of their row
    s = scores()
    pruned_max = s.masked_fill(keep, float("-inf")).amax(1)
    kept_min = s.masked_fill(~keep, float("inf")).amin(1)
    assert (pruned_max <= kept_min).all()


def test_exact_counts_with_ties_and_float_rounding():
    assert pruned_count(10, 0.7) == 7  # 10 * 0.7 = 6.999999999999999 in floating point
    tied = torch.ones(6, 10)
    keep = row_keep_mask(tied, 0.7)
    assert ((~keep).sum(1) == 7).all()
    assert (~keep[:, :7]).all()  # stable: ties go by position
    keep = layer_keep_mask(tied, 0.5)
    assert (~keep).sum() == 30


def test_layer_mask_prunes_the_lowest_of_the_whole_matrix():
    s = scores()
    keep = layer_keep_mask(s, 0.5)
    assert (~keep).sum() == 240
    assert s[~keep].max() <= s[keep].min()
    # rows may lose different numbers of weights
    assert len(set((~keep).sum(1).tolist())) > 1


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4)])
def test_nm_mask_keeps_the_n_largest_of_every_m(n, m):
    s = scores(8, 32)
    keep = nm_keep_mask(s, n, m)
    runs_keep, runs_s = keep.view(8, -1, m), s.view(8, -1, m)
    assert (runs_keep.sum(-1) == n).all()
    kept_min = runs_s.masked_fill(~runs_keep, float("inf")).amin(-1)
    pruned_max = runs_s.masked_fill(runs_keep, float("-inf")).amax(-1)
    assert (pruned_max <= kept_min).all()
    assert follows_nm(s * keep, n, m)
    assert not follows_nm(s, n, m)


def test_nm_needs_divisible_inputs_and_follows_nm_counts_zeros():
    with pytest.raises(QuantkitError, match="divisible by 4"):
        nm_keep_mask(scores(4, 10), 2, 4)
    w = torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0]])
    assert follows_nm(w, 2, 4) and follows_nm(w, 1, 4) is False and not follows_nm(w[:, :6], 2, 4)


def test_magnitude_keeps_largest_absolute_values():
    w = torch.tensor([[-4.0, 1.0, -0.5, 3.0], [0.1, -0.2, 5.0, -6.0]])
    keep = magnitude_keep_mask(w, MaskStructure(), 0.5, "row")
    assert keep.tolist() == [[True, False, False, True], [False, False, True, True]]
    keep = magnitude_keep_mask(w, MaskStructure(), 0.5, "layer")
    assert keep.tolist() == [[True, False, False, True], [False, False, True, True]]
    keep = magnitude_keep_mask(w, MaskStructure(), 0.25, "layer")
    assert (~keep).sum() == 2 and not keep[1, 0] and not keep[1, 1]


def test_wanda_statistic_and_score():
    x = torch.randn(3, 50, 16, generator=torch.Generator().manual_seed(1))
    norms = InputNorms(16)
    for chunk in x.split(2):  # batches of any size give the norm over every token
        norms.add_batch(chunk)
    assert norms.num_tokens == 150
    torch.testing.assert_close(norms.norms, x.reshape(-1, 16).double().norm(dim=0))
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(wanda_scores(w, norms.norms), w.double().abs() * x.reshape(-1, 16).double().norm(dim=0))
    # a channel with a huge input keeps its weights even when they are small
    big = torch.ones(16)
    big[3] = 1e3
    keep = wanda_keep_mask(w, big, MaskStructure(), 0.5, "row")
    assert keep[:, 3].all() and ((~keep).sum(1) == 8).all()


@pytest.mark.parametrize("structure", [MaskStructure(2, 4), MaskStructure()])
def test_wanda_float32_tie_goes_to_the_truly_smaller_score(structure):
    # column 0 scores (1 + 2^-23)^2 = 1 + 2^-22 + 2^-46, column 1 scores (1 + 2^-22) * 1: equal in
    # float32, so a float32 score would prune the earlier column; the float64 one prunes column 1
    up = 1 + 2.0**-23
    norms = InputNorms(4)
    norms.add_batch(torch.tensor([[up, 1.0, 1.0, 1.0]]))
    w = torch.tensor([[up, 1 + 2.0**-22, 0.5, 4.0]])
    s = wanda_scores(w, norms.norms)
    assert s.dtype == torch.float64 and s[0, 1] < s[0, 0]
    assert s.float()[0, 0] == s.float()[0, 1]
    assert keep_mask(s.float(), structure, 0.5).tolist() == [[False, True, False, True]]
    assert wanda_keep_mask(w, norms.norms, structure, 0.5).tolist() == [[True, False, False, True]]


class _FakeRanks:
    """A data-parallel group of two ranks whose other rank holds ``other``'s statistics."""

    def __init__(self, other: InputNorms):
        self.values = [other.squared_sum.clone(), torch.tensor([float(other.num_tokens)], dtype=torch.float64)]

    def all_reduce_sum(self, tensor):
        tensor += self.values.pop(0).to(tensor.dtype)
        return tensor


def test_input_norms_all_reduce_sums_ranks():
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(3))
    first, second, whole = InputNorms(8), InputNorms(8), InputNorms(8)
    first.add_batch(x[:40])
    second.add_batch(x[40:])
    whole.add_batch(x)
    first.all_reduce(_FakeRanks(second))
    assert first.num_tokens == 64
    torch.testing.assert_close(first.norms, whole.norms)


def test_keep_mask_dispatch():
    s = scores(4, 16)
    assert torch.equal(keep_mask(s, MaskStructure(2, 4), 0.5), nm_keep_mask(s, 2, 4))
    assert torch.equal(keep_mask(s, MaskStructure(), 0.5, "layer"), layer_keep_mask(s, 0.5))
    with pytest.raises(ValueError):
        keep_mask(s, MaskStructure(), 0.5, "column")


@pytest.mark.parametrize("text, n, m", [("2:4", 2, 4), (" 4:8 ", 4, 8), ("unstructured", None, None), ("0:0", None, None)])
def test_parse_mask_structure(text, n, m):
    structure = parse_mask_structure(text)
    assert (structure.n, structure.m) == (n, m)


@pytest.mark.parametrize("value, message", [
    (124, "YAML reads an unquoted 2:4"), ("4:2", "0 < N < M"), ("2-4", "N:M"), (None, "N:M"), ("4:4", "0 < N < M"),
])
def test_bad_mask_structures(value, message):
    with pytest.raises(QuantkitError, match=message):
        parse_mask_structure(value)


def test_sparsity_value_against_structure():
    assert check_sparsity_value(None, MaskStructure(2, 4)) == 0.5
    assert check_sparsity_value(0.75, MaskStructure(1, 4)) == 0.75
    assert check_sparsity_value(None, MaskStructure()) == 0.5
    with pytest.raises(QuantkitError, match="does not match mask structure 2:4"):
        check_sparsity_value(0.6, MaskStructure(2, 4))
    for bad in (0, 1, 1.5, "half", True):
        with pytest.raises(QuantkitError, match="between 0 and 1"):
            check_sparsity_value(bad, MaskStructure())
