"""compressed-tensors pack-quantized checkpoints: independent decoding, config, load-back, the library."""

import importlib.util
import json

import pytest
import torch
from quant_helpers import assert_logits_match, quantize_linears, tiny_llama
from safetensors.torch import load_file
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats import load_quantized_model
from quantkit.formats.compressed_tensors import (
    load_compressed_tensors_model,
    save_compressed_tensors,
)
from quantkit.models.loading import load_model
from quantkit.quant.pack_quantized_linear import (
    PackQuantizedLinear,
    pack_dense,
    unpack_dense,
)
from quantkit.quant.scheme import QuantScheme

HAS_COMPRESSED_TENSORS = importlib.util.find_spec("compressed_tensors") is not None


def _unpack_stream(words: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Independent reading: each row's words as one little-endian bit stream of ``bits``-bit values."""
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    stream = (
        unsigned.unsqueeze(-1) >> torch.arange(32)
    ) & 1  # (rows, words, 32) bits, low first
    stream = stream.reshape(words.shape[0], -1)[:, : count * bits]
    fields = stream.reshape(words.shape[0], count, bits)
    return (fields << torch.arange(bits)).sum(-1)


def _decode_layer(
    tensors: dict, name: str, bits: int, group_size: int, symmetric: bool
):
    """The layer's weight in compressed-tensors' own terms: signed codes and signed zero points."""
    out_features, in_features = tensors[f"{name}.weight_shape"].tolist()
    offset = 1 << (bits - 1)
    signed = (
        _unpack_stream(tensors[f"{name}.weight_packed"], bits, in_features) - offset
    )
    scale = tensors[f"{name}.weight_scale"].float()
    if symmetric:
        zero = torch.zeros(scale.shape, dtype=torch.int64)
    else:
        packed_zero = tensors[f"{name}.weight_zero_point"].t()
        zero = _unpack_stream(packed_zero, bits, out_features).t() - offset
    span = in_features if group_size == -1 else group_size
    groups = torch.arange(in_features) // span
    return scale[:, groups] * (signed - zero[:, groups]).float()


def test_dense_packing_crosses_words_for_three_bits():
    values = torch.arange(8, dtype=torch.int32).repeat(1, 4)  # 32 values 0..7
    words = pack_dense(values, 3)
    assert words.shape == (1, 3)
    expected = sum(int(v) << (3 * j) for j, v in enumerate(values[0].tolist()))
    as_unsigned = [w & 0xFFFFFFFF for w in words[0].tolist()]
    assert sum(w << (32 * k) for k, w in enumerate(as_unsigned)) == expected
    # widths that leave a partial last word: 12 four-bit values fill 1.5 words -> 2 words
    odd = torch.randint(
        0, 16, (3, 12), generator=torch.Generator().manual_seed(0), dtype=torch.int32
    )
    assert pack_dense(odd, 4).shape == (3, 2)
    assert torch.equal(unpack_dense(pack_dense(odd, 4), 4, 12), odd)
    assert torch.equal(_unpack_stream(pack_dense(odd, 4), 4, 12), odd.long())


CASES = [
    QuantScheme(bits=4, group_size=32, symmetric=True),
    QuantScheme(bits=4, group_size=32, symmetric=False),
    QuantScheme(bits=8, group_size=-1, symmetric=True),
    QuantScheme(bits=3, group_size=64, symmetric=False),
    QuantScheme(bits=2, group_size=-1, symmetric=False),
]


@pytest.mark.parametrize("scheme", CASES, ids=[s.name for s in CASES])
def test_written_checkpoint_decodes_and_loads_back(tmp_path, scheme):
    model = tiny_llama()
    quantized = quantize_linears(model, scheme, min_zero=0)
    out = save_compressed_tensors(model, None, quantized, scheme, tmp_path / "ckpt")

    tensors = load_file(out / "model.safetensors")
    bits = scheme.bits
    for name, qw in quantized.items():
        rows, cols = qw.out_features, qw.in_features
        n_groups = 1 if scheme.group_size == -1 else cols // scheme.group_size
        assert f"{name}.weight" not in tensors
        assert tensors[f"{name}.weight_packed"].shape == (rows, cols * bits // 32)
        assert tensors[f"{name}.weight_packed"].dtype == torch.int32
        assert tensors[f"{name}.weight_scale"].shape == (rows, n_groups)
        assert tensors[f"{name}.weight_scale"].dtype == torch.float16
        assert tensors[f"{name}.weight_shape"].tolist() == [rows, cols]
        assert tensors[f"{name}.weight_shape"].dtype == torch.int64
        if scheme.symmetric:
            assert f"{name}.weight_zero_point" not in tensors
        else:
            assert tensors[f"{name}.weight_zero_point"].shape == (
                rows * bits // 32,
                n_groups,
            )
        decoded = _decode_layer(
            tensors, name, bits, scheme.group_size, scheme.symmetric
        )
        assert torch.equal(decoded, qw.dequantize())

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    grouped = scheme.group_size != -1
    assert qcfg["config_groups"] == {
        "group_0": {
            "targets": ["Linear"],
            "weights": {
                "num_bits": bits, "type": "int", "symmetric": scheme.symmetric,
                "group_size": scheme.group_size if grouped else None,
                "strategy": "group" if grouped else "channel", "block_structure": None,
                "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
            },
            "input_activations": None,
            "output_activations": None,
        }
    }  # fmt: skip
    assert {k: qcfg[k] for k in ("quant_method", "format", "quantization_status", "ignore")} == {
        "quant_method": "compressed-tensors", "format": "pack-quantized",
        "quantization_status": "compressed", "ignore": ["lm_head"],
    }  # fmt: skip
    assert isinstance(qcfg["version"], str)

    loaded = load_model(str(out))
    for name in quantized:
        assert isinstance(loaded.model.get_submodule(name), PackQuantizedLinear)
    assert type(loaded.model.lm_head) is nn.Linear
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    assert_logits_match(loaded.model, model, quantized, ids)


def test_quantized_head_is_untied_and_loads_back(tmp_path):
    model = tiny_llama(seed=1, tie=True)
    scheme = QuantScheme(bits=8, group_size=64, symmetric=False, ignore=())
    quantized = quantize_linears(model, scheme, min_zero=0)
    assert "lm_head" in quantized
    out = save_compressed_tensors(model, None, quantized, scheme, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == []
    assert config["tie_word_embeddings"] is False
    loaded = load_compressed_tensors_model(out)
    assert isinstance(loaded.lm_head, PackQuantizedLinear)
    ids = torch.arange(8).reshape(1, 8)
    assert_logits_match(loaded, model, quantized, ids)


def test_layers_left_in_float_are_ignored_by_name(tmp_path):
    model = tiny_llama(seed=2)
    scheme = QuantScheme(
        bits=4, group_size=32, ignore=("lm_head", "re:.*self_attn\\.o_proj")
    )
    quantized = quantize_linears(model, scheme, min_zero=0)
    for qw in quantized.values():  # the pipeline hands codes over as bytes
        qw.codes = qw.codes.to(torch.uint8)
    out = save_compressed_tensors(model, None, quantized, scheme, tmp_path / "ckpt")
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj"
    decoded = _decode_layer(tensors, name, 4, 32, symmetric=True)
    assert torch.equal(decoded, quantized[name].dequantize())
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["ignore"] == [
        "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj", "lm_head",
    ]  # fmt: skip
    loaded = load_quantized_model(out)
    assert type(loaded.model.layers[1].self_attn.o_proj) is nn.Linear
    assert isinstance(loaded.model.layers[1].self_attn.q_proj, PackQuantizedLinear)


def test_act_order_is_refused(tmp_path):
    model = tiny_llama(seed=3)
    scheme = QuantScheme(bits=4, group_size=32)
    quantized = quantize_linears(model, scheme, min_zero=0)
    name = "model.layers.1.mlp.up_proj"
    quantized[name].g_idx = quantized[name].g_idx[torch.randperm(128)]
    with pytest.raises(QuantkitError, match=f"'{name}' was quantized with act-order"):
        save_compressed_tensors(model, None, quantized, scheme, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def _rewrite_quantization_config(folder, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config["quantization_config"])
    (folder / "config.json").write_text(json.dumps(config))


def test_config_groups_are_matched_by_regex_target(tmp_path):
    model = tiny_llama(seed=4)
    scheme = QuantScheme(bits=4, group_size=32)
    quantized = quantize_linears(model, scheme, min_zero=0)
    out = save_compressed_tensors(model, None, quantized, scheme, tmp_path / "ckpt")

    def split_groups(qcfg):
        weights = qcfg["config_groups"]["group_0"]["weights"]
        qcfg["config_groups"] = {
            "attention": {"targets": ["re:.*self_attn.*"], "weights": weights},
            "mlp": {"targets": ["re:.*mlp.*"], "weights": weights},
        }

    _rewrite_quantization_config(out, split_groups)
    loaded = load_compressed_tensors_model(out)
    name = "model.layers.0.mlp.down_proj"
    assert torch.equal(
        loaded.get_submodule(name).dequantize_weight(), quantized[name].dequantize()
    )

    def attention_only(qcfg):
        del qcfg["config_groups"]["mlp"]

    _rewrite_quantization_config(out, attention_only)
    with pytest.raises(
        QuantkitError,
        match="layer 'model.layers.0.mlp.down_proj' packed, but no config",
    ):
        load_compressed_tensors_model(out)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda q: q.update(format="float-quantized"), "format 'float-quantized'"),
        (
            lambda q: q["config_groups"]["group_0"].update(
                input_activations={
                    "num_bits": 8,
                    "type": "int",
                    "strategy": "token",
                    "dynamic": True,
                }
            ),
            "quantizes activations",
        ),
        (
            lambda q: q["config_groups"]["group_0"]["weights"].update(type="float"),
            "weights type",
        ),
        (
            lambda q: q.update(config_groups={"W4A16": ["Linear"]}),
            "not a scheme with targets",
        ),
    ],
)
def test_unreadable_configs_are_reported(tmp_path, edit, message):
    model = tiny_llama(seed=5)
    scheme = QuantScheme(bits=4, group_size=32)
    out = save_compressed_tensors(
        model, None, quantize_linears(model, scheme, min_zero=0), scheme, tmp_path / "ckpt"
    )
    _rewrite_quantization_config(out, edit)
    with pytest.raises(QuantkitError, match=message):
        load_quantized_model(out)


LIBRARY_CASES = [
    QuantScheme(bits=4, group_size=32, symmetric=True),
    QuantScheme(bits=4, group_size=64, symmetric=False),
    QuantScheme(bits=3, group_size=-1, symmetric=False),
]


@pytest.mark.skipif(
    not HAS_COMPRESSED_TENSORS, reason="needs the compressed-tensors package"
)
@pytest.mark.parametrize("scheme", LIBRARY_CASES, ids=[s.name for s in LIBRARY_CASES])
def test_compressed_tensors_library_decompresses_the_checkpoint(tmp_path, scheme):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model = tiny_llama(seed=6)
    quantized = quantize_linears(model, scheme, min_zero=0)
    out = save_compressed_tensors(model, None, quantized, scheme, tmp_path / "ckpt")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(qcfg)
    compressor = BaseCompressor.get_value_from_registry(parsed.format)
    layer_scheme = parsed.config_groups["group_0"]
    tensors = load_file(out / "model.safetensors")
    for name, qw in quantized.items():
        layer_state = {
            key.removeprefix(f"{name}."): value
            for key, value in tensors.items()
            if key.startswith(f"{name}.")
        }
        weight = compressor.decompress(layer_state, layer_scheme)["weight"]
        # The library dequantizes in the scale's dtype (float16): compare with the rounded weight.
        assert weight.dtype == torch.float16
        assert torch.equal(weight, qw.dequantize().half())


@pytest.mark.skipif(
    not HAS_COMPRESSED_TENSORS, reason="needs the compressed-tensors package"
)
def test_transformers_loads_the_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(seed=7)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=True)
    quantized = quantize_linears(model, scheme, min_zero=0)
    out = save_compressed_tensors(model, None, quantized, scheme, tmp_path / "ckpt")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.arange(8).reshape(1, 8)
    # The first forward pass decompresses the packed layers.
    assert_logits_match(loaded, model, quantized, ids)
    for name, qw in quantized.items():
        assert torch.equal(loaded.get_submodule(name).weight, qw.dequantize())
