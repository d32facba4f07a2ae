"""Pruning on the layer-by-layer pipeline: exact sparsity per linear, N:M patterns, SparseGPT
closer to the dense model than magnitude pruning, data-parallel ranks equal one process."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_pipeline import calibration, tiny_llama

from quantkit.models.adapters import get_adapter
from quantkit.pipeline import quantize_model
from quantkit.pipeline.data_parallel import DataParallel, shard_samples
from quantkit.quant.weights import weight_out_in
from quantkit.recipe import recipe_from_dict
from quantkit.sparsity.masks import follows_nm
from quantkit.sparsity.targets import sparsity_report


def prune(step: dict, model=None, samples=None, **options):
    model = model or tiny_llama()
    recipe = recipe_from_dict({"steps": [step]})
    result = quantize_model(model, get_adapter(model), recipe, samples=calibration(16, 64) if samples is None else samples,
                            batch_size=4, **options)
    return model, recipe.steps[0], result


def logits_error(model, reference, ids):
    with torch.no_grad():
        return (model(input_ids=ids).logits - reference(input_ids=ids).logits).pow(2).mean().item()


STEPS = {
    "magnitude": {"method": "magnitude"},
    "magnitude-row": {"method": "magnitude", "comparison": "row"},
    "wanda": {"method": "wanda"},
    "wanda-seq": {"method": "wanda", "true_sequential": True},
    "sparsegpt": {"method": "sparsegpt"},
    "sparsegpt-parallel": {"method": "sparsegpt", "true_sequential": False},
    "magnitude-2:4": {"method": "magnitude", "mask_structure": "2:4"},
    "wanda-4:8": {"method": "wanda", "mask_structure": "4:8"},
    "sparsegpt-2:4": {"method": "sparsegpt", "mask_structure": "2:4"},
}


@pytest.mark.parametrize("name", STEPS)
def test_every_linear_is_pruned_exactly(name):
    model, step, result = prune(STEPS[name])
    report = sparsity_report(model, get_adapter(model), step.structure(), step.sparsity, step.target_scheme())
    assert len(report.linears) == 14 and report.ignored == ["lm_head"]
    for row in report.linears:
        assert row.zeros == row.total // 2, (row.name, row.zeros, row.total)  # 50% of every linear exactly
        assert row.follows_structure
    if step.structure().is_nm:
        n, m = step.structure().n, step.structure().m
        assert all(follows_nm(weight_out_in(model.get_submodule(r.name)), n, m) for r in report.linears)
    assert model.lm_head.weight.count_nonzero() == model.lm_head.weight.numel()
    assert result.quantized == {} and all(0 < e < 1 for layer in result.layers for e in layer.errors.values())
    assert set(report.per_layer()[0]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_sparsegpt_stays_closest_to_the_dense_model():
    reference, held_out = tiny_llama(), calibration(4, 64, seed=1)
    errors = {name: logits_error(prune(STEPS[name])[0], reference, held_out)
              for name in ("magnitude", "sparsegpt", "magnitude-2:4", "sparsegpt-2:4")}
    # (random weights have no outlier input channels, so Wanda's edge over magnitude is not tested here)
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"], errors
    assert errors["sparsegpt-2:4"] < 0.8 * errors["magnitude-2:4"], errors


def test_sparsegpt_quantizes_the_survivors_in_one_pass():
    step = {"method": "sparsegpt", "mask_structure": "2:4", "scheme": "w4a16", "group_size": 32}
    model, _step, result = prune(step)
    assert len(result.quantized) == 14
    for name, qweight in result.quantized.items():
        represented = qweight.dequantize()
        torch.testing.assert_close(weight_out_in(model.get_submodule(name)), represented)
        assert follows_nm(represented, 2, 4)
        assert (represented == 0).float().mean() >= 0.5


def test_ignore_list_and_recipe_fit_checks():
    from quantkit.errors import QuantkitError
    from quantkit.pipeline import check_recipe_fits

    model, _step, _result = prune({"method": "magnitude", "ignore": ["lm_head", "re:.*down_proj"]})
    assert model.model.layers[0].mlp.down_proj.weight.count_nonzero() == 128 * 256
    assert (model.model.layers[0].mlp.up_proj.weight == 0).sum() == 128 * 256 // 2
    model = tiny_llama()
    recipe = recipe_from_dict({"steps": [{"method": "sparsegpt", "mask_structure": "2:4", "scheme": "w4a16",
                                          "group_size": 96}]})
    with pytest.raises(QuantkitError, match="group size 96 does not divide"):
        check_recipe_fits(model, get_adapter(model), recipe)
    recipe = recipe_from_dict({"steps": [{"method": "wanda", "ignore": ["re:.*"]}]})
    with pytest.raises(QuantkitError, match="leaves no decoder linear"):
        check_recipe_fits(model, get_adapter(model), recipe)


WORLD = 2
DP_STEPS = ("wanda-seq", "sparsegpt-2:4")


def _worker(rank, rendezvous, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        group = DataParallel.current()
        samples = shard_samples(calibration(16, 64), rank, WORLD)
        results = {}
        for name in DP_STEPS:
            model, _step, _result = prune(STEPS[name], samples=samples, data_parallel=group)
            results[name] = {k: v for k, v in model.state_dict().items() if "layers" in k}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_ranks_prune_like_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in DP_STEPS:
            alone = prune(STEPS[name])[0].state_dict()
            for got in ranks:
                for key, tensor in got[name].items():
                    # the statistics are float64 sums on the CPU, so the masks agree exactly
                    assert torch.equal(tensor == 0, alone[key] == 0), (name, key)
                    torch.testing.assert_close(tensor, alone[key], rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(threads)
