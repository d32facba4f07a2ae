"""Sampler: greedy, seeded reproducibility, filters, distributions, speculative verification.

Statistical tests use fixed seeds, so they are deterministic; their bounds are several standard
errors wide, so a correct sampler passes with any seed too.
"""

from __future__ import annotations

import math

import pytest
import torch

from quantkit.runtime.sampler import Sampler
from quantkit.runtime.sampling_params import SamplingParams as SP

sampler = Sampler()


def generators(seeds):
    return [None if s is None else torch.Generator().manual_seed(s) for s in seeds]


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / tokens.numel()


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=probs.numel()).double()
    expected = probs.double() * tokens.numel()
    keep = expected > 0
    assert observed[~keep].sum() == 0, "a token of probability 0 was drawn"
    return float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())


# chi-square critical values at p = 0.001 by degrees of freedom
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def test_greedy_rows_take_the_argmax_with_its_logprob():
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    tokens, logprobs = sampler.sample(logits, [SP(temperature=0)] * 8, [None] * 8)
    assert torch.equal(tokens, logits.argmax(-1))
    expected = logits.log_softmax(-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, expected)


def test_greedy_ignores_filters_and_mixed_batches_keep_greedy_rows_exact():
    torch.manual_seed(1)
    logits = torch.randn(6, 40)
    params = [SP(temperature=0, top_k=1, top_p=0.1), SP(temperature=0.8), SP(temperature=0),
              SP(top_k=5, seed=3), SP(temperature=0), SP(min_p=0.5)]
    tokens, _ = sampler.sample(logits, params, generators([None, None, None, 3, 7, None]))
    for row in (0, 2, 4):
        assert tokens[row] == logits[row].argmax()
    assert tokens.dtype == torch.int64 and tokens.shape == (6,)


def test_seeded_rows_are_reproducible_and_independent_of_the_batch():
    torch.manual_seed(2)
    logits = torch.randn(5, 1000)
    params = [SP(temperature=1.0, seed=s) for s in range(5)]
    first, lp1 = sampler.sample(logits, params, generators(range(5)))
    again, lp2 = sampler.sample(logits, params, generators(range(5)))
    assert torch.equal(first, again) and torch.equal(lp1, lp2)
    alone, _ = sampler.sample(logits[3:4], params[3:4], generators([3]))
    assert alone[0] == first[3]
    # The same generator keeps advancing: a request gets a stream of draws, not one repeated.
    gen = generators([11])
    draws = [sampler.sample(logits[:1], params[:1], gen)[0].item() for _ in range(20)]
    assert len(set(draws)) > 1


@pytest.mark.parametrize("params, allowed", [
    (SP(top_k=2), {0, 1}),
    (SP(top_p=0.7), {0, 1}),  # 0.5 < 0.7, then 0.5 + 0.3 reaches it
    (SP(top_p=0.45), {0}),
    (SP(min_p=0.15), {0, 1, 2}),  # floor 0.075
    (SP(top_k=3, top_p=0.9, min_p=0.5), {0, 1}),
    (SP(top_k=-1, top_p=1.0, min_p=0.0), {0, 1, 2, 3, 4}),
])
def test_filters_never_select_excluded_tokens(params, allowed):
    probs = torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04])
    logits = probs.log().repeat(4000, 1)
    torch.manual_seed(3)
    tokens, _ = sampler.sample(logits, [params] * 4000, [None] * 4000)
    assert set(tokens.tolist()) == allowed


def test_top_k_keeps_exactly_k_tokens_even_with_ties():
    logits = torch.tensor([[2.0, 1.0, 1.0, 1.0, 0.0]]).repeat(3000, 1)
    torch.manual_seed(4)
    tokens, _ = sampler.sample(logits, [SP(top_k=2)] * 3000, [None] * 3000)
    assert len(set(tokens.tolist())) == 2


@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_sampling_follows_the_tempered_softmax(temperature):
    n, logits = 60_000, torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, -1.5])
    torch.manual_seed(5)
    tokens, logprobs = sampler.sample(logits.repeat(n, 1), [SP(temperature=temperature)] * n, [None] * n)
    target = (logits / temperature).softmax(-1)
    assert chi_square(tokens, target) < CHI2_999[5]
    assert 0.5 * (frequencies(tokens, 6) - target.double()).abs().sum() < 0.01
    torch.testing.assert_close(logprobs, target.log()[tokens])


def test_filtered_sampling_is_the_renormalised_head():
    n = 40_000
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    torch.manual_seed(6)
    tokens, logprobs = sampler.sample(probs.log().repeat(n, 1), [SP(top_k=3)] * n, [None] * n)
    head = torch.tensor([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8
    assert chi_square(tokens, head) < CHI2_999[2]
    torch.testing.assert_close(logprobs, head.log()[tokens])


def test_seeded_per_row_sampling_follows_the_softmax_too():
    n, logits = 3000, torch.tensor([0.0, 1.0, 0.5])
    params = [SP(seed=s) for s in range(n)]
    tokens, _ = sampler.sample(logits.repeat(n, 1), params, generators(range(n)))
    assert chi_square(tokens, logits.softmax(-1)) < CHI2_999[2]


def test_probs_are_the_sampled_distribution_and_one_hot_when_greedy():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [1.0, 3.0, 2.0, 0.0]])
    probs = sampler.probs(logits, [SP(temperature=0), SP(temperature=0.5, top_k=2)])
    assert torch.equal(probs[0], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    head = torch.tensor([3.0, 2.0]).div(0.5).softmax(-1)
    torch.testing.assert_close(probs[1], torch.tensor([0.0, head[0], head[1], 0.0]))


# --------------------------------------------------------------- rejection sampling

P = torch.tensor([
    [0.40, 0.30, 0.15, 0.10, 0.05],
    [0.05, 0.05, 0.60, 0.20, 0.10],
    [0.20, 0.20, 0.20, 0.20, 0.20],
])
Q = torch.tensor([
    [0.10, 0.50, 0.10, 0.20, 0.10],
    [0.30, 0.05, 0.30, 0.05, 0.30],
])


def check_target_distribution(tokens: torch.Tensor, counts: torch.Tensor) -> None:
    """Every emitted position is distributed as the target's distribution at that position."""
    for position in range(P.shape[0]):
        emitted = tokens[counts > position, position]
        assert emitted.numel() > 2000
        assert chi_square(emitted, P[position]) < CHI2_999[4]
        assert 0.5 * (frequencies(emitted, 5) - P[position].double()).abs().sum() < 0.03


def test_rejection_sampling_leaves_the_target_distribution_unchanged():
    n = 40_000
    gen = torch.Generator().manual_seed(7)
    drafts = torch.stack([torch.multinomial(Q[i], n, replacement=True, generator=gen)
                          for i in range(2)], dim=1)
    torch.manual_seed(8)
    tokens, counts = sampler.rejection_sample(P.expand(n, 3, 5), Q.expand(n, 2, 5), drafts, [None] * n)
    assert tokens.shape == (n, 3) and counts.min() >= 1 and counts.max() == 3
    check_target_distribution(tokens, counts)
    # The first draft is kept with probability sum(min(p, q)).
    accept_rate = (counts >= 2).double().mean()
    assert abs(accept_rate - torch.minimum(P[0], Q[0]).sum()) < 0.01
    # Accepted drafts are the drafts; padding follows the emitted tokens.
    kept = counts >= 2
    assert torch.equal(tokens[kept, 0], drafts[kept, 0])
    assert (tokens[counts == 1, 1:] == -1).all()


def test_rejection_sampling_with_a_deterministic_proposer():
    n = 40_000
    drafts = torch.tensor([[1, 2]]).repeat(n, 1)  # n-gram lookup: a point mass on each draft
    torch.manual_seed(9)
    tokens, counts = sampler.rejection_sample(P.expand(n, 3, 5), None, drafts, [None] * n)
    check_target_distribution(tokens, counts)


def test_rejection_sampling_is_reproducible_with_seeded_generators():
    n = 64
    drafts = torch.tensor([[1, 2]]).repeat(n, 1)
    first = sampler.rejection_sample(P.expand(n, 3, 5), Q.expand(n, 2, 5), drafts, generators(range(n)))
    again = sampler.rejection_sample(P.expand(n, 3, 5), Q.expand(n, 2, 5), drafts, generators(range(n)))
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_greedy_verification_follows_the_argmax_chain():
    torch.manual_seed(10)
    batch, k, vocab = 6, 4, 11
    target = torch.randn(batch, k + 1, vocab).softmax(-1)
    argmax = target.argmax(-1)
    drafts = argmax[:, :k].clone()
    mismatch_at = [0, 1, 2, 3, 4, 4]  # 4 = every draft right
    for row, at in enumerate(mismatch_at):
        if at < k:
            drafts[row, at] = (argmax[row, at] + 1) % vocab
    draft_probs = torch.rand(batch, k, vocab).softmax(-1)
    tokens, counts = sampler.rejection_sample(target, draft_probs, drafts, [None] * batch,
                                              greedy=[True] * batch)
    for row, at in enumerate(mismatch_at):
        assert counts[row] == at + 1
        assert tokens[row, : at + 1].tolist() == argmax[row, : at + 1].tolist()
        assert (tokens[row, at + 1:] == -1).all()
    # One-hot targets (Sampler.probs of greedy rows) give the same answer without the flag.
    one_hot = torch.zeros_like(target).scatter_(2, argmax.unsqueeze(-1), 1.0)
    again, again_counts = sampler.rejection_sample(one_hot, draft_probs, drafts, [None] * batch)
    assert torch.equal(again, tokens) and torch.equal(again_counts, counts)


def test_mixed_greedy_and_sampled_rows_and_no_drafts():
    target = P.unsqueeze(0).repeat(2, 1, 1)
    drafts = torch.tensor([[0, 2], [3, 3]])
    tokens, counts = sampler.rejection_sample(target, Q.unsqueeze(0).repeat(2, 1, 1), drafts,
                                              generators([1, 2]), greedy=[True, False])
    assert tokens[0].tolist() == [0, 2, 0] and counts[0] == 3  # argmax of the uniform row is 0
    single, one = sampler.rejection_sample(P[:1].unsqueeze(0), None, torch.empty(1, 0, dtype=torch.long),
                                           [None], greedy=[True])
    assert single.tolist() == [[0]] and one.tolist() == [1]


def test_expected_acceptance_matches_theory():
    """With k drafts the expected count is sum over i of prod of acceptance rates (+1)."""
    n = 40_000
    gen = torch.Generator().manual_seed(12)
    drafts = torch.stack([torch.multinomial(Q[i], n, replacement=True, generator=gen)
                          for i in range(2)], dim=1)
    torch.manual_seed(13)
    _, counts = sampler.rejection_sample(P.expand(n, 3, 5), Q.expand(n, 2, 5), drafts, [None] * n)
    a0 = float(torch.minimum(P[0], Q[0]).sum())
    a1 = float(torch.minimum(P[1], Q[1]).sum())
    expected = 1 + a0 + a0 * a1
    assert math.isclose(float(counts.double().mean()), expected, abs_tol=0.02)
