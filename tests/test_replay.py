"""Cheap calibration passes (pipeline/replay.py): early stops and replayed outputs change nothing."""

import pytest
import torch
from test_pipeline import calibration, tiny_llama

from quantkit.models.adapters import get_adapter
from quantkit.pipeline import quantize_model
from quantkit.pipeline.capture import capture_first_layer_inputs, run_layer
from quantkit.pipeline.replay import ReplayCache
from quantkit.recipe import weight_quant_recipe

CPU = torch.device("cpu")


def layer_and_batches(n=6, length=32, batch_size=2):
    model = tiny_llama()
    batches = capture_first_layer_inputs(model, model.model.layers, calibration(n, length), device=CPU,
                                         batch_size=batch_size, storage=CPU)
    layer = model.model.layers[0]
    groups = [group.linears for group in get_adapter(model).linear_groups(layer)]
    return layer, batches, groups


def count_calls(layer):
    calls = {}
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    return calls


def test_final_modules_follow_the_finished_prefix_of_groups():
    layer, _batches, groups = layer_and_batches()
    cache = ReplayCache(layer, groups, budget_bytes=1 << 30)
    expected = [[], ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn"],
                ["self_attn", "mlp.gate_proj", "mlp.up_proj"], ["self_attn", "mlp"]]
    for finished, want in enumerate(expected):
        cache.finished_groups = finished
        assert cache.final_modules() == want


def test_replayed_passes_give_the_same_outputs_and_skip_the_recorded_work():
    layer, batches, groups = layer_and_batches()
    want = [run_layer(layer, batch, CPU) for batch in batches]
    cache = ReplayCache(layer, groups, budget_bytes=1 << 30)
    run = lambda batch: run_layer(layer, batch, CPU)
    cache.finished_groups = 2
    cache.run(batches, run)  # records self_attn
    calls = count_calls(layer)
    got = cache.run(batches, run)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    assert "self_attn.q_proj" not in calls and "self_attn.o_proj" not in calls
    assert calls == {"mlp.gate_proj": 3, "mlp.up_proj": 3, "mlp.down_proj": 3}


def test_stop_before_observes_the_input_and_runs_nothing_after():
    layer, batches, groups = layer_and_batches()
    seen = []
    layer.mlp.gate_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    calls = count_calls(layer)
    results = ReplayCache(layer, groups, budget_bytes=0).run(
        batches, lambda batch: run_layer(layer, batch, CPU), stop_before=[layer.mlp.gate_proj])
    assert results == [None] * 3 and len(seen) == 3
    assert "mlp.gate_proj" not in calls and "mlp.down_proj" not in calls and calls["self_attn.o_proj"] == 3


def test_recordings_respect_the_budget():
    layer, batches, groups = layer_and_batches()
    one_output = 2 * 32 * 128 * 4  # a batch's self_attn output, float32
    cache = ReplayCache(layer, groups, budget_bytes=3 * one_output - 1)
    cache.finished_groups = 2
    cache.run(batches, lambda batch: run_layer(layer, batch, CPU))
    assert cache.cached_bytes == 0
    cache.budget_bytes = 3 * one_output
    cache.run(batches, lambda batch: run_layer(layer, batch, CPU))
    assert cache.cached_bytes == 3 * one_output


@pytest.mark.parametrize("method,options", [("gptq", {}), ("gptq", {"act_order": True}), ("awq", {})])
def test_quantization_is_identical_with_and_without_replay(method, options):
    samples = calibration(8, 64)
    results = []
    for budget in (0, 1 << 30):
        model = tiny_llama()
        recipe = weight_quant_recipe("w4a16", group_size=32, method=method, options=options)
        result = quantize_model(model, get_adapter(model), recipe, samples=samples, batch_size=4,
                                replay_budget_bytes=budget)
        results.append(result.quantized)
    for name, qweight in results[0].items():
        assert torch.equal(qweight.codes, results[1][name].codes), name
        assert torch.equal(qweight.scales, results[1][name].scales), name
