"""Data-parallel calibration of SmoothQuant, static W8A8 input scales and KV-cache scales: two gloo
ranks reduce their per-channel maxima with MAX (and the α search's errors with SUM) and produce
exactly the weights and scales of one process that saw every sample."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_pipeline import calibration, tiny_llama

from quantkit.models.adapters import get_adapter
from quantkit.pipeline import quantize_model
from quantkit.pipeline.data_parallel import DataParallel, shard_samples
from quantkit.recipe import recipe_from_dict

WORLD = 2
RECIPE = {"format": "compressed-tensors",
          "steps": [{"method": "smoothquant", "alpha_search": True, "alpha_grid": 4},
                    {"method": "w8a8", "activations": "static"}, {"method": "kv_cache", "type": "int"}]}


def _run(samples, group=None):
    model = tiny_llama()
    result = quantize_model(model, get_adapter(model), recipe_from_dict(RECIPE), samples=samples, batch_size=4,
                            data_parallel=group)
    out = {name: (r.weight, r.weight_scale, r.input_scale) for name, r in result.quantized.items()}
    for i, layer in enumerate(model.model.layers):
        out[f"kv{i}"] = (layer.self_attn.k_scale, layer.self_attn.v_scale)
    return out


def _worker(rank, rendezvous, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        torch.save(_run(shard_samples(calibration(16, 32), rank, WORLD), DataParallel.current()),
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    alone = _run(calibration(16, 32))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got.keys() == alone.keys()
        for name, tensors in alone.items():
            for a, b in zip(got[name], tensors):
                assert torch.equal(a.view(torch.int8) if a.dtype == torch.int8 else a, b), (rank, name)
