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
