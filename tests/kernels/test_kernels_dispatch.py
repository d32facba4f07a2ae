"""The dispatchers: reference on CPU tensors, QUANTKIT_KERNELS overrides, quantkit imports without triton."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from kernel_cases import INTERPRET, needs_triton, paged_batch, quantized_case

from quantkit import kernels


@pytest.fixture
def spy(monkeypatch):
    """Record which implementation each dispatcher runs."""
    from quantkit.kernels import dispatch

    calls = []
    for name in (
        "write_kv_reference",
        "paged_attention_reference",
        "quantized_linear_reference",
    ):
        original = getattr(dispatch, name)
        monkeypatch.setattr(
            dispatch,
            name,
            lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k),
        )
    return calls


def _run_all():
    batch = paged_batch([3, 1], [3, 9])
    kernels.paged_attention(*batch.args(), 0.5)
    k = batch.k_cache[0, :2]
    kernels.write_kv(k, k, batch.k_cache, batch.v_cache, torch.tensor([0, -1]))
    case = quantized_case(16, 32, 16, 4)
    kernels.quantized_linear(torch.randn(2, 32), case.pack())


def test_cpu_tensors_use_the_reference(monkeypatch, spy):
    monkeypatch.delenv("QUANTKIT_KERNELS", raising=False)
    _run_all()
    assert sorted(spy) == [
        "paged_attention_reference",
        "quantized_linear_reference",
        "write_kv_reference",
    ]


def test_reference_mode_forces_the_reference(monkeypatch):
    monkeypatch.setenv("QUANTKIT_KERNELS", "reference")
    assert not kernels.use_triton(torch.zeros(1))


def test_unknown_mode_is_an_error(monkeypatch):
    monkeypatch.setenv("QUANTKIT_KERNELS", "fast")
    with pytest.raises(ValueError, match="QUANTKIT_KERNELS"):
        kernels.use_triton(torch.zeros(1))


@needs_triton
@pytest.mark.skipif(
    not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1"
)
def test_triton_mode_runs_triton_on_cpu_tensors(monkeypatch, spy):
    monkeypatch.setenv("QUANTKIT_KERNELS", "triton")
    _run_all()
    assert spy == []


def test_triton_entry_points_are_exposed():
    if not kernels.triton_available():
        pytest.skip("triton is not installed")
    assert callable(kernels.paged_attention_triton)
    assert callable(kernels.write_kv_triton)
    assert callable(kernels.quantized_linear_triton)


def test_quantkit_kernels_import_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, quantkit.kernels as k\n"
        "assert not k.triton_available() and not k.use_triton(torch.zeros(1))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
