"""Data-parallel calibration on the CPU: two gloo ranks give the Hessians and the quantized
weights of one process that saw all the samples."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_pipeline import calibration, tiny_llama

from quantkit.models.adapters import get_adapter
from quantkit.pipeline import gptq_step, quantize_model
from quantkit.pipeline.data_parallel import DataParallel, shard_samples
from quantkit.quant.hessian import HessianAccumulator
from quantkit.recipe import weight_quant_recipe

WORLD = 2
RECIPES = {"gptq": {}, "awq": {}, "gptq-split": {}}  # gptq-split: each rank solves half of every linear's rows


def _recipe(method):
    method = method.removesuffix("-split")
    return weight_quant_recipe("w4a16", group_size=32, method=method, symmetric=method != "awq")


def _worker(rank, rendezvous, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        group = DataParallel.current()
        samples = shard_samples(calibration(16, 64), rank, WORLD)
        x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
        accumulator = HessianAccumulator(32)
        accumulator.add_batch(shard_samples(x, rank, WORLD))
        accumulator.all_reduce(group)
        results = {"hessian": accumulator.hessian, "tokens": accumulator.num_tokens}
        for method in RECIPES:
            gptq_step.SPLIT_SOLVE_MIN_ROWS_PER_RANK = 1 if method.endswith("-split") else None
            model = tiny_llama()
            result = quantize_model(model, get_adapter(model), _recipe(method), samples=samples, batch_size=4,
                                    data_parallel=group)
            results[method] = {name: (q.codes, q.scales, q.zeros) for name, q in result.quantized.items()}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(300)
def test_two_ranks_equal_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    whole = HessianAccumulator(32)
    whole.add_batch(x)
    for got in ranks:
        assert got["tokens"] == 64
        # one 64-row product against two 32-row ones: float32 rounding of the products only
        torch.testing.assert_close(got["hessian"], whole.hessian, rtol=1e-5, atol=1e-6 * float(whole.hessian.abs().max()))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same GEMM kernels, so the same rounding
    try:
        alone = {}
        for method in ("gptq", "awq"):
            model = tiny_llama()
            alone[method] = quantize_model(model, get_adapter(model), _recipe(method), samples=calibration(16, 64),
                                           batch_size=4).quantized
    finally:
        torch.set_num_threads(threads)
    alone["gptq-split"] = alone["gptq"]
    for method in RECIPES:
        for name, qweight in alone[method].items():
            for got in ranks:
                codes, scales, zeros = got[method][name]
                assert torch.equal(codes, qweight.codes), (method, name)
                assert torch.equal(scales, qweight.scales) and torch.equal(zeros, qweight.zeros), (method, name)
