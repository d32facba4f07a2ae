"""Pruned checkpoints end to end: the CLI runs a pruning recipe, the folder is dense with zeros and
records its pattern, transformers and quantkit load it; SparseGPT + 4-bit GPTQ keeps the pattern."""

import json

import pytest
import torch
from quant_helpers import assert_logits_match, tiny_llama, tiny_tokenizer
from transformers import AutoModelForCausalLM

from quantkit.models.loading import load_model
from quantkit.quant.weights import weight_out_in
from quantkit.sparsity.checkpoint import read_sparsity_config
from quantkit.sparsity.magnitude import magnitude_keep_mask
from quantkit.sparsity.masks import follows_nm
from quantkit.sparsity.structure import MaskStructure

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def test_cli_prunes_the_bundled_target_with_a_recipe(tmp_path, run_cli):
    recipe = tmp_path / "magnitude-2of4.yaml"
    recipe.write_text('name: m\nformat: dense\nsteps:\n  - method: magnitude\n    mask_structure: "2:4"\n')
    out = tmp_path / "pruned"
    done = run_cli("quantize", "--recipe", recipe, "-o", out, "--json")
    assert done.code == 0, done.stderr
    summary = json.loads(done.stdout)["sparsity"]
    assert summary["follows_structure"] and summary["targets_sparsity"] == 0.5 and summary["ignored"] == ["lm_head"]
    assert len(summary["linears"]) == 56

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float16"
    entry = config["sparsity_config"]
    assert entry["format"] == "dense" and entry["sparsity_structure"] == "2:4" and entry["targets"] == ["Linear"]
    assert entry["ignore"] == ["lm_head"] and 0.3 < entry["global_sparsity"] < 0.5
    assert read_sparsity_config(out) == entry

    pruned, original = load_model(str(out)).model, load_model("quantkit-target").model
    for index, layer in enumerate(pruned.model.layers):
        for name in LINEARS:
            weight = weight_out_in(layer.get_submodule(name))
            source = weight_out_in(original.model.layers[index].get_submodule(name))
            # exactly magnitude pruning of the bundled (float16) weights, stored without change
            torch.testing.assert_close(weight, source * magnitude_keep_mask(source, MaskStructure(2, 4), 0.5), rtol=0,
                                       atol=0)
            assert follows_nm(weight, 2, 4)
    plain = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # no quantizer, no extra package
    assert plain.config.sparsity_config["sparsity_structure"] == "2:4"
    ids = torch.randint(0, 8192, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, pruned(ids).logits)


@pytest.mark.parametrize("text, message", [
    ("steps:\n  - method: wanda\nformat: gptq\n", "use format: dense"),
    ("steps:\n  - method: sparsegpt\n    mask_structure: 2:4\n", "YAML reads an unquoted 2:4"),
    ("steps:\n  - method: wanda\n    scheme: w4a16\n", "only sparsegpt quantizes the survivors"),
])
def test_bad_pruning_recipes_exit_with_one_line(tmp_path, run_cli, text, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    done = run_cli("quantize", "--recipe", recipe, "-o", tmp_path / "out")
    assert done.code == 2 and message in " ".join(done.stderr.split()) and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_sparsegpt_with_gptq_writes_a_quantized_2of4_checkpoint(tmp_path):
    from quantkit.compress import compress
    from quantkit.recipe import recipe_from_dict

    source = tmp_path / "tiny"
    model = tiny_llama(intermediate=256)
    model.save_pretrained(source)
    tiny_tokenizer().save_pretrained(source)
    text = tmp_path / "calibration.txt"
    generator = torch.Generator().manual_seed(0)
    words = (torch.randint(0, 40, (6000,), generator=generator) * 5 + torch.arange(6000) % 5) % 255
    text.write_text(" ".join(f"t{i}" for i in words.tolist()))
    recipe = recipe_from_dict({
        "format": "gptq", "calibration": {"dataset": str(text), "num_samples": 16, "seq_len": 64},
        "steps": [{"method": "sparsegpt", "mask_structure": "2:4", "scheme": "w4a16", "group_size": 32}],
    })
    result = compress(str(source), recipe, tmp_path / "out")
    assert result.sparsity.follows_structure and len(result.pipeline.quantized) == 14
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and config["quantization_config"]["bits"] == 4
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert config["quantization_config"]["meta"]["quantkit"]["method"] == "sparsegpt"
    loaded = load_model(str(tmp_path / "out")).model
    for index, layer in enumerate(loaded.model.layers):
        for name in LINEARS:
            assert follows_nm(weight_out_in(layer.get_submodule(name)), 2, 4), (index, name)
    ids = torch.randint(0, 255, (2, 16), generator=generator)
    assert_logits_match(loaded, tiny_llama(intermediate=256), result.pipeline.quantized, ids)


def test_read_sparsity_config_finds_the_llm_compressor_form():
    nested = {"quantization_config": {"quant_method": "compressed-tensors",
                                      "sparsity_config": {"format": "dense", "sparsity_structure": "2:4"}}}
    assert read_sparsity_config(nested)["sparsity_structure"] == "2:4"
    assert read_sparsity_config({"quantization_config": {"sparsity_config": {}}}) is None
    assert read_sparsity_config({}) is None
