"""The runtime's 2:4 dispatch: semi-structured sparse kernels on a GPU, the dense weight elsewhere."""

import warnings
from collections import namedtuple
from typing import ClassVar

import pytest
import torch
from torch import nn

from quantkit.runtime import sparse_linear as sl
from quantkit.runtime.runtime_linear import RuntimeLinear, runtime_linears
from quantkit.runtime.sparse_linear import (
    ENV_SWITCH,
    _is_2of4,
    backend_order,
    chosen_backend,
    compress_2of4,
    probe_backend,
    probe_errors,
    semi_structured_unsupported,
    semi_structured_weight,
    sparse_linear,
)
from quantkit.sparsity.masks import follows_nm, nm_keep_mask

Limits = namedtuple("Limits", "sparse_min_rows sparse_min_cols dense_min_rows dense_min_cols")


@pytest.fixture(autouse=True)
def _fresh_backend_cache():
    sl.reset_backend_cache()
    yield
    sl.reset_backend_cache()


def linear_2of4(out_features=128, in_features=256, seed=0, dtype=torch.float32, device="cpu"):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        layer.weight.mul_(nm_keep_mask(layer.weight.abs(), 2, 4))
    return layer.to(device, dtype)


def test_cpu_keeps_the_dense_weight_and_computes_the_same(sparse_on):
    layers = [linear_2of4(seed=0), linear_2of4(seed=1)]
    fused = runtime_linears(layers, torch.float32, torch.device("cpu"))
    assert fused.sparse is None and fused.weight is not None and fused.out_features == 256
    assert semi_structured_unsupported(fused.weight) == "not on a CUDA device"
    x = torch.randn(3, 5, 256)
    torch.testing.assert_close(fused(x), torch.cat([layer(x) for layer in layers], -1))


@pytest.fixture
def sparse_on(monkeypatch):
    """The 2:4 kernels switched on (they are off by default: slower than dense where measured)."""
    monkeypatch.setenv(ENV_SWITCH, "1")


def test_the_switch_is_off_by_default_and_strict(monkeypatch):
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    assert not sl.sparse_24_enabled()
    for value, want in (("1", True), ("on", True), (" TRUE ", True), ("yes", True),
                        ("0", False), ("off", False), ("false", False), ("no", False), ("", False)):
        monkeypatch.setenv(ENV_SWITCH, value)
        assert sl.sparse_24_enabled() is want, value
    monkeypatch.setenv(ENV_SWITCH, "auto")
    with pytest.raises(ValueError, match=f"{ENV_SWITCH}='auto' is not one of"):
        sl.sparse_24_enabled()


def test_the_switch_and_the_pattern_check(monkeypatch):
    weight = linear_2of4().weight.detach()
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    assert semi_structured_unsupported(weight).startswith(f"{ENV_SWITCH} is off (the default")
    monkeypatch.setenv(ENV_SWITCH, "0")
    assert semi_structured_unsupported(weight).startswith(f"{ENV_SWITCH} is off")
    monkeypatch.setenv(ENV_SWITCH, "1")
    assert semi_structured_unsupported(weight) == "not on a CUDA device"
    dense = torch.randn(64, 32)
    assert _is_2of4(weight, rows_per_chunk=16) and follows_nm(weight, 2, 4)
    assert not _is_2of4(dense, rows_per_chunk=16)
    mixed = weight.clone()
    mixed[-1] = 1.0  # only the last block breaks the pattern
    assert not _is_2of4(mixed, rows_per_chunk=16)
    with pytest.raises(ValueError, match="exactly one"):
        RuntimeLinear(weight=weight, sparse=weight)


@pytest.mark.parametrize("capability, has_cusparselt, want", [
    ((7, 5), True, []),  # no sparse tensor cores
    ((8, 0), True, ["cutlass", "cusparselt"]),
    ((8, 6), False, ["cutlass"]),
    ((8, 9), True, ["cutlass", "cusparselt"]),
    ((9, 0), True, ["cusparselt"]),  # Hopper: CUTLASS's sparse kernels are built for 8.x only
    ((9, 0), False, []),
    ((10, 0), True, ["cusparselt"]),
])
def test_backend_order_follows_the_capability(capability, has_cusparselt, want):
    assert backend_order(capability, has_cusparselt) == want


def fake_gpu(monkeypatch, capability, has_cusparselt, failing=()):
    """A GPU of ``capability`` on which the backends in ``failing`` raise; returns the probe log."""
    probed = []

    def probe(name, device, dtype):
        probed.append((name, str(device), dtype))
        return f"RuntimeError: {name} broken here" if name in failing else None

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(sl, "cusparselt_available", lambda: has_cusparselt)
    monkeypatch.setattr(sl, "probe_backend", probe)
    return probed


def test_hopper_takes_cusparselt_and_probes_once(monkeypatch):
    probed = fake_gpu(monkeypatch, (9, 0), True)
    assert chosen_backend("cuda:0", torch.bfloat16) == "cusparselt"
    assert chosen_backend(torch.device("cuda", 0), torch.bfloat16) == "cusparselt"
    assert probed == [("cusparselt", "cuda:0", torch.bfloat16)]  # cached per device and dtype
    assert chosen_backend("cuda:0", torch.float16) == "cusparselt"
    assert len(probed) == 2


def test_ampere_prefers_cutlass_and_falls_back_to_cusparselt(monkeypatch):
    fake_gpu(monkeypatch, (8, 0), True)
    assert chosen_backend("cuda:0", torch.float16) == "cutlass"
    sl.reset_backend_cache()
    probed = fake_gpu(monkeypatch, (8, 6), True, failing={"cutlass"})
    assert chosen_backend("cuda:0", torch.float16) == "cusparselt"
    assert [name for name, _, _ in probed] == ["cutlass", "cusparselt"]
    assert probe_errors("cuda:0", torch.float16) == {"cutlass": "RuntimeError: cutlass broken here"}


def test_no_working_backend_warns_once_and_keeps_layers_dense(monkeypatch):
    probed = fake_gpu(monkeypatch, (9, 0), True, failing={"cusparselt"})
    with pytest.warns(RuntimeWarning, match="2:4 sparse kernels unusable.*cusparselt broken here.*run dense"):
        assert chosen_backend("cuda:0", torch.bfloat16) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert chosen_backend("cuda:0", torch.bfloat16) is None  # cached: no second probe, no second warning
    assert len(probed) == 1
    fake_gpu(monkeypatch, (9, 0), False)
    with pytest.warns(RuntimeWarning, match="no backend to try"):
        assert chosen_backend("cuda:1", torch.bfloat16) is None


def test_a_probe_that_raises_reports_instead_of_crashing():
    error = probe_backend("cutlass", "cpu", torch.float16)  # the kernels are CUDA-only
    assert error is not None and error.startswith("RuntimeError")


class FakeBackend:
    """Stands in for a torch.sparse backend on the CPU: the 'compressed' weight is the dense one."""

    _DTYPE_SHAPE_CONSTRAINTS: ClassVar[dict] = {torch.float32: Limits(32, 64, 8, 8)}
    compressed: ClassVar[list] = []

    @classmethod
    def from_dense(cls, weight):
        cls.compressed.append(tuple(weight.shape))
        return weight.clone()


class BrokenBackend(FakeBackend):
    @classmethod
    def from_dense(cls, weight):
        raise RuntimeError("sparse_semi_structured_mad_op : Supported only on GPUs with compute capability 8.x")


def test_rows_are_padded_to_the_backend_multiple_and_sliced_off(monkeypatch):
    monkeypatch.setattr(sl, "backend_class", lambda name: FakeBackend)
    layer = linear_2of4(out_features=40, in_features=128)
    FakeBackend.compressed.clear()
    packed = compress_2of4(layer.weight.detach(), "fake")
    assert FakeBackend.compressed == [(64, 128)] and packed.shape == (40, 128) and packed.out_features == 40
    x = torch.randn(2, 3, 128)
    torch.testing.assert_close(sparse_linear(x, packed, layer.bias.detach()), layer(x).detach())
    torch.testing.assert_close(sparse_linear(x, packed, None), x @ layer.weight.detach().T)
    exact = compress_2of4(linear_2of4(out_features=64, in_features=128).weight.detach(), "fake")
    assert exact.tensor.shape == (64, 128)  # a multiple already: no padding


def test_a_compression_that_raises_keeps_the_layer_dense_with_one_warning(monkeypatch):
    monkeypatch.setattr(sl, "semi_structured_unsupported", lambda weight: None)
    monkeypatch.setattr(sl, "chosen_backend", lambda device, dtype: "broken")
    monkeypatch.setattr(sl, "backend_class", lambda name: BrokenBackend)
    weight = linear_2of4().weight.detach()
    with pytest.warns(RuntimeWarning, match="compression \\(broken\\) failed.*stays dense"):
        assert semi_structured_weight(weight) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert semi_structured_weight(weight) is None


def test_the_input_width_must_be_a_multiple_of_the_chosen_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(sl, "chosen_backend", lambda device, dtype: "fake")
    monkeypatch.setattr(sl, "backend_class", lambda name: FakeBackend)
    weight = linear_2of4(out_features=64, in_features=96).weight.detach()
    monkeypatch.setattr(sl, "HALF_DTYPES", (torch.float32,))

    class CudaLooking:  # the checks read device, dtype, dim and shape only, then the pattern
        device, dtype, shape = torch.device("cuda", 0), torch.float32, weight.shape

        def dim(self):
            return 2

        def split(self, rows):
            return weight.split(rows)

    monkeypatch.setenv(ENV_SWITCH, "1")
    assert semi_structured_unsupported(CudaLooking()) == "input width 96 is not a multiple of 64 (fake)"


def cuda_looking(weight):
    """``weight`` (a CPU tensor) as the dispatch sees a CUDA one: device, dtype, dim, shape, rows."""

    class CudaLooking:
        device, dtype, shape = torch.device("cuda", 0), weight.dtype, weight.shape

        def dim(self):
            return weight.dim()

        def split(self, rows):
            return weight.split(rows)

    return CudaLooking()


def test_a_gpu_keeps_2of4_weights_dense_unless_switched_on(monkeypatch):
    """On a (faked) Hopper GPU with a working backend a 2:4 weight stays dense by default -- no probe,
    no compression -- and takes the sparse kernels only with the switch on."""
    probed = fake_gpu(monkeypatch, (9, 0), True)
    monkeypatch.setattr(sl, "HALF_DTYPES", (torch.float32,))
    monkeypatch.setattr(sl, "backend_class", lambda name: FakeBackend)
    weight = linear_2of4(out_features=64, in_features=128).weight.detach()
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    assert semi_structured_unsupported(cuda_looking(weight)).startswith(f"{ENV_SWITCH} is off")
    FakeBackend.compressed.clear()
    assert semi_structured_weight(cuda_looking(weight)) is None
    assert probed == [] and FakeBackend.compressed == []
    monkeypatch.setenv(ENV_SWITCH, "1")
    assert semi_structured_unsupported(cuda_looking(weight)) is None
    assert probed == [("cusparselt", "cuda:0", torch.float32)]
    monkeypatch.setattr(sl, "semi_structured_unsupported", lambda w: None)  # compress the real CPU tensor
    packed = semi_structured_weight(weight)
    assert packed is not None and packed.backend == "cusparselt" and FakeBackend.compressed == [(64, 128)]
    x = torch.randn(3, 128)
    torch.testing.assert_close(RuntimeLinear(sparse=packed)(x), x @ weight.T)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_runs_2of4_weights_on_the_sparse_kernels(dtype, sparse_on):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("no sparse tensor cores")
    layers = [linear_2of4(512, 1024, seed=s, dtype=dtype, device="cuda") for s in (0, 1)]
    fused = runtime_linears(layers, dtype, torch.device("cuda"))
    assert fused.sparse is not None and fused.weight is None and fused.out_features == 1024
    assert fused.sparse.backend == chosen_backend(torch.device("cuda"), dtype)
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
def test_gpu_keeps_2of4_weights_dense_by_default(monkeypatch):
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    layer = linear_2of4(512, 1024, dtype=torch.bfloat16, device="cuda")
    fused = runtime_linears([layer], torch.bfloat16, torch.device("cuda"))
    assert fused.sparse is None and fused.weight is not None
    x = torch.randn(7, 1024, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(fused(x), layer(x))


@pytest.mark.gpu
def test_gpu_sparse_linear_replays_in_a_cuda_graph(sparse_on):
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


@pytest.mark.gpu
@pytest.mark.parametrize("out_features", [1024, 1000])  # 1000: rows padded to the backend's multiple
def test_gpu_chosen_backend_matches_the_dense_linear_in_bf16(out_features, sparse_on):
    capability = torch.cuda.get_device_capability()
    if capability < (8, 0):
        pytest.skip("no sparse tensor cores")
    backend = chosen_backend(torch.device("cuda"), torch.bfloat16)
    if capability[0] >= 9:
        assert backend in (None, "cusparselt")  # CUTLASS's kernels cannot run on Hopper
    if backend is None:
        pytest.skip(f"no working 2:4 backend here: {probe_errors(torch.device('cuda'), torch.bfloat16)}")
    layer = linear_2of4(out_features, 2048, dtype=torch.bfloat16, device="cuda")
    fused = runtime_linears([layer], torch.bfloat16, torch.device("cuda"))
    assert fused.sparse is not None and fused.sparse.backend == backend and fused.out_features == out_features
    for shape in ((1, 2048), (13, 2048), (2, 64, 2048)):
        x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(fused(x), layer(x), rtol=1.6e-2, atol=2e-2)
