"""AWQ: the scale search, the clip search and quantization on clipped ranges (quantkit.quant.awq)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.errors import QuantkitError
from quantkit.models.adapters import get_adapter
from quantkit.models.folding import fold_input_scales
from quantkit.quant.activation_stats import ActivationStats
from quantkit.quant.awq import (
    AWQConfig,
    awq_quantize,
    awq_search_clip,
    awq_search_clip_from_stats,
    awq_search_scales,
    awq_search_scales_from_stats,
)
from quantkit.quant.qdq import fake_quantize, max_code
from quantkit.quant.rtn import rtn_quantize
from quantkit.quant.scheme import QuantScheme
from quantkit.quant.weights import weight_out_in


def _inputs(tokens=512, in_features=128, seed=0, outliers=4, gain=25.0):
    """Gaussian activations whose first ``outliers`` channels are ``gain`` times larger."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, in_features, generator=generator)
    x[:, :outliers] *= gain
    return x


def _weights(shapes, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * 0.05 for shape in shapes]


def _error(x, weight, represented):
    return (x @ (weight - represented).t()).pow(2).sum().item()


def _awq_represented(x, weights, scheme, config):
    """Each weight as the model will represent it after scaling, folding, clipping and rounding."""
    scales, report = awq_search_scales(x, weights, scheme, config)
    represented = []
    for weight in weights:
        folded = weight * scales
        clip = awq_search_clip(x / scales, folded, scheme, config) if config.clip else None
        quantized = awq_quantize(folded, scheme, clip, module_name="layer")
        represented.append(quantized.dequantize() / scales)
    return represented, report


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("duo_scaling", [False, True])
def test_awq_beats_rtn_on_held_out_inputs_with_outlier_channels(bits, symmetric, duo_scaling):
    scheme = QuantScheme(bits=bits, group_size=64, symmetric=symmetric)
    weights = _weights([(48, 128), (32, 128)])
    search, held_out = _inputs(seed=0), _inputs(seed=5)
    rtn = sum(_error(held_out, w, fake_quantize(w, scheme)) for w in weights)
    for clip in (False, True):
        config = AWQConfig(clip=clip, duo_scaling=duo_scaling)
        represented, report = _awq_represented(search, weights, scheme, config)
        awq = sum(_error(held_out, w, r) for w, r in zip(weights, represented))
        assert report["scaled"]
        assert awq < 0.7 * rtn, (clip, awq / rtn)


def test_scales_are_normalised_positive_and_finite_with_dead_channels():
    x = _inputs(tokens=512, in_features=128)
    x[:, 7] = 0.0  # a channel that never fires
    (weight,) = _weights([(32, 128)])
    scales, report = awq_search_scales(x, [weight], QuantScheme(bits=3, group_size=64))
    assert report["scaled"]
    assert scales.shape == (128,) and scales.dtype == torch.float32
    assert bool(torch.isfinite(scales).all()) and bool((scales > 0).all())
    assert scales.max() * scales.min() == pytest.approx(1.0, rel=1e-5)
    assert scales[7] == scales.min()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_never_loses_to_rtn_on_its_own_data(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 128, generator=generator) * torch.rand(128, generator=generator)
    weights = _weights([(48, 128), (16, 128)], seed=seed)
    stacked = torch.cat(weights)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    scales, report = awq_search_scales(x, weights, scheme, AWQConfig(clip=False))
    elements = x.shape[0] * stacked.shape[0]
    rtn = _error(x, stacked, fake_quantize(stacked, scheme)) / elements
    chosen = _error(x, stacked, fake_quantize(stacked * scales, scheme) / scales) / elements
    assert report["error_rtn"] == pytest.approx(rtn, rel=1e-4)
    assert report["error_unscaled"] == report["error_rtn"]
    assert report["error"] == pytest.approx(chosen, rel=1e-4)
    assert report["error"] <= report["error_rtn"]


def test_unit_scales_win_when_rtn_is_already_exact():
    # Every group holds codes -8..7 times a power of two: the asymmetric 4-bit grid represents
    # it exactly, so any scaling can only add error and s = 1 must be returned.
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (24, 64), generator=generator).float()
    codes[:, ::32] = -8.0
    codes[:, 1::32] = 7.0
    weight = codes * 2.0**-6
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    assert torch.equal(fake_quantize(weight, scheme), weight)
    scales, report = awq_search_scales(_inputs(tokens=256, in_features=64), [weight], scheme)
    assert torch.equal(scales, torch.ones(64))
    assert report == {
        "alpha": 0.0, "scaled": False, "error": 0.0, "error_unscaled": 0.0, "error_rtn": 0.0,
    }  # fmt: skip


def test_output_fn_on_the_group_outputs_matches_the_default_loss():
    x = _inputs(tokens=1024, in_features=128)
    weights = _weights([(32, 128), (48, 128)])
    scheme = QuantScheme(bits=3, group_size=64)
    config = AWQConfig(clip=False, max_tokens=4096)

    def concatenated(inputs, represented):
        return torch.cat([inputs @ w.t() for w in represented], dim=1)

    default_scales, default = awq_search_scales(x, weights, scheme, config)
    fn_scales, with_fn = awq_search_scales(x, weights, scheme, config, output_fn=concatenated)
    assert with_fn["alpha"] == default["alpha"]
    assert torch.equal(fn_scales, default_scales)
    for key in ("error", "error_rtn"):
        assert with_fn[key] == pytest.approx(default[key], rel=1e-4)


def test_clipping_inside_the_scale_search_reports_what_the_pipeline_gets():
    x = _inputs(tokens=1024, in_features=128, gain=8.0)
    weights = _weights([(64, 128)])
    scheme = QuantScheme(bits=3, group_size=64, symmetric=False)
    config = AWQConfig(grid=10, clip_grid=10, clip_in_scale_search=True)
    represented, report = _awq_represented(x, weights, scheme, config)
    elements = x.shape[0] * 64
    assert _error(x, weights[0], represented[0]) / elements == pytest.approx(report["error"], rel=1e-3)
    assert report["error"] <= report["error_unscaled"] < report["error_rtn"]


def _heavy_tailed_weight(out_features=64, in_features=128, seed=3):
    """Gaussian weights with 2% of them 4 times larger: ranges worth clipping."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    rare = torch.rand(out_features, in_features, generator=generator) < 0.02
    return torch.where(rare, 4 * weight, weight)


def _group_errors(x, weight, represented, group_size):
    delta = (weight - represented).reshape(weight.shape[0], -1, group_size)
    inputs = x.reshape(x.shape[0], -1, group_size)
    return torch.einsum("tgi,ogi->tog", inputs, delta).pow(2).sum(0)  # (out, n_groups)


@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_shrinks_ranges_and_never_raises_a_groups_error(symmetric):
    x = _inputs(tokens=1024, in_features=128, outliers=0)
    weight = _heavy_tailed_weight()
    scheme = QuantScheme(bits=3, group_size=32, symmetric=symmetric)
    ranges = awq_search_clip(x, weight, scheme)
    assert ranges.shape == (64, 4, 2)
    groups = weight.reshape(64, 4, 32)
    if symmetric:
        top = groups.abs().amax(-1)
        assert torch.equal(ranges[..., 0], -ranges[..., 1])
        assert bool((ranges[..., 1] <= top).all()) and bool((ranges[..., 1] >= 0.5 * top - 1e-7).all())
    else:
        assert bool((ranges[..., 0] >= groups.amin(-1)).all())
        assert bool((ranges[..., 1] <= groups.amax(-1)).all())
    clipped = awq_quantize(weight, scheme, ranges, module_name="layer").dequantize()
    plain = fake_quantize(weight, scheme)
    clipped_errors = _group_errors(x, weight, clipped, 32)
    plain_errors = _group_errors(x, weight, plain, 32)
    assert bool((clipped_errors <= plain_errors * (1 + 1e-4)).all())
    assert clipped_errors.sum() < 0.9 * plain_errors.sum()
    assert (ranges[..., 1] < groups.amax(-1)).float().mean() > 0.3  # many groups were clipped


def test_awq_quantize_without_clip_or_with_the_full_range_is_rtn():
    weight = _heavy_tailed_weight()
    for symmetric in (True, False):
        scheme = QuantScheme(bits=4, group_size=32, symmetric=symmetric)
        groups = weight.reshape(64, 4, 32)
        if symmetric:
            top = groups.abs().amax(-1)
            full = torch.stack([-top, top], dim=-1)
        else:
            full = torch.stack([groups.amin(-1), groups.amax(-1)], dim=-1)
        rtn = rtn_quantize(weight, scheme)
        for clip in (None, full):
            quantized = awq_quantize(weight, scheme, clip, module_name="layer")
            assert torch.equal(quantized.codes, rtn.codes)
            assert torch.equal(quantized.scales, rtn.scales)
            assert torch.equal(quantized.zeros, rtn.zeros)
            assert torch.equal(quantized.g_idx, rtn.g_idx)


def test_clipped_range_sets_scale_and_zero_and_clamps_outside_values():
    weight = torch.tensor([[-1.0, -0.3, 0.0, 0.2, 0.45, 1.0, 0.1, -0.1]])
    scheme = QuantScheme(bits=4, group_size=8, symmetric=False)
    quantized = awq_quantize(weight, scheme, torch.tensor([[[-0.3, 0.45]]]), module_name="layer")
    scale = torch.tensor(0.75 / 15).half().float()
    assert quantized.zeros.tolist() == [[6]]  # round(0.3 / 0.05)
    assert torch.equal(quantized.scales, scale.reshape(1, 1))
    assert quantized.codes.tolist() == [[0, 0, 6, 10, 15, 15, 8, 4]]
    decoded = quantized.dequantize()
    assert torch.equal(decoded, scale * (quantized.codes - 6).float())
    assert decoded[0, 0] == decoded[0, 1] and decoded[0, 4] == decoded[0, 5]  # clamped to the ends


@pytest.mark.parametrize("bits", [4, 3, 2])
def test_searched_ranges_decode_within_the_storable_grid(bits):
    x = _inputs(tokens=512, in_features=128, outliers=0)
    weight = _heavy_tailed_weight()
    scheme = QuantScheme(bits=bits, group_size=64, symmetric=False)
    quantized = awq_quantize(weight, scheme, awq_search_clip(x, weight, scheme), module_name="layer")
    maxq = max_code(bits)
    assert int(quantized.codes.min()) >= 0 and int(quantized.codes.max()) <= maxq
    assert int(quantized.zeros.min()) >= 1 and int(quantized.zeros.max()) <= maxq
    assert torch.equal(quantized.scales, quantized.scales.half().float())
    groups = quantized.g_idx.long()
    expected = quantized.scales[:, groups] * (quantized.codes - quantized.zeros[:, groups]).float()
    assert torch.equal(quantized.dequantize(), expected)


def _tiny_llama(num_key_value_heads):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=num_key_value_heads, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    layer = model.model.layers[0]
    with torch.no_grad():  # salient channels, so AWQ picks scales far from 1
        layer.input_layernorm.weight[:4] = 20.0
        layer.post_attention_layernorm.weight[-4:] = 20.0
    return model


def _group_inputs(model, adapter, ids):
    layer = adapter.decoder_layers(model)[0]
    inputs, hooks = {}, []
    for group in adapter.linear_groups(layer):
        def keep(module, args, name=group.name):
            inputs[name] = args[0].reshape(-1, args[0].shape[-1]).detach().clone()

        hooks.append(layer.get_submodule(group.linears[0]).register_forward_pre_hook(keep))
    with torch.no_grad():
        model(ids)
    for hook in hooks:
        hook.remove()
    return inputs


@pytest.mark.parametrize("num_key_value_heads", [4, 2])
def test_folding_the_searched_scales_leaves_the_float_model_unchanged(num_key_value_heads):
    model = _tiny_llama(num_key_value_heads)
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.model(ids).last_hidden_state
    inputs = _group_inputs(model, adapter, ids)
    scheme = QuantScheme(bits=4, group_size=32)
    found = {}
    for group in adapter.linear_groups(layer):
        if group.prev is not None:
            weights = [weight_out_in(layer.get_submodule(name)) for name in group.linears]
            found[group.name] = awq_search_scales(inputs[group.name], weights, scheme)
    assert any(report["scaled"] for _, report in found.values())
    for group in adapter.linear_groups(layer):
        if group.name in found:
            fold_input_scales(layer, group, found[group.name][0], adapter)
    with torch.no_grad():
        after = model.model(ids).last_hidden_state
    assert torch.linalg.norm(after - before) <= 1e-5 * torch.linalg.norm(before)


def test_config_rejects_bad_values_with_a_clear_message():
    with pytest.raises(QuantkitError, match="grid must be a positive integer"):
        AWQConfig(grid=0)
    with pytest.raises(QuantkitError, match=r"clip_max_shrink must be a number in \[0, 1\)"):
        AWQConfig(clip_max_shrink=1.0)
    with pytest.raises(QuantkitError, match="duo_scaling must be true or false"):
        AWQConfig(duo_scaling="yes")
    assert AWQConfig().clip_ratios()[0] == 1.0 and len(AWQConfig().clip_ratios()) == 20
    assert AWQConfig(grid=4).alphas() == [0.0, 0.25, 0.5, 0.75]


def test_mismatched_shapes_and_group_sizes_are_refused():
    x = torch.randn(16, 64)
    with pytest.raises(ValueError, match="does not read inputs of 64 channels"):
        awq_search_scales(x, [torch.randn(8, 32)], QuantScheme(group_size=32))
    with pytest.raises(QuantkitError, match="group size 48 does not divide"):
        awq_search_scales(x, [torch.randn(8, 64)], QuantScheme(group_size=48))
    with pytest.raises(ValueError, match="clip ranges of 'layer' have shape"):
        awq_quantize(torch.randn(8, 64), QuantScheme(group_size=32), torch.zeros(8, 2), module_name="layer")


@pytest.mark.gpu
def test_cuda_search_matches_cpu():
    x = _inputs(tokens=1024, in_features=128)
    weights = _weights([(64, 128)])
    scheme = QuantScheme(bits=4, group_size=64, symmetric=False)
    cpu_scales, cpu_report = awq_search_scales(x, weights, scheme)
    gpu_scales, gpu_report = awq_search_scales(x.cuda(), [w.cuda() for w in weights], scheme)
    assert gpu_scales.is_cuda and gpu_report["alpha"] == cpu_report["alpha"]
    assert torch.allclose(gpu_scales.cpu(), cpu_scales, rtol=1e-5)
    folded = weights[0] * cpu_scales
    cpu_ranges = awq_search_clip(x / cpu_scales, folded, scheme)
    gpu_ranges = awq_search_clip((x / cpu_scales).cuda(), folded.cuda(), scheme)
    assert torch.allclose(gpu_ranges.cpu(), cpu_ranges)


@pytest.mark.parametrize("symmetric", [True, False])
def test_statistics_accumulated_batch_by_batch_choose_what_the_inputs_choose(symmetric):
    x = _inputs(tokens=600)
    weights = _weights([(64, 128), (32, 128)])
    scheme = QuantScheme(bits=4, group_size=32, symmetric=symmetric)
    stats = ActivationStats(128)
    for chunk in x.split(70):
        stats.add_batch(chunk)
    assert stats.tokens == 600
    torch.testing.assert_close(stats.abs_mean, x.abs().mean(0))
    scales, report = awq_search_scales(x, weights, scheme)
    from_stats, report_from_stats = awq_search_scales_from_stats(stats, weights, scheme)
    assert report["scaled"] and report_from_stats["alpha"] == report["alpha"]
    torch.testing.assert_close(from_stats, scales)
    folded = weights[0] * scales
    torch.testing.assert_close(awq_search_clip_from_stats(stats, folded, scheme, scales=scales),
                               awq_search_clip(x / scales, folded, scheme))
