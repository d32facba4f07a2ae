"""`quantkit quantize` then `quantkit eval` on the bundled target, checked against references."""

import json

import pytest
import torch

from quantkit.models.loading import load_model
from quantkit.quant.rtn import rtn_quantize
from quantkit.quant.scheme import QuantScheme
from quantkit.quant.weights import set_weight_out_in, weight_out_in


@pytest.fixture(scope="module")
def w4_checkpoint(tmp_path_factory):
    from quantkit.compress import compress
    from quantkit.recipe import weight_quant_recipe

    out = tmp_path_factory.mktemp("ckpt") / "w4"
    compress(None, weight_quant_recipe("w4a16", group_size=128), out)
    return out


def fake_quantized_target(scheme: QuantScheme):
    """The float target with every decoder linear replaced by its RTN-represented weight."""
    loaded = load_model("quantkit-target")
    prefix = loaded.adapter.layer_prefix(loaded.model)
    for index, layer in enumerate(loaded.adapter.decoder_layers(loaded.model)):
        for group in loaded.adapter.linear_groups(layer):
            for name in group.linears:
                module = layer.get_submodule(name)
                qw = rtn_quantize(weight_out_in(module).float(), scheme, module_name=f"{prefix}.{index}.{name}")
                set_weight_out_in(module, qw.dequantize())
    return loaded.model


def test_checkpoint_computes_the_fake_quantized_model(w4_checkpoint):
    quantized = load_model(str(w4_checkpoint)).model
    # the bundled weights are float16 already, so the checkpoint's float16 copies of the other
    # tensors are exact and the only difference can come from the quantized layers
    reference = fake_quantized_target(QuantScheme(bits=4, group_size=128))
    ids = torch.randint(0, reference.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = quantized(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_checkpoint_layout_and_size(w4_checkpoint):
    config = json.loads((w4_checkpoint / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"], qcfg["sym"]) == ("gptq", 4, 128, True)
    assert (w4_checkpoint / "tokenizer.json").is_file()
    from quantkit.models.bundled import BUNDLED_MODELS

    float_bytes = (BUNDLED_MODELS["quantkit-target"] / "model.safetensors").stat().st_size
    assert (w4_checkpoint / "model.safetensors").stat().st_size < 0.5 * float_bytes


def test_eval_json_compares_with_the_baseline(run_cli, w4_checkpoint):
    result = run_cli("eval", str(w4_checkpoint), "--baseline", "quantkit-target", "--max-windows", "4",
                     "--seq-len", "256", "--json")
    assert result.code == 0, result.stderr
    payload = json.loads(result.stdout)
    text = json.dumps(payload)
    assert "wikitext2" in text and "quantkit-target" in text
    base = payload["baseline"]["perplexity"]["wikitext2"]
    model = payload["models"][0]["perplexity"]["wikitext2"]
    assert base["windows"] == model["windows"] == 4 and base["seq_len"] == 256
    # 4-bit RTN costs a little perplexity, never a collapse
    assert base["perplexity"] < model["perplexity"] < 1.5 * base["perplexity"]


def test_quantize_cli_writes_and_reports(run_cli, tmp_path):
    out = tmp_path / "w8"
    result = run_cli("quantize", "--scheme", "w8a16", "--group-size", "-1", "-o", str(out), "--json")
    assert result.code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["quantized_layers"] == 8 * 7 and summary["skipped_layers"] == []
    assert summary["max_relative_weight_error"] < 0.01  # 8-bit per-channel is near lossless
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 8
