"""W8A8 INT8 / FP8 / W8A16-FP8 and KV-cache checkpoints: the tensors vLLM reads, the config
compressed-tensors validates, quantkit's load-back, the library's own decompression, errors."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_pipeline import calibration, tiny_llama

from quantkit.errors import QuantkitError
from quantkit.formats.compressed_tensors_8bit import save_8bit_checkpoint
from quantkit.models.adapters import get_adapter
from quantkit.models.loading import load_model
from quantkit.pipeline import quantize_model
from quantkit.quant.w8a8 import FP8_DTYPE
from quantkit.quant.w8a8_linear import W8A8Linear
from quantkit.recipe import recipe_from_dict

SCHEMES = [("int", "channel", "dynamic"), ("int", "tensor", "static"), ("float", "channel", "dynamic"),
           ("float", "tensor", "static"), ("float", "channel", "none")]
IDS = ["-".join(s) for s in SCHEMES]


def _recipe(kind, strategy, activations, kv=None):
    steps = [{"method": "w8a8", "type": kind, "weight_strategy": strategy, "activations": activations}]
    if kv is not None:
        steps.append({"method": "kv_cache", "type": kv})
    return recipe_from_dict({"format": "compressed-tensors", "steps": steps})


def _quantize(kind, strategy, activations, kv=None, seed=0):
    model = tiny_llama(seed=seed)
    recipe = _recipe(kind, strategy, activations, kv)
    samples = calibration(8, 32) if recipe.needs_calibration else None
    result = quantize_model(model, get_adapter(model), recipe, samples=samples, batch_size=4)
    return model, recipe, result


def _reference(model, quantized):
    """What the folder represents: float16-rounded float tensors, 8-bit layers as W8A8Linear."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.half().float())
    for name, record in quantized.items():
        parent, _, child = name.rpartition(".")
        setattr(reference.get_submodule(parent), child, W8A8Linear.from_quantized(record, None, torch.float32))
    return reference


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_checkpoint_holds_what_vllm_reads_and_loads_back(tmp_path, scheme):
    kind, strategy, activations = scheme
    model, recipe, result = _quantize(*scheme)
    assert len(result.quantized) == 14  # 7 linears in each of 2 layers; lm_head ignored
    out = save_8bit_checkpoint(model, None, result.quantized, recipe.weight_step, None, tmp_path / "ckpt")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == ("int-quantized" if kind == "int" else "float-quantized")
    group = qcfg["config_groups"]["group_0"]
    assert group["weights"]["strategy"] == strategy and group["weights"]["type"] == kind
    if activations == "none":
        assert group["input_activations"] is None
    else:
        assert group["input_activations"]["strategy"] == ("token" if activations == "dynamic" else "tensor")
        assert group["input_activations"]["dynamic"] is (activations == "dynamic")
    assert qcfg["ignore"] == ["lm_head"] and qcfg["kv_cache_scheme"] is None
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.1.self_attn.k_proj"
    assert tensors[f"{name}.weight"].dtype == (torch.int8 if kind == "int" else FP8_DTYPE)
    assert tensors[f"{name}.weight"].shape == (64, 128)
    assert tensors[f"{name}.weight_scale"].dtype == torch.float32
    assert tensors[f"{name}.weight_scale"].shape == ((64, 1) if strategy == "channel" else (1,))
    assert (f"{name}.input_scale" in tensors) == (activations == "static")
    assert tensors["lm_head.weight"].dtype == torch.float16

    loaded = load_model(str(out))
    assert isinstance(loaded.model.get_submodule(name), W8A8Linear)
    ids = calibration(2, 24, seed=3)
    with torch.no_grad():
        got = loaded.model(ids).logits
        want = _reference(model, result.quantized)(ids).logits
        float_logits = tiny_llama(seed=0)(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert float((got - float_logits).norm() / float_logits.norm()) < 0.1


@pytest.mark.parametrize("scheme", SCHEMES, ids=IDS)
def test_compressed_tensors_validates_and_decompresses(tmp_path, scheme):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model, recipe, result = _quantize(*scheme, kv="float" if scheme[2] == "static" else None)
    out = save_8bit_checkpoint(model, None, result.quantized, recipe.weight_step, recipe.kv_cache_step,
                               tmp_path / "ckpt")
    parsed = QuantizationConfig.model_validate(json.loads((out / "config.json").read_text())["quantization_config"])
    compressor = BaseCompressor.get_value_from_registry(parsed.format)
    tensors = load_file(out / "model.safetensors")
    for name, record in result.quantized.items():
        state = {key.removeprefix(f"{name}."): value for key, value in tensors.items() if key.startswith(f"{name}.")}
        weight = compressor.decompress(state, parsed.config_groups["group_0"])["weight"]
        torch.testing.assert_close(weight.float(), record.dequantize(), rtol=0, atol=0)


def test_kv_cache_scales_are_stored_per_head_and_required(tmp_path):
    model, recipe, result = _quantize("int", "channel", "dynamic", kv="float")
    out = save_8bit_checkpoint(model, None, result.quantized, recipe.weight_step, recipe.kv_cache_step,
                               tmp_path / "ckpt")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["kv_cache_scheme"]["strategy"] == "attn_head" and qcfg["kv_cache_scheme"]["type"] == "float"
    tensors = load_file(out / "model.safetensors")
    k_scale = tensors["model.layers.0.self_attn.k_scale"]
    assert k_scale.shape == (2, 1, 1) and k_scale.dtype == torch.float16 and bool((k_scale > 0).all())
    assert not bool((k_scale == 1).any())
    loaded = load_model(str(out)).model
    attention = loaded.model.layers[0].self_attn
    assert attention.kv_cache_type == "float" and torch.equal(attention.k_scale, k_scale.float())
    assert loaded.config._attn_implementation == "quantkit_kv"

    missing = dict(tensors)
    del missing["model.layers.1.self_attn.v_scale"]
    save_file(missing, str(out / "model.safetensors"))
    with pytest.raises(QuantkitError, match="lacks model.layers.1.self_attn.k_scale/v_scale"):
        load_model(str(out))
    wrong = dict(tensors)
    wrong["model.layers.1.self_attn.v_scale"] = torch.ones(3, dtype=torch.float16)
    save_file(wrong, str(out / "model.safetensors"))
    with pytest.raises(QuantkitError, match="v_scale .* has shape"):
        load_model(str(out))


def _edit_config(out, edit):
    config = json.loads((out / "config.json").read_text())
    edit(config["quantization_config"])
    (out / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda q: q["config_groups"]["group_0"].update(input_activations=None), "int-quantized weights need"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(strategy="group"), "dynamic per token"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(num_bits=4), "cannot read as 8-bit"),
    (lambda q: q.update(kv_cache_scheme={"num_bits": 4, "type": "int", "strategy": "tensor", "symmetric": True}),
     "kv_cache_scheme .* is not one quantkit runs"),
    (lambda q: q.update(config_groups={"group_0": {"targets": ["re:.*q_proj"], **q["config_groups"]["group_0"]}
                                       | {"targets": ["re:.*q_proj"]}}), "no config group targets it"),
])
def test_unreadable_8bit_configs_are_reported(tmp_path, edit, message):
    model, recipe, result = _quantize("int", "channel", "dynamic")
    out = save_8bit_checkpoint(model, None, result.quantized, recipe.weight_step, None, tmp_path / "ckpt")
    _edit_config(out, edit)
    with pytest.raises(QuantkitError, match=message):
        load_model(str(out))


def test_stray_kv_scales_without_a_scheme_are_refused(tmp_path):
    model, recipe, result = _quantize("int", "channel", "dynamic", kv="int")
    out = save_8bit_checkpoint(model, None, result.quantized, recipe.weight_step, recipe.kv_cache_step,
                               tmp_path / "ckpt")
    _edit_config(out, lambda q: q.update(kv_cache_scheme=None))
    with pytest.raises(QuantkitError, match="no kv_cache_scheme"):
        load_model(str(out))


def test_writer_refuses_a_kv_scheme_without_calibrated_scales(tmp_path):
    model, recipe, result = _quantize("int", "channel", "dynamic")
    kv_recipe = _recipe("int", "channel", "dynamic", kv="float")
    with pytest.raises(QuantkitError, match="without calibrated KV scales"):
        save_8bit_checkpoint(model, None, result.quantized, recipe.weight_step, kv_recipe.kv_cache_step,
                             tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_transformers_runs_the_w8a8_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model, recipe, result = _quantize("int", "channel", "dynamic")
    out = save_8bit_checkpoint(model, None, result.quantized, recipe.weight_step, None, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = calibration(2, 24, seed=4)
    with torch.no_grad():
        theirs = loaded(ids).logits
        ours = load_model(str(out)).model(ids).logits
    # compressed-tensors rounds activations with its own per-token scale (max / 127.5): close, not equal
    assert float((theirs - ours).norm() / ours.norm()) < 0.02
