"""Recipes for SmoothQuant, W8A8/FP8 and the KV cache: the shipped files, composition, clear errors."""

from pathlib import Path

import pytest

from quantkit.errors import QuantkitError
from quantkit.recipe import load_recipe, recipe_from_dict
from quantkit.recipe_w8a8 import EightBitStep, KVCacheStep, SmoothQuantStep

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SHIPPED = {
    "w8a8-smoothquant.yaml": ("smoothquant α=0.5 + w8a8-int8-channel-dynamic", True),
    "w8a8-int8.yaml": ("w8a8-int8-channel-dynamic", False),
    "fp8-dynamic.yaml": ("w8a8-fp8-channel-dynamic", False),
    "fp8-static.yaml": ("w8a8-fp8-tensor-static", True),
    "w8a16-fp8.yaml": ("w8a16-fp8-channel", False),
    "kv-fp8.yaml": ("kv-fp8-attn_head", True),
    "kv-int8.yaml": ("kv-int8-attn_head", True),
    "w8a8-smoothquant-kv-fp8.yaml": ("smoothquant α=0.5 + w8a8-int8-channel-dynamic + kv-fp8-attn_head", True),
    "w4a16-gptq-kv-int8.yaml": ("gptq w4a16-g128-sym + kv-int8-attn_head", True),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_recipes(name):
    recipe = load_recipe(RECIPES / name)
    summary, calibrated = SHIPPED[name]
    assert recipe.summary == summary and recipe.needs_calibration == calibrated
    assert recipe.format == "compressed-tensors"
    assert recipe_from_dict(recipe.to_dict()) == recipe  # to_dict round-trips


def test_fp8_dynamic_needs_no_data_and_composition_finds_the_steps():
    assert not load_recipe(RECIPES / "fp8-dynamic.yaml").needs_calibration
    recipe = load_recipe(RECIPES / "w8a8-smoothquant-kv-fp8.yaml")
    assert isinstance(recipe.steps[0], SmoothQuantStep) and isinstance(recipe.weight_step, EightBitStep)
    assert isinstance(recipe.kv_cache_step, KVCacheStep) and recipe.kv_cache_step.type == "float"
    gptq = load_recipe(RECIPES / "w4a16-gptq-kv-int8.yaml")
    assert gptq.weight_step.method == "gptq" and gptq.kv_cache_step.type == "int"


CT = {"format": "compressed-tensors"}


@pytest.mark.parametrize("data, message", [
    ({**CT, "steps": [{"method": "smoothquant"}]}, "steps[0]: smoothquant must be followed by a w8a8 step"),
    ({**CT, "steps": [{"method": "smoothquant"}, {"method": "w8a8", "type": "float", "activations": "none"}]},
     "steps[0]: smoothquant must be followed"),
    ({**CT, "steps": [{"method": "smoothquant"}, {"method": "rtn", "scheme": "w8a16"}]}, "followed by a w8a8 step"),
    ({**CT, "steps": [{"method": "kv_cache"}, {"method": "w8a8"}]}, "steps[0]: the kv_cache step must be the last"),
    ({**CT, "steps": [{"method": "w8a8"}, {"method": "rtn"}]}, "give one weight-quantization step"),
    ({"steps": [{"method": "w8a8"}]}, "format: w8a8 checkpoints are written in the compressed-tensors layout"),
    ({"format": "gptq", "steps": [{"method": "gptq"}, {"method": "kv_cache"}]}, "format: kv_cache checkpoints"),
    ({**CT, "steps": [{"method": "w8a8", "type": "int", "activations": "none"}]}, "steps[0].activations: 'none'"),
    ({**CT, "steps": [{"method": "w8a8", "type": "fp4"}]}, "steps[0].type: must be one of int, float"),
    ({**CT, "steps": [{"method": "w8a8", "weight_strategy": "group"}]}, "steps[0].weight_strategy: must be one of"),
    ({**CT, "steps": [{"method": "w8a8", "activations": "token"}]}, "steps[0].activations: must be one of"),
    ({**CT, "steps": [{"method": "w8a8", "group_size": 128}]}, "steps[0].group_size: unknown field"),
    ({**CT, "steps": [{"method": "w8a8", "ignore": "lm_head"}]}, "steps[0].ignore: must be a list"),
    ({**CT, "steps": [{"method": "w8a8", "ignore": ["re:("]}]}, "steps[0].ignore: ignore pattern"),
    ({**CT, "steps": [{"method": "smoothquant", "alpha": 1.5}, {"method": "w8a8"}]}, "steps[0].alpha: must be between"),
    ({**CT, "steps": [{"method": "smoothquant", "alpha": "half"}, {"method": "w8a8"}]}, "steps[0].alpha: must be a number"),
    ({**CT, "steps": [{"method": "smoothquant", "alpha_search": 1}, {"method": "w8a8"}]},
     "steps[0].alpha_search: must be true or false"),
    ({**CT, "steps": [{"method": "smoothquant", "alpha_grid": 0}, {"method": "w8a8"}]}, "steps[0].alpha_grid"),
    ({**CT, "steps": [{"method": "kv_cache", "strategy": "channel"}]}, "steps[0].strategy: must be one of attn_head"),
    ({**CT, "steps": [{"method": "kv_cache", "num_bits": 4}]}, "steps[0].num_bits: unknown field"),
])
def test_bad_recipes_name_the_field(data, message):
    with pytest.raises(QuantkitError) as error:
        recipe_from_dict(data)
    assert message in str(error.value)


def test_cli_quantize_with_a_w8a8_recipe(run_cli, tmp_path):
    result = run_cli("quantize", "-o", tmp_path / "out", "--recipe", RECIPES / "w8a8-int8.yaml")
    assert result.code == 0, result.stderr
    assert "w8a8-int8-channel-dynamic" in result.stdout and "compressed-tensors" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - method: smoothquant\n")
    result = run_cli("quantize", "-o", tmp_path / "out2", "--recipe", bad)
    assert result.code == 2 and "smoothquant must be followed" in result.stderr
