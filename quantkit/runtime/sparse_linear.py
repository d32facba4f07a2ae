"""2:4 linear layers on PyTorch's semi-structured sparse kernels.

A checkpoint pruned to 2:4 (``sparsity_config.sparsity_structure: "2:4"``) is stored dense, and
its weights have at most two non-zeros in every four inputs. On an NVIDIA GPU of compute
capability 8.0 or newer, ``torch.sparse.to_sparse_semi_structured`` compresses such a weight to
its non-zeros plus 2-bit position metadata, and ``F.linear`` with it runs the sparse tensor-core
GEMM (CUTLASS or cuSPARSELt, whichever that PyTorch build picks); the result equals the dense
product up to the order of float additions. Half the weight bytes move.

``semi_structured_weight`` makes that decision for one (possibly fused) weight: it returns the
compressed weight when the device, the dtype (float16 or bfloat16: the float32 kernels are 1:2,
not 2:4), the shape (PyTorch's minimum multiples) and the pattern itself allow it, and None
otherwise, so the caller keeps the dense weight (always, on the CPU). The pattern is read from
the weights themselves: a checkpoint whose config says 2:4 has it, and any other weight that
happens to follow it computes identically either way. ``QUANTKIT_SPARSE_24=0`` turns the sparse
path off (for example to compare speeds in one process).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from quantkit.sparsity.masks import follows_nm

ENV_SWITCH = "QUANTKIT_SPARSE_24"
HALF_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)


def sparse_24_enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


def semi_structured_unsupported(weight: torch.Tensor) -> str | None:
    """Why ``weight`` (out, in) cannot run on the 2:4 kernels here, or None when it can."""
    if not sparse_24_enabled():
        return f"{ENV_SWITCH} is off"
    if weight.device.type != "cuda":
        return "not on a CUDA device"
    if weight.dtype not in HALF_DTYPES:
        return f"dtype {weight.dtype} (the 2:4 kernels take float16 or bfloat16)"
    if torch.cuda.get_device_capability(weight.device) < MIN_CAPABILITY:
        return "the GPU has no sparse tensor cores (compute capability below 8.0)"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this PyTorch has no semi-structured sparse tensors"
    rows, cols = weight.shape
    limits = _shape_limits(weight.dtype)
    if rows % limits[0] or cols % limits[1]:
        return f"shape {tuple(weight.shape)} is not a multiple of {limits}"
    if not _is_2of4(weight):
        return "the weight is not 2:4 sparse"
    return None


def semi_structured_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight compressed for the 2:4 kernels, or None to keep it dense."""
    if semi_structured_unsupported(weight) is not None:
        return None
    try:
        return torch.sparse.to_sparse_semi_structured(weight.contiguous())
    except (RuntimeError, NotImplementedError):  # a build or GPU without the kernels: stay dense
        return None


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a compressed ``weight``, any leading shape of ``x``."""
    return F.linear(x.contiguous(), weight, bias)


def _is_2of4(weight: torch.Tensor, rows_per_chunk: int = 4096) -> bool:
    """``follows_nm(weight, 2, 4)`` a block of rows at a time, stopping at the first dense block
    (an LM head of 128k rows costs one block, not gigabytes of temporaries)."""
    return all(follows_nm(block, 2, 4) for block in weight.split(rows_per_chunk))


def _shape_limits(dtype: torch.dtype) -> tuple[int, int]:
    """The (rows, cols) multiples every semi-structured backend of this PyTorch accepts for ``dtype``."""
    rows, cols = 32, 64
    for name in ("SparseSemiStructuredTensorCUTLASS", "SparseSemiStructuredTensorCUSPARSELT"):
        backend = getattr(torch.sparse, name, None)
        limits = getattr(backend, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
        if limits is not None:
            rows, cols = max(rows, limits.sparse_min_rows), max(cols, limits.sparse_min_cols)
    return rows, cols
