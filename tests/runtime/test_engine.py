"""The engine against transformers on the bundled target (float32, CPU): greedy output token for
token, whatever the batching, chunking, prefix hits, preemption or layout."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from quantkit.errors import QuantkitError
from quantkit.models.bundled import BUNDLED_MODELS
from quantkit.runtime.engine import Engine
from quantkit.runtime.sampling_params import SamplingParams

PROMPTS = [
    "The history of the city begins in the",
    "In 1990, the band released their second album, which",
    "Photosynthesis is",
    "The river flows through the valley and into the sea near the old harbour, where ships from",
]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def reference():
    model = AutoModelForCausalLM.from_pretrained(str(BUNDLED_MODELS["quantkit-target"]), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def engine():
    return Engine(kv_cache_tokens=2048)


def hf_greedy(model, ids, max_new_tokens=20):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def encode(engine, text):
    return engine.tokenizer.encode(text, add_special_tokens=False)


def run_staggered(engine, prompts, params, start_steps):
    """Submit prompt i at step start_steps[i]; run to the end; outputs by prompt."""
    ids, final, step = {}, {}, 0
    while len(final) < len(prompts):
        for i, start in enumerate(start_steps):
            if start == step:
                ids[engine.add_request(prompts[i], params)] = i
        for output in engine.step():
            if output.finished:
                final[ids[output.request_id]] = output
        step += 1
        assert step < 1000
    return [final[i] for i in range(len(prompts))]


def test_greedy_matches_transformers_with_staggered_arrivals(engine, reference):
    outputs = run_staggered(engine, PROMPTS, GREEDY, [0, 2, 3, 7])
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(reference, encode(engine, prompt))
        assert output.outputs[0].finish_reason == "length"


def test_prefix_cache_hits_give_the_same_tokens(engine, reference):
    shared = "The river flows through the valley and into the sea near the old harbour, where"
    prompts = [shared + " ships", shared + " the fishermen", shared + " in winter"]
    hits_before = engine.block_manager.prefix_cache_hits
    first = engine.generate(prompts[:1], GREEDY)
    rest = engine.generate(prompts[1:], GREEDY)
    assert engine.block_manager.prefix_cache_hits > hits_before  # the shared blocks were reused
    for prompt, output in zip(prompts, first + rest):
        assert output.outputs[0].token_ids == hf_greedy(reference, encode(engine, prompt))


def test_small_cache_preempts_and_still_matches(reference):
    small = Engine(kv_cache_tokens=96, max_num_batched_tokens=32)  # 6 blocks for 4 growing sequences
    outputs = run_staggered(small, PROMPTS, GREEDY, [0, 0, 1, 1])
    assert small.scheduler.num_preemptions > 0
    for prompt, output in zip(PROMPTS, outputs):
        assert output.outputs[0].token_ids == hf_greedy(reference, encode(small, prompt))
    assert small.block_manager.num_free_blocks == small.block_manager.num_blocks


def test_seeded_sampling_is_reproducible_and_parallel_samples_differ(engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=12, n=3, ignore_eos=True, logprobs=True)
    first = engine.generate([PROMPTS[0]], params)[0]
    second = engine.generate([PROMPTS[0]], params)[0]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in second.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1
    assert all(len(c.logprobs) == 12 and all(lp <= 0 for lp in c.logprobs) for c in first.outputs)


def test_stop_strings_cut_the_text(engine, reference):
    ids = encode(engine, PROMPTS[1])
    full_text = engine.tokenizer.decode(hf_greedy(reference, ids))
    stop = full_text[10:14]
    output = engine.generate([PROMPTS[1]], SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0]
    completion = output.outputs[0]
    assert completion.finish_reason == "stop"
    assert completion.text == full_text[: full_text.find(stop)]


def test_bad_requests_are_refused(engine):
    with pytest.raises(QuantkitError, match="longer than"):
        engine.add_request(list(range(5000)), GREEDY)
    with pytest.raises(QuantkitError, match="temperature"):
        engine.add_request("hello", SamplingParams(temperature=-1))
    with pytest.raises(QuantkitError, match="empty"):
        engine.add_request([], GREEDY)


@pytest.mark.parametrize(("layout", "method", "options"), [
    ("gptq", "gptq", {"act_order": True}),  # act-order: the runtime reorders the packed columns
    ("awq", "rtn", {}),
    ("compressed-tensors", "rtn", {}),
])
def test_quantized_checkpoints_match_their_transformers_model(tmp_path, layout, method, options):
    from quantkit.compress import compress
    from quantkit.models.loading import load_model
    from quantkit.recipe import weight_quant_recipe

    recipe = weight_quant_recipe("w4a16", group_size=64, method=method, symmetric=layout != "awq",
                                 options=options, fmt=layout,
                                 calibration={"dataset": "wikipedia", "num_samples": 8, "seq_len": 128, "seed": 0})
    out = tmp_path / layout
    compress(None, recipe, out)
    reference = load_model(str(out)).model.float().eval()
    engine = Engine(str(out), kv_cache_tokens=1024)
    assert any(layer.quantized for layer in engine.model.layers[0].qkv)
    for output, prompt in zip(engine.generate(PROMPTS[:2], GREEDY), PROMPTS[:2]):
        assert output.outputs[0].token_ids == hf_greedy(reference, encode(engine, prompt))
