"""GPTQ checkpoints: the written tensors decoded by an independent reader, config fields, load-back."""

import importlib.util
import json
import re

import pytest
import torch
from quant_helpers import (
    assert_logits_match,
    quantize_linears,
    tiny_llama,
    tiny_tokenizer,
    write_config,
)
from safetensors.torch import load_file, save_file
from torch import nn

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats import load_quantized_model
from quantkit.formats.gptq import load_gptq_model, save_gptq
from quantkit.quant.linear import QuantLinear
from quantkit.quant.scheme import QuantScheme

BLOCK_LINEARS = [
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
]  # fmt: skip


def _unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Independent GPTQ unpacking along dim 0 with plain shifts on int64 (AutoGPTQ's layout)."""
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    if bits in (2, 4, 8):
        per_word = 32 // bits
        parts = [(unsigned >> (bits * k)) & ((1 << bits) - 1) for k in range(per_word)]
        return torch.stack(parts, dim=1).reshape(-1, words.shape[1])
    rows = []
    for block in range(words.shape[0] // 3):
        w0, w1, w2 = (
            unsigned[3 * block],
            unsigned[3 * block + 1],
            unsigned[3 * block + 2],
        )
        rows += [(w0 >> (3 * j)) & 7 for j in range(10)]
        rows.append(((w0 >> 30) & 3) | ((w1 & 1) << 2))
        rows += [(w1 >> (3 * j + 1)) & 7 for j in range(10)]
        rows.append(((w1 >> 31) & 1) | ((w2 & 3) << 1))
        rows += [(w2 >> (3 * j + 2)) & 7 for j in range(10)]
    return torch.stack(rows)


def _decode_layer(tensors: dict, name: str, bits: int) -> torch.Tensor:
    q = _unpack_words(tensors[f"{name}.qweight"], bits)  # (in, out)
    zeros = _unpack_words(tensors[f"{name}.qzeros"].t(), bits).t() + 1  # (groups, out)
    g_idx = tensors[f"{name}.g_idx"].long()
    weight_in_out = (
        tensors[f"{name}.scales"].float()[g_idx] * (q - zeros[g_idx]).float()
    )
    return weight_in_out.t()


CASES = [
    QuantScheme(bits=4, group_size=32, symmetric=True),
    QuantScheme(bits=4, group_size=32, symmetric=False),
    QuantScheme(bits=8, group_size=-1, symmetric=True),
    QuantScheme(bits=2, group_size=32, symmetric=False),
    QuantScheme(bits=3, group_size=64, symmetric=False),
]


@pytest.mark.parametrize("scheme", CASES, ids=[s.name for s in CASES])
def test_written_checkpoint_decodes_and_loads_back(tmp_path, scheme):
    model = tiny_llama()
    quantized = quantize_linears(model, scheme)
    out = save_gptq(
        model,
        tiny_tokenizer(),
        quantized,
        scheme,
        tmp_path / "ckpt",
        algorithm_config={"method": "rtn"},
    )

    tensors = load_file(out / "model.safetensors")
    assert len(quantized) == 2 * len(BLOCK_LINEARS)
    for name, qw in quantized.items():
        assert f"{name}.weight" not in tensors
        assert tensors[f"{name}.scales"].dtype == torch.float16
        assert tensors[f"{name}.qweight"].dtype == torch.int32
        assert torch.equal(_decode_layer(tensors, name, scheme.bits), qw.dequantize())
    assert tensors["lm_head.weight"].dtype == torch.float16
    assert tensors["model.norm.weight"].dtype == torch.float16

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    qcfg = config["quantization_config"]
    assert {k: qcfg[k] for k in ("quant_method", "bits", "group_size", "sym", "checkpoint_format")} == {
        "quant_method": "gptq", "bits": scheme.bits, "group_size": scheme.group_size,
        "sym": scheme.symmetric, "checkpoint_format": "gptq",
    }  # fmt: skip
    assert (qcfg["desc_act"], qcfg["lm_head"], qcfg["static_groups"], qcfg["true_sequential"]) == (
        False, False, False, True,
    )  # fmt: skip
    assert 0 < qcfg["damp_percent"] < 1
    assert qcfg["quantizer"] == [f"quantkit:{__version__}"]
    assert qcfg["modules_in_block_to_quantize"] == [BLOCK_LINEARS]
    assert "dynamic" not in qcfg
    assert json.loads((out / "quantize_config.json").read_text()) == qcfg
    assert (out / "generation_config.json").is_file() and (
        out / "tokenizer.json"
    ).is_file()

    loaded = load_gptq_model(out)
    for name in quantized:
        assert isinstance(loaded.get_submodule(name), QuantLinear)
    assert type(loaded.lm_head) is nn.Linear
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    assert_logits_match(loaded, model, quantized, ids)


def test_tied_embeddings_are_stored_once_and_tied_on_load(tmp_path):
    model = tiny_llama(seed=1, tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    scheme = QuantScheme(bits=4, group_size=64)
    quantized = quantize_linears(model, scheme)
    out = save_gptq(model, None, quantized, scheme, tmp_path / "ckpt")
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    loaded = load_quantized_model(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.arange(10).reshape(1, 10)
    assert_logits_match(loaded, model, quantized, ids)


def test_quantized_lm_head_is_flagged_and_untied(tmp_path):
    model = tiny_llama(seed=2, tie=True)
    scheme = QuantScheme(bits=8, group_size=128, ignore=())
    quantized = quantize_linears(model, scheme)
    assert "lm_head" in quantized
    out = save_gptq(model, None, quantized, scheme, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["lm_head"] is True
    assert config["tie_word_embeddings"] is False
    loaded = load_gptq_model(out)
    assert isinstance(loaded.lm_head, QuantLinear)
    ids = torch.arange(8).reshape(1, 8)
    assert_logits_match(loaded, model, quantized, ids)


def test_layers_left_out_of_some_blocks_get_dynamic_rules(tmp_path):
    model = tiny_llama(seed=3)
    scheme = QuantScheme(
        bits=4,
        group_size=32,
        ignore=("lm_head", "re:model\\.layers\\.0\\.mlp\\.down_proj"),
    )
    quantized = quantize_linears(model, scheme)
    out = save_gptq(model, None, quantized, scheme, tmp_path / "ckpt")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["modules_in_block_to_quantize"] == [BLOCK_LINEARS]
    assert qcfg["dynamic"] == {
        "-:" + re.escape("model.layers.0.mlp.down_proj") + "$": {}
    }
    for pattern in qcfg["dynamic"]:
        assert re.match(pattern[2:], "model.layers.0.mlp.down_proj")
        assert not re.match(pattern[2:], "model.layers.1.mlp.down_proj")
    loaded = load_gptq_model(out)
    assert type(loaded.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(loaded.model.layers[1].mlp.down_proj, QuantLinear)


def test_sharded_checkpoints_are_read(tmp_path):
    model = tiny_llama(seed=4)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    quantized = quantize_linears(model, scheme)
    out = save_gptq(model, None, quantized, scheme, tmp_path / "ckpt")
    tensors = load_file(out / "model.safetensors")
    names = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for filename, keys in halves.items():
        save_file(
            {k: tensors[k] for k in keys},
            str(out / filename),
            metadata={"format": "pt"},
        )
    weight_map = {k: filename for filename, keys in halves.items() for k in keys}
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (out / "model.safetensors").unlink()
    ids = torch.arange(16).reshape(2, 8)
    assert_logits_match(load_gptq_model(out), model, quantized, ids)


def test_missing_g_idx_defaults_and_broken_tensors_are_reported(tmp_path):
    model = tiny_llama(seed=9)
    scheme = QuantScheme(bits=4, group_size=64)
    quantized = quantize_linears(model, scheme)
    out = save_gptq(model, None, quantized, scheme, tmp_path / "ckpt")
    tensors = load_file(out / "model.safetensors")
    without_g_idx = {k: v for k, v in tensors.items() if not k.endswith(".g_idx")}
    save_file(without_g_idx, str(out / "model.safetensors"))
    ids = torch.arange(8).reshape(1, 8)
    assert_logits_match(load_gptq_model(out), model, quantized, ids)
    broken = dict(without_g_idx)
    broken["model.layers.0.mlp.up_proj.scales"] = torch.zeros(
        3, 256, dtype=torch.float16
    )
    save_file(broken, str(out / "model.safetensors"))
    with pytest.raises(
        QuantkitError, match="'model.layers.0.mlp.up_proj' are missing or mis-shaped"
    ):
        load_gptq_model(out)
    del broken["model.layers.0.mlp.up_proj.scales"]
    save_file(broken, str(out / "model.safetensors"))
    with pytest.raises(
        QuantkitError, match="'model.layers.0.mlp.up_proj' are missing or mis-shaped"
    ):
        load_gptq_model(out)


def test_existing_folder_is_kept_without_overwrite(tmp_path):
    model = tiny_llama(seed=5)
    scheme = QuantScheme(bits=4, group_size=32)
    quantized = quantize_linears(model, scheme)
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(QuantkitError, match="exists; pass --overwrite to replace it"):
        save_gptq(model, None, quantized, scheme, out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "mine"
    save_gptq(model, None, quantized, scheme, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_layers_that_do_not_fill_words_are_reported(tmp_path):
    model = tiny_llama(intermediate=272)
    scheme = QuantScheme(bits=3, group_size=-1)
    quantized = quantize_linears(model, scheme)
    expected = "layer 'model.layers.0.mlp.gate_proj' cannot be stored: .* multiple of 32; got 272"
    with pytest.raises(QuantkitError, match=expected):
        save_gptq(model, None, quantized, scheme, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_act_order_g_idx_sets_desc_act(tmp_path):
    model = tiny_llama(seed=7)
    scheme = QuantScheme(bits=4, group_size=32)
    quantized = quantize_linears(model, scheme)
    name = "model.layers.1.mlp.up_proj"
    permutation = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    quantized[name].g_idx = quantized[name].g_idx[permutation]
    out = save_gptq(model, None, quantized, scheme, tmp_path / "ckpt")
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"]
        is True
    )
    tensors = load_file(out / "model.safetensors")
    assert torch.equal(_decode_layer(tensors, name, 4), quantized[name].dequantize())
    assert torch.equal(
        load_gptq_model(out).get_submodule(name).dequantize_weight(),
        quantized[name].dequantize(),
    )


def test_dtype_names_are_accepted(tmp_path):
    model = tiny_llama(seed=10)
    scheme = QuantScheme(bits=8, group_size=-1)
    out = save_gptq(model, None, quantize_linears(model, scheme), scheme, tmp_path / "ckpt")
    assert load_gptq_model(out, dtype="auto").model.norm.weight.dtype == torch.float32
    assert (
        load_gptq_model(out, dtype="bfloat16").model.norm.weight.dtype == torch.bfloat16
    )
    loaded = load_quantized_model(out, dtype=torch.float16)
    assert loaded.model.embed_tokens.weight.dtype == torch.float16
    assert loaded.model.layers[0].mlp.up_proj.scales.dtype == torch.float16
    with pytest.raises(QuantkitError, match="unknown dtype 'int8'"):
        load_gptq_model(out, dtype="int8")


def test_load_quantized_model_reports_unsupported_checkpoints(tmp_path):
    bnb = write_config(tmp_path / "bnb", {"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(
        QuantkitError,
        match="quantization method 'bitsandbytes' of .* is not supported: quantkit reads gptq, awq "
        "and compressed-tensors checkpoints",
    ):
        load_quantized_model(bnb)
    with pytest.raises(QuantkitError, match="holds no quantized model"):
        load_quantized_model(write_config(tmp_path / "float", None))
    v2 = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 128,
        "checkpoint_format": "gptq_v2",
    }
    with pytest.raises(QuantkitError, match="checkpoint_format 'gptq_v2'"):
        load_quantized_model(write_config(tmp_path / "v2", v2))
    with pytest.raises(QuantkitError, match="does not exist"):
        load_quantized_model(tmp_path / "missing")
    with pytest.raises(QuantkitError, match="has no config.json"):
        (tmp_path / "empty").mkdir()
        load_quantized_model(tmp_path / "empty")


@pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None
    or importlib.util.find_spec("optimum") is None,
    reason="transformers' own GPTQ loader needs the optional gptqmodel and optimum packages",
)
def test_transformers_loads_the_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(seed=8)
    scheme = QuantScheme(bits=4, group_size=32)
    quantized = quantize_linears(model, scheme)
    out = save_gptq(model, None, quantized, scheme, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float16, device_map="cpu"
    )
    ids = torch.arange(8).reshape(1, 8)
    assert_logits_match(loaded, model, quantized, ids, rtol=0.05, atol=0.05)
