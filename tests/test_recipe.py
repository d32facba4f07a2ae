from pathlib import Path

import pytest

from quantkit.errors import QuantkitError
from quantkit.recipe import load_recipe, recipe_from_dict, weight_quant_recipe
from quantkit.recipe_w8a8 import W8A8_METHODS

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


# distill.yaml configures `quantkit distill`, not a compression run (tests/distill loads it)
SHIPPED = sorted(path for path in RECIPES.glob("*.yaml") if path.name != "distill.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.steps and recipe.format in ("gptq", "awq", "compressed-tensors", "dense")
    if any(step.method in W8A8_METHODS for step in recipe.steps):
        return  # SmoothQuant, W8A8/FP8 and KV-cache recipes: tests/w8a8/test_w8a8_recipes.py
    assert recipe.needs_calibration == (recipe.steps[0].method not in ("rtn", "magnitude"))
    scheme = recipe.steps[0].quant_scheme()
    assert scheme.bits in (2, 3, 4, 8) if recipe.quantizes else scheme is None


def test_recipe_fields_become_a_scheme():
    recipe = load_recipe(RECIPES / "w8a16-rtn.yaml")
    scheme = recipe.steps[0].quant_scheme()
    assert (scheme.bits, scheme.group_size, scheme.symmetric, scheme.ignore) == (8, -1, True, ("lm_head",))
    assert not recipe.needs_calibration


def test_command_line_recipe_matches_options():
    recipe = weight_quant_recipe("w4a16", group_size=64, symmetric=False, ignore=("lm_head", "re:.*down_proj"))
    scheme = recipe.steps[0].quant_scheme()
    assert (scheme.bits, scheme.group_size, scheme.symmetric) == (4, 64, False)
    assert scheme.is_ignored("model.layers.3.mlp.down_proj") and not scheme.is_ignored("model.layers.3.mlp.up_proj")
    assert recipe.to_dict()["steps"][0]["ignore"] == ["lm_head", "re:.*down_proj"]


@pytest.mark.parametrize("data, message", [
    ({"steps": []}, "steps: must be a non-empty list"),
    ({"steps": [{"method": "rtn", "grop_size": 128}]}, "steps[0].grop_size: unknown field"),
    ({"steps": [{"method": "magic"}]}, "steps[0].method: must be one of rtn, gptq, awq"),
    ({"steps": [{"method": "rtn", "scheme": "w5a7"}]}, "steps[0].scheme: unknown scheme 'w5a7'"),
    ({"steps": [{"method": "rtn", "group_size": 0}]}, "steps[0].group_size: must be a positive integer"),
    ({"steps": [{"method": "rtn", "group_size": "128"}]}, "steps[0].group_size"),
    ({"steps": [{"method": "rtn", "symmetric": "yes"}]}, "steps[0].symmetric: must be true or false"),
    ({"steps": [{"method": "rtn", "ignore": "lm_head"}]}, "steps[0].ignore: must be a list"),
    ({"steps": [{"method": "rtn"}], "format": "exl2"}, "format: must be one of gptq, awq, compressed-tensors"),
    ({"steps": [{"method": "rtn"}], "calibration": {"num_samples": 0}}, "calibration.num_samples: must be an integer >= 1"),
    ({"steps": [{"method": "rtn"}], "calibration": {"datset": "x"}}, "calibration.datset: unknown field"),
    ({"steps": [{"method": "rtn"}, {"method": "rtn"}]}, "give one weight-quantization step"),
    ({"stepz": []}, "stepz: unknown field"),
    (["rtn"], "a recipe must be a mapping"),
])
def test_bad_recipes_name_the_field(data, message):
    with pytest.raises(QuantkitError) as info:
        recipe_from_dict(data)
    assert message in str(info.value)


def test_gptq_options_reach_the_algorithm_config():
    recipe = recipe_from_dict({"steps": [{"method": "gptq", "act_order": True, "damp_percent": 0.05,
                                          "true_sequential": False}]})
    config, true_sequential = recipe.steps[0].gptq_config()
    assert (config.act_order, config.damp_percent, config.block_size, true_sequential) == (True, 0.05, 128, False)
    assert recipe.to_dict()["steps"][0]["act_order"] is True


@pytest.mark.parametrize("step, message", [
    ({"method": "gptq", "damp_percent": 2.0}, "steps[0]: damp_percent must be a number between 0 and 1"),
    ({"method": "gptq", "act_order": "yes"}, "steps[0].act_order: must be true or false"),
    ({"method": "rtn", "act_order": True}, "steps[0].act_order: unknown field"),
    ({"method": "awq", "grid": 0}, "steps[0]: AWQ grid must be a positive integer"),
    ({"method": "awq", "damp_percent": 0.1}, "steps[0].damp_percent: unknown field"),
])
def test_method_options_are_validated(step, message):
    with pytest.raises(QuantkitError) as info:
        recipe_from_dict({"steps": [step]})
    assert message in str(info.value)


def test_unreadable_recipe_files(tmp_path):
    with pytest.raises(QuantkitError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [method: rtn\n  - : :\n")
    with pytest.raises(QuantkitError, match="is not valid YAML"):
        load_recipe(broken)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("steps:\n  - method: rtn\n    bits: 4\n")
    with pytest.raises(QuantkitError, match=r"wrong.yaml': steps\[0\].bits: unknown field"):
        load_recipe(wrong)


def test_recipe_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, quantkit.recipe; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
