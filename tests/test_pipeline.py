"""The layer-by-layer pipeline on tiny random models: capture, GPTQ, checkpoints that compute the same."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.models.adapters import get_adapter
from quantkit.pipeline import quantize_model
from quantkit.pipeline.capture import capture_first_layer_inputs
from quantkit.quant.weights import weight_out_in
from quantkit.recipe import weight_quant_recipe


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval().requires_grad_(False)


def calibration(n=16, length=64, seed=0):
    # a low-entropy token stream, so activations are correlated as in real text
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 32, (n, length), generator=gen)
    return (base * 7 + torch.arange(length) % 5) % 256


def test_capture_records_the_embeddings_and_layer_arguments():
    model = tiny_llama()
    samples = calibration(6, 32)
    batches = capture_first_layer_inputs(model, model.model.layers, samples, device=torch.device("cpu"),
                                         batch_size=4, storage=torch.device("cpu"))
    assert [b.hidden.shape[0] for b in batches] == [4, 2]
    torch.testing.assert_close(torch.cat([b.hidden for b in batches]), model.model.embed_tokens(samples))
    assert "position_embeddings" in batches[0].kwargs


def logits_error(model, reference, ids):
    with torch.no_grad():
        return (model(input_ids=ids).logits - reference(input_ids=ids).logits).pow(2).mean().item()


@pytest.mark.parametrize("options", [{}, {"act_order": True}, {"true_sequential": False}])
def test_gptq_beats_rtn_on_the_calibration_distribution(options):
    samples, held_out = calibration(16, 64, seed=0), calibration(4, 64, seed=1)
    reference = tiny_llama()
    errors = {}
    for method in ("rtn", "gptq"):
        model = tiny_llama()
        recipe = weight_quant_recipe("w3a16", group_size=32, method=method,
                                     options=options if method == "gptq" else None)
        result = quantize_model(model, get_adapter(model), recipe, samples=samples, batch_size=4)
        assert len(result.quantized) == 2 * 7
        for name, qweight in result.quantized.items():  # the model now holds the represented weights
            torch.testing.assert_close(weight_out_in(model.get_submodule(name)), qweight.dequantize())
        errors[method] = logits_error(model, reference, held_out)
        if method == "gptq":
            assert all(r.output_error is not None and r.output_error < 1 for r in result.layers)
    assert errors["gptq"] < 0.8 * errors["rtn"], errors


def test_gptq_checkpoint_reloads_to_the_same_function(tmp_path):
    from quantkit.formats.gptq import load_gptq_model, save_gptq

    model = tiny_llama()
    recipe = weight_quant_recipe("w4a16", group_size=32, method="gptq", options={"act_order": True})
    result = quantize_model(model, get_adapter(model), recipe, samples=calibration(), batch_size=8)
    save_gptq(model, None, result.quantized, recipe.steps[0].quant_scheme(), tmp_path / "out")
    loaded = load_gptq_model(tmp_path / "out", dtype=torch.float32)
    ids = calibration(2, 32, seed=3)
    with torch.no_grad():
        # non-quantized tensors are stored in float16 by the writer
        for param in model.parameters():
            param.data = param.data.half().float()
        for name, qweight in result.quantized.items():
            model.get_submodule(name).weight.data = qweight.dequantize()
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_calibration_methods_need_samples():
    model = tiny_llama()
    with pytest.raises(ValueError, match="needs calibration samples"):
        quantize_model(model, get_adapter(model), weight_quant_recipe("w4a16", group_size=32, method="gptq"))


def test_a_rank_that_writes_nothing_keeps_names_not_weights():
    # data-parallel ranks other than 0 would otherwise hold the whole quantized model in host memory
    recipe = weight_quant_recipe("w4a16", group_size=32, method="gptq")
    kept, dropped = tiny_llama(), tiny_llama()
    full = quantize_model(kept, get_adapter(kept), recipe, samples=calibration(8, 32), batch_size=4)
    names = quantize_model(dropped, get_adapter(dropped), recipe, samples=calibration(8, 32), batch_size=4,
                           keep_quantized=False)
    assert list(names.quantized) == list(full.quantized) and set(names.quantized.values()) == {None}
    for name in full.quantized:  # the model itself is quantized the same way
        assert torch.equal(weight_out_in(dropped.get_submodule(name)), weight_out_in(kept.get_submodule(name)))
