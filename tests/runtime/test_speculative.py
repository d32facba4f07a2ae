"""Speculative decoding on CPU with the bundled target and draft (float32).

Greedy output with speculation (draft model or n-gram lookup) is token for token the output
without it, whatever the arrivals, preemptions, stops and k; sampled output follows the target's
distribution; the draft's cache follows the target's tokens and is freed when sequences end.
Statistical tests use fixed seeds, so they are deterministic; their bounds are p = 0.001 wide.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch
from test_engine import run_staggered

from quantkit.runtime.engine import Engine
from quantkit.runtime.sampling_params import SamplingParams
from quantkit.runtime.sequence import Sequence
from quantkit.runtime.spec import AdaptiveK, NgramProposer, find_continuation
from quantkit.runtime.spec.adaptive import expected_tokens

PROMPTS = [
    "The history of the city begins in the",
    "In 1990, the band released their second album, which",
    "Photosynthesis is",
    "The river flows through the valley and into the sea near the old harbour, where ships from",
    "one two three four one two three four one two three four one two",
]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny ops run faster on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def plain():
    return Engine(kv_cache_tokens=2048)


@pytest.fixture(scope="module")
def drafted():
    return Engine(kv_cache_tokens=2048, draft="quantkit-draft")


@pytest.fixture(scope="module")
def ngram():
    return Engine(kv_cache_tokens=2048, speculative_method="ngram")


@pytest.fixture(scope="module")
def reference(plain):
    """Greedy token ids without speculation, by prompt."""
    outputs = plain.generate(PROMPTS, GREEDY)
    return {prompt: out.outputs[0].token_ids for prompt, out in zip(PROMPTS, outputs)}


def draft_blocks(engine):
    return engine.speculator.proposer.block_manager


# ------------------------------------------------------------------ greedy: identical output
@pytest.mark.parametrize("engine_name", ["drafted", "ngram"])
def test_greedy_with_speculation_is_greedy_without(request, engine_name, reference):
    engine = request.getfixturevalue(engine_name)
    outputs = run_staggered(engine, PROMPTS, GREEDY, [0, 2, 3, 7, 7])
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == reference[prompt]
        assert output.outputs[0].finish_reason == "length"
    metrics = engine.spec_metrics
    assert metrics.steps_on > 0 and metrics.num_proposed > 0
    assert 0 < metrics.acceptance_rate <= 1
    assert metrics.tokens_per_verification > 1


def test_small_cache_preempts_and_still_matches(reference):
    small = Engine(kv_cache_tokens=96, max_num_batched_tokens=32, draft="quantkit-draft",
                   adaptive_speculation=False)  # 6 blocks for 4 growing sequences with 4 drafts each
    prompts = PROMPTS[:4]
    outputs = run_staggered(small, prompts, GREEDY, [0, 0, 1, 1])
    assert small.scheduler.num_preemptions > 0
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == reference[prompt]
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks
    assert draft_blocks(small).num_free_blocks == draft_blocks(small).num_blocks
    assert small.speculator.proposer.num_tracked == 0


def test_max_tokens_stop_tokens_stop_strings_and_logprobs_match(plain, drafted):
    stop_token = plain.generate([PROMPTS[0]], GREEDY)[0].outputs[0].token_ids[6]
    text = plain.generate([PROMPTS[1]], GREEDY)[0].outputs[0].text
    cases = [
        (PROMPTS[0], SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_token], logprobs=True)),
        (PROMPTS[1], SamplingParams(temperature=0, max_tokens=20, stop=[text[10:14]], logprobs=True)),
        (PROMPTS[2], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=True)),
        (PROMPTS[4], SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=True)),
    ]
    prompts, params = [p for p, _ in cases], [sp for _, sp in cases]
    expected, got = plain.generate(prompts, params), drafted.generate(prompts, params)
    for want, have in zip(expected, got):
        want, have = want.outputs[0], have.outputs[0]
        assert (have.token_ids, have.text, have.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        assert len(have.logprobs) == len(want.logprobs)
        torch.testing.assert_close(torch.tensor(have.logprobs), torch.tensor(want.logprobs), atol=1e-4, rtol=0)
    assert got[0].outputs[0].finish_reason == "stop" and got[0].outputs[0].token_ids[-1] == stop_token
    assert got[1].outputs[0].finish_reason == "stop"
    assert [len(o.outputs[0].token_ids) for o in got[2:]] == [3, 7]


def test_parallel_seeded_samples_are_reproducible_with_speculation():
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12, n=3, ignore_eos=True, logprobs=True)
    first, second = (Engine(kv_cache_tokens=1024, draft="quantkit-draft").generate([PROMPTS[0]], params)[0]
                     for _ in range(2))
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in second.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1
    assert all(len(c.logprobs) == 12 and all(lp <= 0 for lp in c.logprobs) for c in first.outputs)


# ------------------------------------------------------------------ the draft's own cache
def test_draft_twin_rolls_back_to_the_target_tokens(drafted):
    """After any mix of accepted and rejected drafts, the proposals are the draft model's own greedy
    continuation of the target's tokens, as a fresh draft-only engine computes it."""
    draft_only = Engine("quantkit-draft", kv_cache_tokens=1024)
    proposer = drafted.speculator.proposer
    prompt = drafted.tokenizer.encode(PROMPTS[3], add_special_tokens=False)
    target = Sequence(10_000, "twin-test", prompt, SamplingParams(temperature=0))

    def draft_greedy(k):
        params = SamplingParams(temperature=0, max_tokens=k, ignore_eos=True)
        return draft_only.generate([target.all_token_ids], params)[0].outputs[0].token_ids

    target.output_token_ids.append(17)  # the first token, from the target's prefill
    for step in range(5):
        proposal = proposer.propose([(target, 4)])[target.seq_id]
        assert proposal.tokens == draft_greedy(4)
        assert proposal.probs.shape == (4, drafted.model.config.vocab_size)
        accepted = step % 3  # 0, 1, 2 accepted, then a token of the target's own
        target.output_token_ids += proposal.tokens[:accepted] + [(proposal.tokens[accepted] + 1) % 8000]
    target.output_token_ids += draft_greedy(4)  # a step without speculation: the twin catches up
    assert proposer.propose([(target, 3)])[target.seq_id].tokens == draft_greedy(3)
    proposer.release(target.seq_id)
    assert draft_blocks(drafted).num_free_blocks == draft_blocks(drafted).num_blocks


def test_abort_and_finish_free_the_draft_blocks():
    engine = Engine(kv_cache_tokens=1024, draft="quantkit-draft")
    manager = draft_blocks(engine)
    ids = [engine.add_request(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)) for p in PROMPTS]
    for _ in range(4):
        engine.step()
    assert manager.num_free_blocks < manager.num_blocks  # the twins hold blocks
    engine.abort(ids[0])
    engine.abort(ids[3])
    assert engine.speculator.proposer.num_tracked == len(PROMPTS) - 2
    while engine.has_unfinished():
        engine.step()
    assert manager.num_free_blocks == manager.num_blocks
    assert engine.speculator.proposer.num_tracked == 0


# ------------------------------------------------------------------ metrics and switch-off
def test_ngram_acceptance_is_high_on_a_repetitive_prompt():
    engine = Engine(kv_cache_tokens=1024, speculative_method="ngram")
    prompt = "1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3"  # the target goes on ", 4, 4, 4, ..."
    engine.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    metrics = engine.spec_metrics
    assert metrics.acceptance_rate > 0.7
    assert metrics.mean_accepted_length > 2
    assert metrics.current_k >= 3  # a high acceptance asks for long drafts


def test_speculation_switches_off_for_a_large_decoding_batch():
    engine = Engine(kv_cache_tokens=2048, draft="quantkit-draft", spec_max_batch=3)
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (4, 4, 4, 30)]
    engine.generate(PROMPTS[:4], params)
    metrics = engine.spec_metrics
    assert metrics.steps_off > 0  # four sequences decoding together
    assert metrics.steps_on > 0  # the long one alone at the end
    assert metrics.as_dict()["steps_off"] == metrics.steps_off


# ------------------------------------------------------------------ sampling: the target's law
def top_k_law(model_forward, prefix, depth, top_k):
    """Exact probabilities of every ``depth``-token continuation under top-k, temperature 1."""
    law = {(): 1.0}
    for _ in range(depth):
        longer = {}
        for tokens, p in law.items():
            logits = model_forward(prefix + list(tokens))
            values, indices = logits.topk(top_k)
            for q, token in zip(values.softmax(-1).tolist(), indices.tolist()):
                longer[tokens + (token,)] = p * q
        law = longer
    return law


def chi_square_critical(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z = 3.09: p = 0.001)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi_square(samples: Counter, law: dict) -> tuple[float, int]:
    """Statistic and degrees of freedom, cells expected below 5 pooled into one."""
    n = sum(samples.values())
    assert set(samples) <= set(law), "a continuation of probability 0 was drawn"
    cells = [(samples.get(key, 0), p * n) for key, p in law.items()]
    big = [(o, e) for o, e in cells if e >= 5]
    pooled = (sum(o for o, e in cells if e < 5), sum(e for o, e in cells if e < 5))
    if pooled[1] > 0:
        big.append(pooled)
    return sum((o - e) ** 2 / e for o, e in big), len(big) - 1


@pytest.fixture(scope="module")
def target_forward(plain):
    """Last-position logits of the target on a token list (one sequence in blocks 0..7)."""
    from quantkit.runtime.forward_batch import build_forward_batch

    model = plain.model
    cache = model.new_kv_cache(8, 16)

    def forward(ids):
        batch = build_forward_batch([ids], [0], [list(range(len(ids)))], [list(range(8))], [1], model.device)
        return model.forward(batch, cache)[0]

    return forward


@pytest.mark.parametrize("options", [{}, {"draft": "quantkit-draft"}, {"speculative_method": "ngram"}],
                         ids=["without", "draft", "ngram"])
def test_sampled_tokens_follow_the_target_distribution(options, target_forward):
    """The first three tokens of many seeded samples (top_k=3, temperature 1): the second and third
    come out of one verification of two drafts, the first from the prefill."""
    engine = Engine(kv_cache_tokens=8192, num_speculative_tokens=2, adaptive_speculation=False,
                    spec_max_batch=10**6, **options)
    prompt = engine.tokenizer.encode("the cat and the dog and the cat and the", add_special_tokens=False)
    n = 500
    params = [SamplingParams(temperature=1.0, top_k=3, max_tokens=4, seed=seed, ignore_eos=True) for seed in range(n)]
    before = engine.spec_metrics.num_proposed if engine.speculator else 0
    outputs = engine.generate([prompt] * n, params)
    samples = Counter(tuple(o.outputs[0].token_ids[:3]) for o in outputs)
    statistic, df = chi_square(samples, top_k_law(target_forward, prompt, 3, 3))
    assert statistic < chi_square_critical(df)
    if engine.speculator is not None:
        assert engine.spec_metrics.num_proposed - before > n // 2  # most verified drafts


# ------------------------------------------------------------------ parts
def test_find_continuation_takes_the_longest_most_recent_match():
    assert find_continuation([1, 2, 3, 9, 1, 2, 3, 7, 5, 2, 3], 2) == [7, 5]  # "2 3" last seen before 7 5
    assert find_continuation([5, 1, 2, 3, 8, 4, 2, 3], 2) == [8, 4]  # the 2-gram "2 3" beats the 1-gram "3"
    assert find_continuation([1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]  # copying runs into its own drafts
    assert find_continuation([1, 2, 3, 4], 3) == []
    assert find_continuation([4, 4], 2, min_n=1, max_n=3) == [4, 4]
    assert find_continuation([1, 2, 3, 1], 2, min_n=2) == []


def test_ngram_proposer_plans_only_matching_sequences():
    proposer = NgramProposer(1, 3)
    repeating = Sequence(0, "a", [1, 2, 3, 1, 2])
    fresh = Sequence(1, "b", [1, 2, 3, 4])
    assert proposer.plan(repeating, 4) == 4 and proposer.plan(fresh, 4) == 0
    proposals = proposer.propose([(repeating, 2)])
    assert proposals[0].tokens == [3, 1] and proposals[0].probs is None


def test_adaptive_k_follows_the_acceptance_rate():
    controller = AdaptiveK(6, draft_cost=0.1, verify_cost=0.05, initial_rate=0.9)
    high = controller.k
    for _ in range(40):
        controller.observe([(4, 0), (4, 1)])  # 1 success in 3 trials
    assert controller.rate == pytest.approx(1 / 3, abs=0.02)
    low = controller.k
    assert 1 <= low < high <= 6
    for k, rate in itertools.product(range(1, 5), (0.3, 0.8)):  # the model's mean emitted tokens
        assert expected_tokens(rate, k) == pytest.approx((1 - rate ** (k + 1)) / (1 - rate))
    assert AdaptiveK(3, adaptive=False, initial_rate=0.0).k == 3
