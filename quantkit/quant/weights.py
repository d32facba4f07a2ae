"""Read and write a linear layer's weight as (out_features, in_features), whatever its storage.

``nn.Linear`` stores its weight as (out, in); transformers' GPT-2 ``Conv1D`` stores it transposed,
as (in, out). Quantization code works on (out, in) only and goes through these two functions, so
with ``quantkit.models.adapters.linears`` (which says which modules are stored transposed) the
only places that know about the orientation.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models.adapters.linears import is_linear_like, is_transposed
from quantkit.quant.dequant_linear import DequantLinear


def weight_out_in(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in): a detached view for float layers, a dequantized copy for packed ones.

    A packed layer is any ``DequantLinear`` (GPTQ, AWQ or compressed-tensors layout); its copy is
    float32.
    """
    if isinstance(module, DequantLinear):
        return module.dequantize_weight()
    if not is_linear_like(module):
        raise QuantkitError(_unsupported(module))
    weight = module.weight.detach()
    return weight.t() if is_transposed(module) else weight


def set_weight_out_in(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy ``weight`` (out, in) into the module's weight, converting dtype and orientation."""
    if not is_linear_like(module):
        raise QuantkitError(_unsupported(module))
    target = module.weight.data.t() if is_transposed(module) else module.weight.data
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
