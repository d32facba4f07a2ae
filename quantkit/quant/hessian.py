"""The Hessian of a linear layer's reconstruction error, accumulated over calibration tokens.

For a layer ``y = x W^T`` and the loss ``||X W^T - X Ŵ^T||²``, the Hessian with respect to each
row of ``W`` is ``H = 2/n Σ x xᵀ`` over the ``n`` calibration tokens (``x`` is one token's input,
of size ``in_features``). GPTQ needs only ``H``.

The GPTQ reference keeps ``H`` itself as a running mean, rescaling it by ``n_old / n_new`` at every
batch. This class keeps the raw sum ``S = Σ x xᵀ`` and the count ``n`` instead and forms
``H = 2/n · S`` when asked: the same mean, with no rounding compounded by repeated rescaling, and
two accumulators (for example on two data-parallel ranks) combine by adding their sums and
counts, so an all-reduce of ``(S, n)`` gives the Hessian of all the tokens (to float32 rounding).

Precision and memory (CPU sums are float64 instead, where memory is plentiful and the result
then does not depend on how batches were split across ranks): each batch's ``XᵀX`` is computed with float32 accumulation (fp16/bf16
activations on CUDA go straight to a float32-output GEMM: products of 16-bit numbers are exact in
float32, so upcasting first adds nothing but time) and added into a float32 sum, as the GPTQ
reference does. Wide layers are added a block of columns at a time, so no second full-size
matrix is ever allocated: a 14336-wide layer costs its 0.8 GB sum and a 0.2 GB slice, which is
what keeps GPTQ on an 8B model inside a small accelerator budget. ``take_hessian`` turns the sum
into ``H`` in place for the same reason.
"""

from __future__ import annotations

import torch

from quantkit.errors import QuantkitError

SUM_DTYPE = torch.float32  # on accelerators; CPU sums are float64 (see _sum_dtype)
_BLOCK_COLUMNS = 4096  # wider sums are updated a slice of columns at a time
_HALF_DTYPES = (torch.float16, torch.bfloat16)


class HessianAccumulator:
    """Collects ``Σ x xᵀ`` and the token count of one linear layer's inputs."""

    def __init__(
        self, in_features: int, *, device: torch.device | str | None = None
    ) -> None:
        if not isinstance(in_features, int) or in_features <= 0:
            raise ValueError(
                f"in_features must be a positive integer, got {in_features!r}"
            )
        self.in_features = in_features
        self._device = None if device is None else torch.device(device)
        self._sum: torch.Tensor | None = None
        self._count = 0

    @classmethod
    def from_sum(cls, sum_xtx: torch.Tensor, count: int) -> HessianAccumulator:
        """An accumulator holding a raw sum ``Σ x xᵀ`` over ``count`` tokens (e.g. all-reduced)."""
        if sum_xtx.dim() != 2 or sum_xtx.shape[0] != sum_xtx.shape[1]:
            raise ValueError(
                f"sum_xtx must be a square matrix, got shape {tuple(sum_xtx.shape)}"
            )
        if int(count) < 0:
            raise ValueError(f"count must not be negative, got {count}")
        accumulator = cls(sum_xtx.shape[0], device=sum_xtx.device)
        accumulator._sum = sum_xtx.detach().to(_sum_dtype(sum_xtx.device)).clone()
        accumulator._count = int(count)
        return accumulator

    @property
    def num_tokens(self) -> int:
        """How many tokens (rows of activations) have been added."""
        return self._count

    @property
    def state(self) -> tuple[torch.Tensor, int]:
        """``(Σ x xᵀ as float32, token count)``: what data-parallel ranks all-reduce (sum)."""
        return self._raw_sum(), self._count

    @property
    def hessian(self) -> torch.Tensor:
        """``H = 2/n Σ x xᵀ`` as float32, shape (in_features, in_features)."""
        if self._count == 0:
            raise QuantkitError(
                "no calibration tokens reached this layer, so its Hessian is undefined; "
                "use more (or longer) calibration samples"
            )
        return (self._raw_sum() * (2.0 / self._count)).to(torch.float32)

    def take_hessian(self) -> torch.Tensor:
        """``H`` (float32), computed in the sum's own memory where the sum is float32; the
        accumulator is empty afterwards."""
        hessian = self.hessian if self._count == 0 else self._raw_sum().mul_(2.0 / self._count).to(torch.float32)
        self._sum, self._count = None, 0
        return hessian

    def all_reduce(self, group) -> None:
        """Sum this accumulator over the ranks of ``group`` (a ``DataParallel``): afterwards every
        rank holds the sum and count of all ranks' tokens."""
        total = self._raw_sum()
        group.all_reduce_sum(total)
        count = torch.tensor([float(self._count)], dtype=torch.float64, device=total.device)
        self._count = int(group.all_reduce_sum(count).item())

    def add_batch(self, x: torch.Tensor) -> None:
        """Add activations of shape (..., in_features): every leading index is one token."""
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"expected activations with last dimension {self.in_features}, "
                f"got shape {tuple(x.shape)}"
            )
        tokens = x.detach().reshape(-1, self.in_features)
        if tokens.shape[0] == 0:
            return
        total = self._raw_sum(tokens.device)
        tokens = tokens.to(total.device)
        if not (tokens.is_cuda and tokens.dtype in _HALF_DTYPES):
            tokens = tokens.to(torch.float32)
        for start in range(0, self.in_features, _BLOCK_COLUMNS):
            end = min(start + _BLOCK_COLUMNS, self.in_features)
            total[:, start:end] += _gram(tokens, tokens[:, start:end])
        self._count += tokens.shape[0]

    def merge(self, other: HessianAccumulator) -> None:
        """Add another accumulator's tokens to this one (as if its batches had been added here)."""
        if other.in_features != self.in_features:
            raise ValueError(
                f"cannot merge Hessians of {other.in_features} and {self.in_features} inputs"
            )
        if other._count == 0:
            return
        total = self._raw_sum(other._sum.device)
        total += other._sum.to(total.device)
        self._count += other._count

    def _raw_sum(self, device: torch.device | None = None) -> torch.Tensor:
        # Allocated on first use: on the given device, else where the first batch lives.
        if self._sum is None:
            place = self._device or device or torch.device("cpu")
            size = (self.in_features, self.in_features)
            self._sum = torch.zeros(size, dtype=_sum_dtype(place), device=place)
        return self._sum


def _sum_dtype(device: torch.device) -> torch.dtype:
    # CPU memory is plentiful and float64 sums make the result independent of how the batches
    # were split (one process or several ranks) to well below float32 rounding.
    return torch.float64 if torch.device(device).type == "cpu" else SUM_DTYPE


def _gram(tokens: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``tokensᵀ columns`` (in, k) with float32 accumulation, as float32."""
    if tokens.is_cuda and tokens.dtype in _HALF_DTYPES:
        try:
            return torch.mm(tokens.t(), columns, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass  # a torch without the float32-output 16-bit GEMM: upcast instead
    return tokens.t().to(torch.float32) @ columns.to(torch.float32)  # no copies for float32 tokens
