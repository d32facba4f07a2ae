"""AWQ GEMM checkpoints: tensors decoded by an independent reader, config fields, load-back, refusals."""

import importlib.util
import json

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
from quantkit.formats.awq import load_awq_model, save_awq
from quantkit.models.loading import load_model
from quantkit.quant.awq_linear import AwqLinear, pack_awq, unpack_awq
from quantkit.quant.scheme import QuantScheme

# Nibble k of a word holds output column 8c + AWQ_ORDER[k] (AutoAWQ's gemm.py order map).
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _unpack_awq_words(words: torch.Tensor) -> torch.Tensor:
    """Independent AWQ unpacking: (rows, n) int32 to (rows, 8n) values in true column order."""
    unsigned = words.to(torch.int64) & 0xFFFFFFFF
    rows, n = words.shape
    values = torch.empty(rows, 8 * n, dtype=torch.int64)
    for c in range(n):
        for k in range(8):
            values[:, 8 * c + AWQ_ORDER[k]] = (unsigned[:, c] >> (4 * k)) & 0xF
    return values


def _decode_layer(tensors: dict, name: str, group_size: int) -> torch.Tensor:
    q = _unpack_awq_words(tensors[f"{name}.qweight"])  # (in, out)
    zeros = _unpack_awq_words(tensors[f"{name}.qzeros"])  # (groups, out)
    span = q.shape[0] if group_size == -1 else group_size
    groups = torch.arange(q.shape[0]) // span
    weight_in_out = (
        tensors[f"{name}.scales"].float()[groups] * (q - zeros[groups]).float()
    )
    return weight_in_out.t()


def test_pack_order_is_autoawqs():
    columns = torch.arange(8, dtype=torch.int32).reshape(1, 8)
    # nibble k holds column AWQ_ORDER[k]: 0, 2, 4, 6, 1, 3, 5, 7 from the lowest nibble up
    assert pack_awq(columns).item() == 0x75316420
    values = torch.randint(
        0, 16, (5, 24), generator=torch.Generator().manual_seed(0), dtype=torch.int32
    )
    words = pack_awq(values)
    assert words.shape == (5, 3) and words.dtype == torch.int32
    assert torch.equal(unpack_awq(words), values)
    assert torch.equal(_unpack_awq_words(words), values.long())


CASES = [
    QuantScheme(bits=4, group_size=32, symmetric=True),
    QuantScheme(bits=4, group_size=32, symmetric=False),
    QuantScheme(bits=4, group_size=-1, symmetric=False),
    QuantScheme(bits=4, group_size=128, symmetric=True),
]


@pytest.mark.parametrize("scheme", CASES, ids=[s.name for s in CASES])
def test_written_checkpoint_decodes_and_loads_back(tmp_path, scheme):
    model = tiny_llama()
    quantized = quantize_linears(model, scheme, min_zero=0)
    out = save_awq(
        model, tiny_tokenizer(), quantized, scheme, tmp_path / "ckpt",
        algorithm_config={"method": "rtn"},
    )  # fmt: skip

    tensors = load_file(out / "model.safetensors")
    for name, qw in quantized.items():
        n_groups = 1 if scheme.group_size == -1 else qw.in_features // scheme.group_size
        assert f"{name}.weight" not in tensors and f"{name}.g_idx" not in tensors
        assert tensors[f"{name}.qweight"].shape == (
            qw.in_features,
            qw.out_features // 8,
        )
        assert tensors[f"{name}.qweight"].dtype == torch.int32
        assert tensors[f"{name}.qzeros"].shape == (n_groups, qw.out_features // 8)
        assert tensors[f"{name}.scales"].shape == (n_groups, qw.out_features)
        assert tensors[f"{name}.scales"].dtype == torch.float16
        assert torch.equal(
            _decode_layer(tensors, name, scheme.group_size), qw.dequantize()
        )
    assert tensors["lm_head.weight"].dtype == torch.float16

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float16"
    assert config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": scheme.group_size, "zero_point": True,
        "version": "gemm", "modules_to_not_convert": ["lm_head"],
        "meta": {
            "quantizer": [f"quantkit:{__version__}"],
            "quantkit": {"scheme": scheme.name, "method": "rtn"},
        },
    }  # fmt: skip
    assert (out / "tokenizer.json").is_file() and (
        out / "generation_config.json"
    ).is_file()

    loaded = load_model(str(out))
    assert loaded.quantization_config["quant_method"] == "awq"
    for name in quantized:
        assert isinstance(loaded.model.get_submodule(name), AwqLinear)
    assert type(loaded.model.lm_head) is nn.Linear
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    assert_logits_match(loaded.model, model, quantized, ids)


def test_symmetric_weights_store_explicit_zero_points_of_eight(tmp_path):
    model = tiny_llama(seed=1)
    scheme = QuantScheme(bits=4, group_size=64, symmetric=True)
    quantized = quantize_linears(model, scheme, min_zero=0)
    for qw in quantized.values():  # the pipeline hands codes over as bytes
        qw.codes = qw.codes.to(torch.uint8)
    out = save_awq(model, None, quantized, scheme, tmp_path / "ckpt")
    tensors = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.up_proj"
    assert bool(
        (tensors[f"{name}.qzeros"] == 0x88888888 - (1 << 32)).all()
    )  # nibbles of 8
    assert torch.equal(_decode_layer(tensors, name, 64), quantized[name].dequantize())


def test_zero_point_zero_is_stored(tmp_path):
    model = tiny_llama(seed=2)
    with torch.no_grad():  # an all-positive layer: every asymmetric zero point is 0
        model.model.layers[0].mlp.up_proj.weight.abs_()
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    quantized = quantize_linears(model, scheme, min_zero=0)
    name = "model.layers.0.mlp.up_proj"
    assert bool((quantized[name].zeros == 0).all())
    out = save_awq(model, None, quantized, scheme, tmp_path / "ckpt")
    tensors = load_file(out / "model.safetensors")
    assert bool((tensors[f"{name}.qzeros"] == 0).all())
    assert torch.equal(_decode_layer(tensors, name, 32), quantized[name].dequantize())
    assert torch.equal(
        load_awq_model(out).get_submodule(name).dequantize_weight(),
        quantized[name].dequantize(),
    )


def test_layers_left_in_float_are_listed_and_loaded_as_linear(tmp_path):
    model = tiny_llama(seed=3)
    scheme = QuantScheme(
        bits=4, group_size=32, ignore=("lm_head", "model.layers.1.mlp.down_proj")
    )
    out = save_awq(model, None, quantize_linears(model, scheme, min_zero=0), scheme, tmp_path / "ckpt")
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["modules_to_not_convert"] == ["model.layers.1.mlp.down_proj", "lm_head"]
    loaded = load_quantized_model(out)
    assert type(loaded.model.layers[1].mlp.down_proj) is nn.Linear
    assert isinstance(loaded.model.layers[0].mlp.down_proj, AwqLinear)


def test_tied_embeddings_are_stored_once_and_tied_on_load(tmp_path):
    model = tiny_llama(seed=4, tie=True)
    scheme = QuantScheme(bits=4, group_size=32)
    quantized = quantize_linears(model, scheme, min_zero=0)
    out = save_awq(model, None, quantized, scheme, tmp_path / "ckpt")
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors
    loaded = load_awq_model(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.arange(10).reshape(1, 10)
    assert_logits_match(loaded, model, quantized, ids)


@pytest.mark.parametrize(
    ("scheme", "message"),
    [
        (QuantScheme(bits=8, group_size=32), "stores 4-bit weights only, not 8-bit"),
        (QuantScheme(bits=3, group_size=32), "stores 4-bit weights only, not 3-bit"),
        (
            QuantScheme(bits=4, group_size=32, ignore=()),
            "cannot hold a quantized output head",
        ),
    ],
)
def test_unstorable_schemes_are_refused(tmp_path, scheme, message):
    model = tiny_llama(seed=5)
    quantized = quantize_linears(model, scheme, min_zero=0)
    with pytest.raises(QuantkitError, match=message):
        save_awq(model, None, quantized, scheme, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_act_order_and_odd_output_sizes_are_refused(tmp_path):
    model = tiny_llama(seed=6)
    scheme = QuantScheme(bits=4, group_size=32)
    quantized = quantize_linears(model, scheme, min_zero=0)
    name = "model.layers.0.mlp.up_proj"
    quantized[name].g_idx = quantized[name].g_idx[torch.randperm(128)]
    with pytest.raises(QuantkitError, match=f"'{name}' was quantized with act-order"):
        save_awq(model, None, quantized, scheme, tmp_path / "ckpt")

    odd = tiny_llama(seed=6, intermediate=260)
    per_channel = QuantScheme(bits=4, group_size=-1)
    quantized = quantize_linears(odd, per_channel, min_zero=0)
    expected = (
        "'model.layers.0.mlp.gate_proj' cannot be stored: .* multiple of 8; got 260"
    )
    with pytest.raises(QuantkitError, match=expected):
        save_awq(odd, None, quantized, per_channel, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("qcfg", "message"),
    [
        (
            {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"},
            "version 'gemv'",
        ),
        (
            {"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm"},
            "AWQ bits 8",
        ),
        (
            {"quant_method": "awq", "bits": 4, "version": "gemm"},
            "invalid AWQ group_size None",
        ),
    ],
)
def test_unreadable_configs_are_reported(tmp_path, qcfg, message):
    with pytest.raises(QuantkitError, match=message):
        load_quantized_model(write_config(tmp_path / "ckpt", qcfg))


def test_mis_shaped_tensors_are_reported(tmp_path):
    model = tiny_llama(seed=7)
    scheme = QuantScheme(bits=4, group_size=32)
    out = save_awq(model, None, quantize_linears(model, scheme, min_zero=0), scheme, tmp_path / "ckpt")
    tensors = load_file(out / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.qzeros"] = torch.zeros(3, 32, dtype=torch.int32)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(
        QuantkitError, match="'model.layers.0.mlp.up_proj' are missing or mis-shaped"
    ):
        load_awq_model(out)


@pytest.mark.skipif(
    importlib.util.find_spec("gptqmodel") is None,
    reason="transformers' own AWQ loader needs the optional gptqmodel package (AutoAWQ is deprecated)",
)
def test_transformers_loads_the_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(seed=8)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    quantized = quantize_linears(model, scheme, min_zero=0)
    out = save_awq(model, None, quantized, scheme, tmp_path / "ckpt", algorithm_config={"method": "rtn"})
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, device_map="cpu")
    assert any("awq" in type(module).__name__.lower() for module in loaded.modules())
    ids = torch.arange(8).reshape(1, 8)
    assert_logits_match(loaded, model, quantized, ids, rtol=0.05, atol=0.05)
