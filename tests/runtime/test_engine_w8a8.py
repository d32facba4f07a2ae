"""The runtime on W8A8 checkpoints and on an 8-bit KV cache: greedy output equals the
transformers model quantkit loads from the same folder (whose layers and attention round exactly
as the checkpoint says), and the 8-bit cache holds half the bytes per token. (FP8 linears run the
same dispatcher as the evaluation path; tests/kernels/test_kernels_w8a8.py checks it.)"""

import pytest
import torch

from quantkit.formats.compressed_tensors_8bit import save_8bit_checkpoint
from quantkit.models.loading import load_model
from quantkit.pipeline import quantize_model
from quantkit.recipe import recipe_from_dict
from quantkit.runtime.engine import Engine
from quantkit.runtime.model_runner import plan_num_blocks
from quantkit.runtime.sampling_params import SamplingParams

PROMPTS = ["The history of the city begins in the", "In 1990, the band released their second album, which"]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# one checkpoint covers the W8A8 INT8 linears (the norm and SiLU-and-mul writing their 8-bit inputs)
# and the FP8 cache; the INT8 cache and FP8 linears run the same kernels (tests/kernels/)
CASES = {"smoothquant-w8a8-kv-fp8": [{"method": "smoothquant"}, {"method": "w8a8"}, {"method": "kv_cache"}]}


def _greedy_hf(model, ids):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY.max_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def write_checkpoint(steps, out):
    """The bundled target quantized as ``steps`` say, calibrated on random token ids (the test
    compares the runtime with the checkpoint's own model, not accuracy)."""
    recipe = recipe_from_dict({"format": "compressed-tensors", "steps": steps})
    loaded = load_model(None)
    samples = torch.randint(0, loaded.model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    result = quantize_model(loaded.model, loaded.adapter, recipe, samples=samples)
    save_8bit_checkpoint(loaded.model, loaded.tokenizer, result.quantized, recipe.weight_step, recipe.kv_cache_step,
                         out)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("w8a8-runtime")
    made = {}

    def get(name):
        if name not in made:
            made[name] = folder / name
            write_checkpoint(CASES[name], made[name])
        return made[name]

    return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_runtime_matches_the_checkpoints_model(checkpoints, name):
    out = checkpoints(name)
    reference = load_model(str(out)).model.float().eval()
    engine = Engine(str(out), kv_cache_tokens=512)
    kv = name.startswith("kv") or "kv" in name
    assert (engine.model.kv_cache_dtype is not None) == kv
    assert engine.runner.kv_cache[0][0].dtype == (engine.model.kv_cache_dtype or torch.float32)
    for output, prompt in zip(engine.generate(PROMPTS, GREEDY), PROMPTS):
        ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
        assert output.outputs[0].token_ids == _greedy_hf(reference, ids)


def test_8bit_cache_halves_bytes_per_token_and_doubles_capacity(checkpoints):
    quantized = Engine(str(checkpoints("smoothquant-w8a8-kv-fp8")), kv_cache_tokens=256, dtype="float16").model
    plain = Engine(None, kv_cache_tokens=256, dtype="float16").model
    # CPU engines compute in float32; the cache of a 16-bit model on a GPU is float16
    plain.dtype = torch.float16
    assert quantized.kv_cache_dtype == torch.float8_e4m3fn
    assert plain.kv_bytes_per_token() == 2 * quantized.kv_bytes_per_token() == 2 * 2 * 8 * 2 * 64
    budget = 1 << 20
    assert plan_num_blocks(quantized, 16, kv_cache_tokens=budget // quantized.kv_bytes_per_token(),
                           gpu_memory_utilization=0.9) == 2 * plan_num_blocks(
        plain, 16, kv_cache_tokens=budget // plain.kv_bytes_per_token(), gpu_memory_utilization=0.9)


@pytest.mark.gpu
@pytest.mark.parametrize("kv", ["float", "int"])
def test_gpu_engine_with_an_8bit_cache_keeps_greedy_output_close(tmp_path, kv):
    out = tmp_path / f"kv-{kv}"
    write_checkpoint([{"method": "kv_cache", "type": kv}], out)
    plain = Engine(None, device="cuda", dtype="float16", kv_cache_tokens=4096)
    quantized = Engine(str(out), device="cuda", dtype="float16", kv_cache_tokens=4096)
    assert quantized.runner.kv_cache[0][0].element_size() == 1
    same = 0
    for a, b in zip(plain.generate(PROMPTS, GREEDY), quantized.generate(PROMPTS, GREEDY)):
        same += sum(x == y for x, y in zip(a.outputs[0].token_ids, b.outputs[0].token_ids))
    assert same >= 0.75 * len(PROMPTS) * GREEDY.max_tokens
