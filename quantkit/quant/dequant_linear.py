"""Base of the linear layers that hold a packed checkpoint layout and compute with plain torch.

A subclass keeps its tensors under the names its checkpoint layout uses (so ``state_dict`` is the
checkpoint's), says how to build itself from a ``QuantizedWeight`` (``_packed``) and how to rebuild
the float weight from its tensors (``dequantize_weight``). The forward pass here is the reference
path ``x @ W.T + b`` that GPU kernels are checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from typing import Self

    from quantkit.quant.rtn import QuantizedWeight


def group_count(in_features: int, group_size: int) -> int:
    """Number of groups along the input dimension (one for ``group_size == -1``)."""
    return 1 if group_size == -1 else math.ceil(in_features / group_size)


def consecutive_groups(
    in_features: int, group_size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """int32 group of each input column when groups are runs of ``group_size`` columns."""
    span = in_features if group_size == -1 else group_size
    return (torch.arange(in_features, device=device) // span).to(torch.int32)


def dequantize_in_out(
    codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, groups: torch.Tensor
) -> torch.Tensor:
    """The weight (out, in) in float32 from codes (in, out) and per-group zeros and scales (G, out).

    ``groups`` (in,) names each input row's group: ``W.T[i] = scales[g] * (codes[i] - zeros[g])``.
    """
    shifted = (codes - zeros[groups]).to(torch.float32)
    return (scales[groups].to(torch.float32) * shifted).t()


@dataclass(frozen=True)
class UnpackedWeight:
    """A layout-independent view of a quantized layer: ``W[o, i] = scales[o, g] * (codes[o, i] -
    zeros[o, g])`` with ``g = g_idx[i]``; what the runtime repacks for its kernels."""

    codes: torch.Tensor  # (out, in) int32, unsigned
    scales: torch.Tensor  # (out, n_groups)
    zeros: torch.Tensor  # (out, n_groups) int32, unsigned
    g_idx: torch.Tensor  # (in,) int64
    bits: int
    group_size: int


class DequantLinear(nn.Module):
    """``y = x @ W.T + b`` where ``W`` is rebuilt from packed buffers by ``dequantize_weight``."""

    def __init__(
        self, in_features: int, out_features: int, bits: int, group_size: int
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self._cached_weight: torch.Tensor | None = None
        self._cache_key: tuple | None = None

    @classmethod
    def from_quantized(
        cls,
        qw: QuantizedWeight,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float16,
    ) -> Self:
        """Pack a ``QuantizedWeight`` (and optional bias) into a new layer on the weight's device.

        Scales and bias are stored in ``dtype``; ValueError when the layout cannot hold ``qw``.
        """
        layer = cls._packed(qw, has_bias=bias is not None, dtype=dtype)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def _packed(cls, qw: QuantizedWeight, *, has_bias: bool, dtype: torch.dtype) -> Self:
        """A new layer on ``qw``'s device holding ``qw``'s codes, scales and zero points."""
        raise NotImplementedError

    def dequantize_weight(self) -> torch.Tensor:
        """The weight (out, in) in float32, unpacked from the buffers."""
        raise NotImplementedError

    def unpacked(self) -> UnpackedWeight:
        """Codes, scales, zero points and groups, whatever the layout."""
        raise NotImplementedError

    def _init_bias(
        self, has_bias: bool, dtype: torch.dtype, device: torch.device | str | None
    ) -> None:
        if has_bias:
            bias = torch.zeros(self.out_features, dtype=dtype, device=device)
            self.register_buffer("bias", bias)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self._weight_like(x), bias)

    def clear_cache(self) -> None:
        """Drop the cached dequantized weight (needed after editing the buffers in place)."""
        self._cached_weight = None
        self._cache_key = None

    def _weight_like(self, x: torch.Tensor) -> torch.Tensor:
        # The CPU is the slow reference path, where memory is plentiful: keep the unpacked weight
        # after first use. Elsewhere rebuild it every call so the layer keeps its small footprint.
        if x.device.type != "cpu":
            return self.dequantize_weight().to(device=x.device, dtype=x.dtype)
        key = (x.dtype, *(buffer.data_ptr() for buffer in self.buffers(recurse=False)))
        if self._cache_key != key:
            self._cached_weight = self.dequantize_weight().to(x.dtype)
            self._cache_key = key
        return self._cached_weight

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # Loading copies into the buffers in place (same data pointers): the cache goes stale.
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )
