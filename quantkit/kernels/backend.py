"""Which kernel implementation runs: Triton on CUDA tensors, the plain-torch reference elsewhere.

``QUANTKIT_KERNELS`` overrides the choice: ``reference`` always runs the reference (for
debugging a suspected kernel bug), ``triton`` always runs Triton (with ``TRITON_INTERPRET=1`` this
executes the kernels on CPU tensors), ``auto`` (the default) picks by device. Triton is optional:
it is imported only when a Triton path runs, so quantkit imports without it.
"""

from __future__ import annotations

import functools
import os

import torch

_MODES = ("auto", "reference", "triton")


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_mode() -> str:
    """The value of ``QUANTKIT_KERNELS`` (``auto`` when unset); ValueError for an unknown one."""
    mode = os.environ.get("QUANTKIT_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"QUANTKIT_KERNELS={mode!r} is not one of {', '.join(_MODES)}")
    return mode


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a kernel whose main operand is ``tensor`` should run its Triton implementation."""
    mode = kernel_mode()
    if mode == "reference":
        return False
    if mode == "triton":
        if not triton_available():
            raise RuntimeError(
                "QUANTKIT_KERNELS=triton but the triton package does not import"
            )
        return True
    return tensor.is_cuda and triton_available()


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: full float32 products for float32 inputs (tf32 keeps ~3 digits)."""
    return "ieee" if dtype == torch.float32 else "tf32"
