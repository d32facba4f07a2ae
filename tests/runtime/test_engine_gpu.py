"""The engine on CUDA (Triton kernels): same greedy tokens as transformers and as the reference kernels."""

import pytest
import torch
from test_engine import GREEDY, PROMPTS, encode, hf_greedy, run_staggered
from transformers import AutoModelForCausalLM

from quantkit.models.bundled import BUNDLED_MODELS
from quantkit.runtime.engine import Engine

pytestmark = pytest.mark.gpu


def test_dense_float32_on_cuda_matches_transformers():
    reference = AutoModelForCausalLM.from_pretrained(str(BUNDLED_MODELS["quantkit-target"]), dtype=torch.float32)
    engine = Engine(device="cuda", dtype="float32", kv_cache_tokens=4096)
    for prompt, output in zip(PROMPTS, run_staggered(engine, PROMPTS, GREEDY, [0, 1, 1, 4])):
        assert output.outputs[0].token_ids == hf_greedy(reference.eval(), encode(engine, prompt))


def test_quantized_triton_path_matches_the_reference_kernels(tmp_path, monkeypatch):
    from quantkit.compress import compress
    from quantkit.recipe import weight_quant_recipe

    out = tmp_path / "w4"
    compress(None, weight_quant_recipe("w4a16", group_size=64), out)
    tokens = {}
    for mode in ("auto", "reference"):
        monkeypatch.setenv("QUANTKIT_KERNELS", mode)
        engine = Engine(str(out), device="cuda", dtype="float32", kv_cache_tokens=4096)
        tokens[mode] = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, GREEDY)]
    assert tokens["auto"] == tokens["reference"]


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_speculation_on_cuda_keeps_greedy_output(method):
    plain = Engine(device="cuda", dtype="float32", kv_cache_tokens=4096)
    want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, GREEDY)]
    draft = "quantkit-draft" if method == "draft" else None
    spec = Engine(device="cuda", dtype="float32", kv_cache_tokens=4096, speculative_method=method, draft=draft)
    assert [o.outputs[0].token_ids for o in spec.generate(PROMPTS, GREEDY)] == want
    assert spec.spec_metrics.num_proposed > 0


def test_cuda_graph_decode_matches_eager_and_replays():
    eager = Engine(device="cuda", dtype="float32", kv_cache_tokens=4096, cuda_graphs=False)
    graphed = Engine(device="cuda", dtype="float32", kv_cache_tokens=4096, max_num_seqs=8)
    assert eager.runner.graphs is None and graphed.runner.graphs is not None
    replays = []
    original = graphed.runner.graphs.run
    graphed.runner.graphs.run = lambda *a: replays.append(len(a[0])) or original(*a)
    want = [o.outputs[0].token_ids for o in run_staggered(eager, PROMPTS, GREEDY, [0, 1, 1, 4])]
    got = [o.outputs[0].token_ids for o in run_staggered(graphed, PROMPTS, GREEDY, [0, 1, 1, 4])]
    assert got == want
    assert 3 in replays  # a padded batch (3 -> 4 rows) replayed


def test_bfloat16_engine_with_graphs_runs_the_bundled_target_sensibly():
    """bf16 graphs vs eager: the same first tokens (later ones may part at near-ties)."""
    eager = Engine(device="cuda", dtype="bfloat16", kv_cache_tokens=4096, cuda_graphs=False)
    graphed = Engine(device="cuda", dtype="bfloat16", kv_cache_tokens=4096)
    a = [o.outputs[0].token_ids[:4] for o in eager.generate(PROMPTS, GREEDY)]
    b = [o.outputs[0].token_ids[:4] for o in graphed.generate(PROMPTS, GREEDY)]
    assert a == b


def test_async_scheduling_on_cuda_matches_the_synchronous_engine():
    """CUDA graphs, pinned token copies and events: the same tokens and logprobs, steps overlapped."""
    from quantkit.runtime.sampling_params import SamplingParams

    params = [GREEDY, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, logprobs=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=5, max_tokens=12, ignore_eos=True), GREEDY]
    outputs = {}
    for async_scheduling in (False, True):
        engine = Engine(device="cuda", dtype="float32", kv_cache_tokens=4096, async_scheduling=async_scheduling)
        got = engine.generate(PROMPTS, params)
        outputs[async_scheduling] = [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in got]
        if async_scheduling:
            assert engine.async_stepper.num_overlapped_steps > 10
            assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert outputs[True] == outputs[False]
