"""Asynchronous scheduling (a decode step launched before the previous step's tokens reach the host)
gives exactly the synchronous engine's outputs, on the bundled target in float32 on the CPU: greedy
(and transformers' generate), stop strings, stop ids, max_tokens, seeded sampling with logprobs,
prefix-cache hits, arrivals and aborts mid-run; and no KV block leaks."""

import pytest
from test_engine import PROMPTS, encode, hf_greedy, reference, run_staggered  # noqa: F401

from quantkit.runtime.engine import Engine
from quantkit.runtime.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def sync_engine():
    return Engine(kv_cache_tokens=2048)


@pytest.fixture(scope="module")
def sync_greedy(sync_engine):
    return run_mixed(sync_engine, PROMPTS, [GREEDY] * 4, [0, 0, 0, 0])


@pytest.fixture(scope="module")
def async_engine():
    return Engine(kv_cache_tokens=2048, async_scheduling=True)


def run_mixed(engine, prompts, params, start_steps):
    """Like run_staggered with one SamplingParams per prompt; completions by prompt."""
    ids, final, step = {}, {}, 0
    while len(final) < len(prompts):
        for i, start in enumerate(start_steps):
            if start == step:
                ids[engine.add_request(prompts[i], params[i])] = i
        for output in engine.step():
            if output.finished:
                final[ids[output.request_id]] = output
        step += 1
        assert step < 1000
    return [final[i].outputs[0] for i in range(len(prompts))]


def assert_no_leaks(engine):
    manager = engine.block_manager
    assert not engine.has_unfinished()
    assert manager.num_free_blocks == manager.num_blocks
    assert all(manager.ref_count(b) == 0 for b in range(manager.num_blocks))


def summary(completion, approx=False):
    # logprobs to rounding: a row discarded after its sequence ended changes the batch's shape
    logprobs = completion.logprobs
    if approx and logprobs is not None:
        logprobs = pytest.approx(logprobs, abs=1e-4)
    return completion.token_ids, completion.text, completion.finish_reason, logprobs


def test_greedy_staggered_matches_transformers_and_overlaps(async_engine, sync_greedy, reference):  # noqa: F811
    before = async_engine.async_stepper.num_overlapped_steps
    outputs = run_staggered(async_engine, PROMPTS, GREEDY, [0, 2, 3, 5])
    assert [o.outputs[0].token_ids for o in outputs] == [c.token_ids for c in sync_greedy]
    for prompt, output in zip(PROMPTS[:2], outputs):
        assert output.outputs[0].token_ids == hf_greedy(reference, encode(async_engine, prompt), GREEDY.max_tokens)
    assert async_engine.async_stepper.num_overlapped_steps - before > 5  # the async path ran
    assert_no_leaks(async_engine)


def test_stops_limits_and_seeds_match_the_synchronous_engine(sync_engine, async_engine, sync_greedy):
    full = sync_greedy
    params = [
        SamplingParams(temperature=0, max_tokens=8, stop=[full[1].text[10:14]]),  # ends on a stop string
        SamplingParams(temperature=0, max_tokens=8, stop=[full[0].text[8:12]], logprobs=True),
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, stop_token_ids=[full[2].token_ids[4]]),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=True),  # ends on max_tokens
        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=7, ignore_eos=True, logprobs=True),
        SamplingParams(temperature=1.0, top_k=20, min_p=0.05, seed=11, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=1),
    ]
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3], PROMPTS[0], PROMPTS[2], PROMPTS[1]]
    starts = [0, 1, 1, 2, 3, 3, 6]
    expected = run_mixed(sync_engine, prompts, params, starts)
    got = run_mixed(async_engine, prompts, params, starts)
    assert [summary(c) for c in got] == [summary(c, approx=True) for c in expected]
    assert [c.finish_reason for c in expected[:4]] == ["stop", "stop", "stop", "length"]
    assert len(expected[2].token_ids) == 5
    assert_no_leaks(async_engine)


def test_prefix_cache_hits_and_aborts(sync_engine, async_engine):
    shared = "The river flows through the valley and into the sea near the old harbour, where"
    prompts = [shared + " ships", shared + " the fishermen", shared + " in winter"]
    expected = [o.outputs[0].token_ids for o in sync_engine.generate(prompts, GREEDY)]
    hits = async_engine.block_manager.prefix_cache_hits
    first = async_engine.generate(prompts[:1], GREEDY)
    rest = async_engine.generate(prompts[1:], GREEDY)
    assert async_engine.block_manager.prefix_cache_hits > hits
    assert [o.outputs[0].token_ids for o in first + rest] == expected
    # aborts while a step is in flight: the others are unaffected and nothing leaks
    ids = [async_engine.add_request(p, GREEDY) for p in prompts]
    for _ in range(5):
        async_engine.step()
    assert async_engine.async_stepper._inflight is not None
    async_engine.abort(ids[0])
    final = {}
    while async_engine.has_unfinished():
        for output in async_engine.step():
            final[output.request_id] = output
    assert [final[i].outputs[0].token_ids for i in ids[1:]] == expected[1:]
    async_engine.abort(ids[1])  # all done: a no-op
    assert_no_leaks(async_engine)
    async_engine.add_request(prompts[0], GREEDY, request_id="again")
    for _ in range(4):
        async_engine.step()
    assert async_engine.async_stepper._inflight is not None
    async_engine.abort("again")  # everything in flight aborted: the next step starts afresh
    assert async_engine.generate(prompts[:1], GREEDY)[0].outputs[0].token_ids == expected[0]
    assert_no_leaks(async_engine)


def test_static_decode_buffers_take_the_device_tokens(sync_engine):
    """The decode-graph path (run eagerly on the CPU): input ids copied from the sampled tensor."""
    engine = Engine(kv_cache_tokens=2048, async_scheduling=True, cuda_graphs="eager-static", max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in run_staggered(sync_engine, PROMPTS[:3], params, [0, 1, 3])]
    got = [o.outputs[0].token_ids for o in run_staggered(engine, PROMPTS[:3], params, [0, 1, 3])]
    assert got == expected
    assert engine.async_stepper.num_overlapped_steps > 3
    assert_no_leaks(engine)


def test_small_cache_preempts_and_still_matches(sync_greedy):
    """Blocks run short: the asynchronous engine stops launching ahead and the scheduler preempts."""
    small = Engine(kv_cache_tokens=48, max_num_batched_tokens=32, async_scheduling=True)  # 3 blocks
    outputs = run_mixed(small, PROMPTS, [GREEDY] * 4, [0, 0, 1, 1])
    assert small.scheduler.num_preemptions > 0 and small.async_stepper.num_overlapped_steps > 0
    assert [c.token_ids for c in outputs] == [c.token_ids for c in sync_greedy]
    assert_no_leaks(small)
