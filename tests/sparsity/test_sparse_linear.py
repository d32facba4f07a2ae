"""The runtime's 2:4 dispatch: semi-structured sparse kernels on a GPU, the dense weight elsewhere."""

import pytest
import torch
from torch import nn

from quantkit.runtime.runtime_linear import RuntimeLinear, runtime_linears
from quantkit.runtime.sparse_linear import (
    ENV_SWITCH,
    _is_2of4,
    semi_structured_unsupported,
)
from quantkit.sparsity.masks import follows_nm, nm_keep_mask


def linear_2of4(out_features=128, in_features=256, seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        layer.weight.mul_(nm_keep_mask(layer.weight.abs(), 2, 4))
    return layer.to(device, dtype)


def test_cpu_keeps_the_dense_weight_and_computes_the_same():
    layers = [linear_2of4(seed=0), linear_2of4(seed=1)]
    fused = runtime_linears(layers, torch.float32, torch.device("cpu"))
    assert fused.sparse is None and fused.weight is not None and fused.out_features == 256
    assert semi_structured_unsupported(fused.weight) == "not on a CUDA device"
    x = torch.randn(3, 5, 256)
    torch.testing.assert_close(fused(x), torch.cat([layer(x) for layer in layers], -1))


def test_the_switch_and_the_pattern_check(monkeypatch):
    weight = linear_2of4().weight.detach()
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert semi_structured_unsupported(weight) == f"{ENV_SWITCH} is off"
    dense = torch.randn(64, 32)
    assert _is_2of4(weight, rows_per_chunk=16) and follows_nm(weight, 2, 4)
    assert not _is_2of4(dense, rows_per_chunk=16)
    mixed = weight.clone()
    mixed[-1] = 1.0  # only the last block breaks the pattern
    assert not _is_2of4(mixed, rows_per_chunk=16)
    with pytest.raises(ValueError, match="exactly one"):
        RuntimeLinear(weight=weight, sparse=weight)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_runs_2of4_weights_on_the_sparse_kernels(dtype):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no sparse tensor cores")
    layers = [linear_2of4(512, 1024, seed=s, dtype=dtype, device="cuda") for s in (0, 1)]
    fused = runtime_linears(layers, dtype, torch.device("cuda"))
    assert fused.sparse is not None and fused.weight is None and fused.out_features == 1024
    for shape in ((1, 1024), (7, 1024), (3, 40, 1024)):
        x = torch.randn(shape, device="cuda", dtype=dtype)
        want = torch.cat([torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
                          for layer in layers], -1)
        torch.testing.assert_close(fused(x).float(), want, rtol=2e-2, atol=2e-2)
    dense = runtime_linears([nn.Linear(1024, 512).to("cuda", dtype)], dtype, torch.device("cuda"))
    assert dense.sparse is None  # not 2:4: stays dense
    fp32 = runtime_linears([linear_2of4(512, 1024, device="cuda")], torch.float32, torch.device("cuda"))
    assert fp32.sparse is None  # the float32 kernels are 1:2, not 2:4


@pytest.mark.gpu
def test_gpu_sparse_linear_replays_in_a_cuda_graph():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no sparse tensor cores")
    fused = runtime_linears([linear_2of4(512, 1024, dtype=torch.float16, device="cuda")], torch.float16,
                            torch.device("cuda"))
    x = torch.randn(8, 1024, device="cuda", dtype=torch.float16)
    want = fused(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fused(x)  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, fused(x))
    assert not torch.equal(out, want)
