"""SmoothQuant: the scales' formula, the fold that keeps the float function, the balance it
strikes, the α search, and the pipeline step on a tiny Llama."""

import copy

import pytest
import torch
from test_pipeline import calibration, tiny_llama

from quantkit.models.adapters import get_adapter
from quantkit.models.folding import fold_input_scales
from quantkit.pipeline import quantize_model
from quantkit.quant.smoothquant import (
    ChannelAbsMax,
    search_alpha,
    smoothing_scales,
    w8a8_group_output,
)
from quantkit.quant.w8a8 import EightBitWeight
from quantkit.recipe import recipe_from_dict


def test_scales_follow_the_formula():
    act = torch.tensor([4.0, 0.0, 9.0, 1.0])
    w1 = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-3.0, 1.0, 0.25, 0.0]])
    w2 = torch.tensor([[0.5, 0.5, -1.0, 0.0]])
    s = smoothing_scales(act, [w1, w2], 0.5)
    w_max = torch.tensor([3.0, 2.0, 1.0, 1e-5])  # a dead weight column gets the floor
    want = act.clamp_min(1e-5).sqrt() / w_max.sqrt()
    torch.testing.assert_close(s, want)
    torch.testing.assert_close(smoothing_scales(act, [w1], 1.0), act.clamp_min(1e-5))
    torch.testing.assert_close(smoothing_scales(act, [w1], 0.0), 1 / torch.tensor([3.0, 2.0, 0.5, 1e-5]))


def _group_inputs(model, layer_index=0):
    """max |x| of the attention and MLP input groups of one layer on some tokens."""
    layer = model.model.layers[layer_index]
    stats = {"attn_in": ChannelAbsMax(128, rows_per_batch=64), "mlp_in": ChannelAbsMax(128, rows_per_batch=64)}
    hooks = [layer.self_attn.q_proj.register_forward_pre_hook(lambda m, i: stats["attn_in"].add_batch(i[0])),
             layer.mlp.gate_proj.register_forward_pre_hook(lambda m, i: stats["mlp_in"].add_batch(i[0]))]
    with torch.no_grad():
        model(calibration(4, 32))
    for hook in hooks:
        hook.remove()
    return stats


def test_folding_keeps_the_function_and_balances_the_ranges():
    model = tiny_llama()
    ids = calibration(2, 32, seed=5)
    with torch.no_grad():
        before = model(ids).logits
    stats = _group_inputs(model)
    adapter = get_adapter(model)
    layer = model.model.layers[0]
    group = adapter.linear_groups(layer)[0]  # q, k, v after input_layernorm
    weights = [layer.get_submodule(name).weight.detach().clone() for name in group.linears]
    s = smoothing_scales(stats["attn_in"].absmax, weights, 0.5)
    fold_input_scales(layer, group, s, adapter)
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    # α = 0.5: each channel's largest input and largest weight become equal
    new_stats = _group_inputs(model)
    new_w = torch.cat([layer.get_submodule(name).weight for name in group.linears]).abs().amax(0)
    torch.testing.assert_close(new_stats["attn_in"].absmax, new_w, rtol=1e-4, atol=1e-6)


def test_alpha_search_picks_the_least_output_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen)
    x[:, 5] *= 60  # an outlier channel
    w = [torch.randn(32, 64, generator=gen) / 8, torch.randn(16, 64, generator=gen) / 8]
    stats = ChannelAbsMax(64, rows_per_batch=256)
    stats.add_batch(x)
    alpha, scales, errors = search_alpha(stats, w, "int", "channel", "dynamic", grid=10)
    assert len(errors) == 11 and errors[int(alpha * 10)] == min(errors)
    torch.testing.assert_close(scales, smoothing_scales(stats.absmax, w, alpha))
    assert errors[0] > min(errors)  # with an outlier, smoothing beats none (α = 0 leaves x as is up to 1/max|W|)
    reference = x @ torch.cat(w).t()
    naive = w8a8_group_output(x, torch.cat(w), "int", "channel", "dynamic")
    smoothed = w8a8_group_output(x / scales, torch.cat(w) * scales, "int", "channel", "dynamic")
    assert (smoothed - reference).norm() < 0.5 * (naive - reference).norm()


@pytest.mark.parametrize("search", [False, True])
def test_pipeline_smooths_then_quantizes(search):
    model = tiny_llama()
    float_model = copy.deepcopy(model)
    recipe = recipe_from_dict({"format": "compressed-tensors", "calibration": {"seq_len": 32},
                               "steps": [{"method": "smoothquant", "alpha_search": search, "alpha_grid": 4},
                                         {"method": "w8a8", "activations": "static"}]})
    result = quantize_model(model, get_adapter(model), recipe, samples=calibration(8, 32), batch_size=4)
    assert len(result.quantized) == 14 and all(isinstance(r, EightBitWeight) for r in result.quantized.values())
    assert all(r.input_scale is not None and r.input_scale.shape == (1,) for r in result.quantized.values())
    # the norms absorbed 1/s; q, k and v share one input scale
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, float_model.model.layers[0].input_layernorm.weight)
    q, k = (result.quantized[f"model.layers.1.self_attn.{p}_proj"] for p in "qk")
    assert torch.equal(q.input_scale, k.input_scale)
    assert all(layer.output_error < 0.05 for layer in result.layers)
    # hooks that rounded activations during calibration are gone
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_smoothquant_needs_calibration_samples():
    model = tiny_llama()
    recipe = recipe_from_dict({"format": "compressed-tensors",
                               "steps": [{"method": "smoothquant"}, {"method": "w8a8"}]})
    with pytest.raises(ValueError, match="smoothquant"):
        quantize_model(model, get_adapter(model), recipe)
