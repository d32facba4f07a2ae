"""Round-to-nearest (RTN) weight quantization and the quantized-weight record all algorithms return.

RTN picks each group's scale and zero point from the group's min and max and rounds every weight
to the nearest code; it needs no calibration data. GPTQ and AWQ produce the same
``QuantizedWeight`` record, so the checkpoint writers handle every algorithm alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.quant.qdq import compute_qparams, quantize
from quantkit.quant.scheme import QuantScheme, check_group_size
from quantkit.quant.weights import weight_out_in


@dataclass
class QuantizedWeight:
    """A layer's quantized weight: codes, per-group scales and zeros, and each column's group."""

    codes: torch.Tensor  # (out, in) int32 in [0, 2**bits - 1]
    scales: torch.Tensor  # (out, n_groups) float32
    zeros: torch.Tensor  # (out, n_groups) int32
    g_idx: (
        torch.Tensor
    )  # (in,) int32: group of each input column (act-order permutes it)
    bits: int
    group_size: int
    symmetric: bool

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def dequantize(self) -> torch.Tensor:
        """The represented weight (out, in) float32: ``scale[g] * (q - zero[g])`` per column."""
        groups = self.g_idx.long()
        shifted = (
            self.codes.to(torch.int32) - self.zeros[:, groups].to(torch.int32)
        ).to(torch.float32)
        return self.scales[:, groups].to(torch.float32) * shifted


def default_g_idx(
    in_features: int, group_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """Group of each input column when groups are consecutive runs of ``group_size`` columns."""
    columns = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(columns) if group_size == -1 else columns // group_size


def rtn_quantize(
    weight_out_in: torch.Tensor,
    scheme: QuantScheme,
    *,
    min_zero: int = 1,
    fp16_scales: bool = True,
    module_name: str = "<weight>",
) -> QuantizedWeight:
    """Quantize a weight (out, in) by rounding to the nearest code of each group's grid.

    ``min_zero=1`` keeps asymmetric zero points storable in the GPTQ v1 layout (which writes
    ``zero - 1``); ``fp16_scales`` picks codes against the fp16 scales a checkpoint stores.
    """
    weight = weight_out_in.detach()
    check_group_size(weight.shape[1], scheme.group_size, module_name)
    scales, zeros = compute_qparams(
        weight,
        scheme.bits,
        scheme.group_size,
        scheme.symmetric,
        min_zero=min_zero,
        fp16_scales=fp16_scales,
    )
    return quantize_on_grid(weight, scales, zeros, scheme)


def quantize_on_grid(
    weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, scheme: QuantScheme
) -> QuantizedWeight:
    """The ``QuantizedWeight`` of ``weight`` (out, in) rounded onto given grids, consecutive groups.

    ``scales`` and ``zeros`` are (out, n_groups); algorithms that pick their own grids (RTN's
    min/max, AWQ's clipped ranges) build their record here.
    """
    return QuantizedWeight(
        codes=quantize(weight, scales, zeros, scheme.bits, scheme.group_size),
        scales=scales,
        zeros=zeros,
        g_idx=default_g_idx(weight.shape[1], scheme.group_size, weight.device),
        bits=scheme.bits,
        group_size=scheme.group_size,
        symmetric=scheme.symmetric,
    )


def rtn_quantize_modules(
    modules: Mapping[str, nn.Module], scheme: QuantScheme
) -> dict[str, QuantizedWeight]:
    """RTN-quantize every named linear layer that the scheme does not ignore."""
    return {
        name: rtn_quantize(weight_out_in(module), scheme, module_name=name)
        for name, module in modules.items()
        if not scheme.is_ignored(name)
    }
