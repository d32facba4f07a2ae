"""Read and write a linear layer's weight as (out_features, in_features), whatever its storage.

``nn.Linear`` stores its weight as (out, in); transformers' GPT-2 ``Conv1D`` stores it transposed,
as (in, out). Quantization code works on (out, in) only and goes through these two functions, so
this is the one place in ``quantkit.quant`` that knows about the orientation.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantkit.errors import QuantkitError
from quantkit.quant.linear import QuantLinear


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in): a detached view for float layers, a dequantized copy for QuantLinear."""
    if isinstance(module, QuantLinear):
        return module.dequantize_weight()
    if isinstance(module, Conv1D):
        return module.weight.detach().t()
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    raise QuantkitError(_unsupported(module))


def set_weight_out_in(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy ``weight`` (out, in) into the module's weight, converting dtype and orientation."""
    if isinstance(module, Conv1D):
        target = module.weight.data.t()
    elif isinstance(module, nn.Linear):
        target = module.weight.data
    else:
        raise QuantkitError(_unsupported(module))
    if tuple(weight.shape) != tuple(target.shape):
        raise ValueError(
            f"weight shape {tuple(weight.shape)} does not match the layer's (out, in) "
            f"shape {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(weight)


def _unsupported(module: nn.Module) -> str:
    return (
        f"cannot handle the weight of a {type(module).__name__} layer: quantkit quantizes "
        "nn.Linear and transformers' Conv1D layers; add the layer's name to the scheme's ignore list"
    )
