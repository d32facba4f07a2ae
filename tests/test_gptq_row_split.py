"""GPTQ treats output rows independently given the Hessian, so data-parallel ranks may each solve
a block of rows (``pipeline/gptq_step.py``): blocks solved apart and joined must be exactly the
whole matrix solved at once, on the CPU and (marked ``gpu``) on a GPU, where cuBLAS picks its
kernels by shape."""

import pytest
import torch

from quantkit.quant.gptq import GPTQConfig, gptq_quantize, prepare_hessian
from quantkit.quant.scheme import QuantScheme

CONFIGS = {
    "default": GPTQConfig(),
    "act-order": GPTQConfig(act_order=True),
    "act-order static": GPTQConfig(act_order=True, static_groups=True),
    "no clip": GPTQConfig(clip_search=False),
}


def _problem(rows, cols, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=gen) * 0.02
    x = torch.randn(4 * cols, cols, generator=gen) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=gen))
    hessian = 2 * x.t() @ x / x.shape[0]
    hessian[:, 3] = hessian[3, :] = 0  # a dead input
    return weight.to(device), hessian.to(device)


def _check_blocks_equal_whole(rows, cols, device, blocks, scheme, config):
    weight, hessian = _problem(rows, cols, device)
    whole, _ = gptq_quantize(weight, hessian, scheme, config)
    prepared = prepare_hessian(hessian, scheme, config)  # as the pipeline shares it between linears
    for shared in (hessian, prepared):
        parts = [gptq_quantize(block, shared, scheme, config)[0] for block in weight.tensor_split(blocks)]
        assert torch.equal(torch.cat([p.codes for p in parts]), whole.codes)
        assert torch.equal(torch.cat([p.scales for p in parts]), whole.scales)
        assert torch.equal(torch.cat([p.zeros for p in parts]), whole.zeros)
        assert all(torch.equal(p.g_idx, whole.g_idx) for p in parts)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("scheme", [QuantScheme(bits=4, group_size=64), QuantScheme(bits=4, group_size=-1, symmetric=False)],
                         ids=["g64", "per-channel-asym"])
def test_row_blocks_solved_apart_equal_the_whole(name, scheme):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each data-parallel rank in the tests
    try:
        _check_blocks_equal_whole(300, 256, "cpu", 3, scheme, CONFIGS[name])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.gpu
@pytest.mark.parametrize("blocks", [2, 4])
@pytest.mark.parametrize("name", ["default", "act-order"])
def test_row_blocks_solved_apart_equal_the_whole_on_a_gpu(name, blocks):
    # Llama-3-70B's k_proj width and a block count per GPU count
    _check_blocks_equal_whole(1024, 2048, "cuda", blocks, QuantScheme(bits=4, group_size=128), CONFIGS[name])
