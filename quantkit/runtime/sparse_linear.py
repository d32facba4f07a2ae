"""2:4 linear layers on PyTorch's semi-structured sparse kernels.

A checkpoint pruned to 2:4 (``sparsity_config.sparsity_structure: "2:4"``) is stored dense, and
its weights have at most two non-zeros in every four inputs. On an NVIDIA GPU of compute
capability 8.0 or newer, PyTorch's semi-structured sparse tensors compress such a weight to its
non-zeros plus 2-bit position metadata, and ``F.linear`` with it runs a sparse tensor-core GEMM;
the result equals the dense product up to the order of float additions. Half the weight bytes move.

PyTorch has two backends, and which one works depends on the GPU, not only on the build:

* **CUTLASS** (``SparseSemiStructuredTensorCUTLASS``): its kernels are compiled for compute
  capability 8.x only; on Hopper (9.0) and later the matmul raises "Supported only on GPUs with
  compute capability 8.x" (the compression itself succeeds, so only a matmul finds out).
* **cuSPARSELt** (``SparseSemiStructuredTensorCUSPARSELT``, when
  ``torch.backends.cusparselt.is_available()``): NVIDIA's library, for 8.x and 9.0 and later.

``torch.sparse.to_sparse_semi_structured`` picks by a class flag (``_FORCE_CUTLASS``), whose
default changed between releases, so quantkit picks itself: on 8.x CUTLASS first, then cuSPARSELt;
elsewhere cuSPARSELt only. Each candidate is probed once per device and dtype with a tiny matmul
checked against the dense product (``chosen_backend``), and the answer is cached. When none works,
2:4 layers stay dense, with one warning; so does a layer whose compression raises.

``semi_structured_weight`` makes the decision for one (possibly fused) weight: it returns a
``SemiStructuredWeight`` when the device, the dtype (float16 or bfloat16: the float32 kernels are
1:2, not 2:4, and int8 weights take quantkit's W8A8 path), the shape and the pattern itself allow
it, and None otherwise, so the caller keeps the dense weight (always, on the CPU). Output rows are
padded with zero rows up to the backend's multiple (the extra outputs are sliced off); an input
width that is not a multiple keeps the layer dense, since padding the activations on every call
would cost more than the sparse kernel saves. The token count needs nothing: PyTorch pads it. The
pattern is read from the weights themselves: a checkpoint whose config says 2:4 has it, and any
other weight that happens to follow it computes identically either way.

**Off by default; ``QUANTKIT_SPARSE_24=1`` turns it on.** Measured on an H100 (torch 2.11+cu130,
cuSPARSELt, bf16, Llama-3-8B linear shapes; ``scripts/results/sparse_linear_h100.json``), the 2:4
linear is slower than the dense one almost everywhere the runtime would call it: 0.25-0.61x the
dense speed at 1-64 tokens in CUDA graphs (the runtime's decode steps), 0.37-1.38x at 256 tokens,
0.59-1.12x at 1,024, 0.96-1.21x at 4,096 and 1.02-1.12x at 16,384. Called eagerly (the runtime's
prefill), a sparse call took at least 0.66 ms whatever the token count (the dense one 21-59 us up
to 256 tokens), so it was 0.03-0.84x dense up to 4,096 tokens, and only the MLP linears gained at
16,384 tokens (1.05-1.16x). Dispatching by token count would keep the dense weight beside the
compressed one (about 1.56x the weight memory) for at most 16% on a few prefill linears, so the
runtime does not: the default is the dense weight, and the switch is for a user who wants the memory
(a compressed weight is about 0.56x the dense bytes) and accepts slower steps. ``QUANTKIT_SPARSE_24``
takes 1 / on / true / yes or 0 / off / false / no; anything else raises.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantkit.sparsity.masks import follows_nm, nm_keep_mask

ENV_SWITCH = "QUANTKIT_SPARSE_24"
HALF_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
BACKEND_CLASSES = {  # quantkit's name -> the class in torch.sparse
    "cutlass": "SparseSemiStructuredTensorCUTLASS",
    "cusparselt": "SparseSemiStructuredTensorCUSPARSELT",
}
DEFAULT_LIMITS = (32, 64)  # (rows, cols) multiples when a backend does not say
PROBE_SHAPE = (128, 256)  # (out, in) of the probe's linear

_chosen: dict[tuple[str, torch.dtype], str | None] = {}  # (device, dtype) -> backend, or None: none works
_probe_errors: dict[tuple[str, torch.dtype], dict[str, str]] = {}
_warned: set[str] = set()


@dataclass
class SemiStructuredWeight:
    """A 2:4 weight compressed for one backend; ``tensor`` may carry zero rows past ``out_features``."""

    tensor: torch.Tensor
    out_features: int
    backend: str

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.tensor.shape[1]))


ENV_ON = ("1", "on", "true", "yes")
ENV_OFF = ("", "0", "off", "false", "no")


def sparse_24_enabled() -> bool:
    """``QUANTKIT_SPARSE_24``: off unless set to 1 (or on / true / yes); the measured 2:4 kernels are
    slower than dense at decode sizes (see the module's docstring)."""
    value = os.environ.get(ENV_SWITCH, "0").strip().lower()
    if value in ENV_ON:
        return True
    if value in ENV_OFF:
        return False
    raise ValueError(f"{ENV_SWITCH}={value!r} is not one of {', '.join(ENV_ON + ENV_OFF[1:])}")


def cusparselt_available() -> bool:
    try:
        return bool(torch.backends.cusparselt.is_available())
    except Exception:  # noqa: BLE001 -- a build without the module
        return False


def backend_class(name: str):
    """The torch.sparse class of backend ``name``, or None when this PyTorch lacks it."""
    return getattr(torch.sparse, BACKEND_CLASSES[name], None)


def backend_order(capability: tuple[int, int], has_cusparselt: bool) -> list[str]:
    """The backends worth trying on a GPU of ``capability``, best first."""
    if tuple(capability) < MIN_CAPABILITY:
        return []
    order = ["cutlass"] if capability[0] == 8 else []  # CUTLASS's sparse kernels are built for 8.x only
    if has_cusparselt:
        order.append("cusparselt")
    return order


def probe_backend(name: str, device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None when backend ``name`` computes a small 2:4 linear (with bias, and a token count that
    needs padding) correctly on ``device``; otherwise why not, in one line."""
    cls = backend_class(name)
    if cls is None:
        return f"this PyTorch has no torch.sparse.{BACKEND_CLASSES[name]}"
    try:
        generator = torch.Generator(device="cpu").manual_seed(0)
        rows, cols = PROBE_SHAPE  # a multiple of every backend's limits
        dense = torch.randn(rows, cols, generator=generator)
        weight = (dense * nm_keep_mask(dense.abs(), 2, 4)).to(device, dtype)
        x = torch.randn(5, cols, generator=generator).to(device, dtype)  # 5 tokens: PyTorch pads them
        bias = torch.randn(rows, generator=generator).to(device, dtype)
        got = F.linear(x, cls.from_dense(weight), bias).float()
        want = F.linear(x.float(), weight.float(), bias.float())
        if device_type(device) == "cuda":
            torch.cuda.synchronize(device)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item()):
            return f"wrong result (largest difference {(got - want).abs().max().item():.3g})"
    except Exception as error:  # noqa: BLE001 -- any failure means: not this backend
        return f"{type(error).__name__}: {first_line(error)}"
    return None


def chosen_backend(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """The backend 2:4 linears use on ``device`` for ``dtype`` (probed once, then cached), or None."""
    key = (device_key(device), dtype)
    if key not in _chosen:
        capability = torch.cuda.get_device_capability(device)
        errors: dict[str, str] = {}
        choice = None
        for name in backend_order(capability, cusparselt_available()):
            error = probe_backend(name, device, dtype)
            if error is None:
                choice = name
                break
            errors[name] = error
        _chosen[key], _probe_errors[key] = choice, errors
        if choice is None:
            tried = "; ".join(f"{name}: {error}" for name, error in errors.items()) or "no backend to try"
            warn_once(f"2:4 sparse kernels unusable on {key[0]} (compute capability {capability[0]}.{capability[1]}, "
                      f"{str(dtype).removeprefix('torch.')}): {tried}. 2:4 layers run dense.")
    return _chosen[key]


def probe_errors(device: torch.device | str, dtype: torch.dtype) -> dict[str, str]:
    """Why each backend tried before the chosen one (or all, when none works) failed."""
    chosen_backend(device, dtype)
    return dict(_probe_errors[(device_key(device), dtype)])


def semi_structured_unsupported(weight: torch.Tensor) -> str | None:
    """Why ``weight`` (out, in) cannot run on the 2:4 kernels here, or None when it can."""
    if not sparse_24_enabled():
        return f"{ENV_SWITCH} is off (the default: set it to 1 for the 2:4 kernels)"
    if weight.device.type != "cuda":
        return "not on a CUDA device"
    if weight.dtype not in HALF_DTYPES:
        return f"dtype {weight.dtype} (the 2:4 kernels take float16 or bfloat16)"
    if tuple(torch.cuda.get_device_capability(weight.device)) < MIN_CAPABILITY:
        return "the GPU has no sparse tensor cores (compute capability below 8.0)"
    if weight.dim() != 2:
        return f"a {weight.dim()}-d weight"
    if not _is_2of4(weight):
        return "the weight is not 2:4 sparse"
    backend = chosen_backend(weight.device, weight.dtype)
    if backend is None:
        return "no semi-structured sparse backend works on this GPU"
    cols = shape_limits(weight.dtype, backend)[1]
    if weight.shape[1] % cols:
        return f"input width {weight.shape[1]} is not a multiple of {cols} ({backend})"
    return None


def semi_structured_weight(weight: torch.Tensor) -> SemiStructuredWeight | None:
    """The weight compressed for the 2:4 kernels, or None to keep it dense."""
    if semi_structured_unsupported(weight) is not None:
        return None
    backend = chosen_backend(weight.device, weight.dtype)
    try:
        return compress_2of4(weight, backend)
    except Exception as error:  # noqa: BLE001 -- never a crash: the dense weight computes the same
        warn_once(f"2:4 compression ({backend}) failed for a {tuple(weight.shape)} weight, which stays dense: "
                  f"{type(error).__name__}: {first_line(error)}")
        return None


def compress_2of4(weight: torch.Tensor, backend: str) -> SemiStructuredWeight:
    """Compress a 2:4 ``weight`` for ``backend``, padding its rows with zeros to the backend's multiple."""
    rows = shape_limits(weight.dtype, backend)[0]
    out_features = weight.shape[0]
    padded = F.pad(weight, (0, 0, 0, -out_features % rows)) if out_features % rows else weight
    return SemiStructuredWeight(backend_class(backend).from_dense(padded.contiguous()), out_features, backend)


def sparse_linear(x: torch.Tensor, weight: SemiStructuredWeight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` for a compressed ``weight``, any leading shape of ``x``."""
    x = x.contiguous()
    if weight.tensor.shape[0] == weight.out_features:
        return F.linear(x, weight.tensor, bias)
    out = F.linear(x, weight.tensor)[..., : weight.out_features]
    return out if bias is None else out + bias


def shape_limits(dtype: torch.dtype, backend: str | None = None) -> tuple[int, int]:
    """The (rows, cols) multiples of a weight that ``backend`` (or, with None, every backend of this
    PyTorch) accepts for ``dtype``."""
    names = [backend] if backend is not None else list(BACKEND_CLASSES)
    found = []
    for name in names:
        limits = getattr(backend_class(name), "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
        if limits is not None:
            found.append((limits.sparse_min_rows, limits.sparse_min_cols))
    if not found:
        return DEFAULT_LIMITS
    return max(r for r, _ in found), max(c for _, c in found)


def reset_backend_cache() -> None:
    """Forget the probed backends and the warnings given (tests)."""
    _chosen.clear()
    _probe_errors.clear()
    _warned.clear()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "(no message)"


def device_type(device: torch.device | str) -> str:
    return torch.device(device).type


def device_key(device: torch.device | str) -> str:
    """``cuda:N`` for a CUDA device (its index filled in), else the device's name."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _is_2of4(weight: torch.Tensor, rows_per_chunk: int = 4096) -> bool:
    """``follows_nm(weight, 2, 4)`` a block of rows at a time, stopping at the first dense block
    (an LM head of 128k rows costs one block, not gigabytes of temporaries)."""
    return all(follows_nm(block, 2, 4) for block in weight.split(rows_per_chunk))
