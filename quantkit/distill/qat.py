"""Quantization-aware distillation: the student's linears compute with the weights a checkpoint
would store, and gradients pass straight through the rounding to the float weights.

Each decoder linear gets a parametrization that returns ``w + (Q(w) - w).detach()``, where ``Q``
is round-to-nearest on the scheme's grid with GPTQ-layout parameters (``quant/rtn.py``: fp16
scales, zero points >= 1). After training, ``quantized_weights`` quantizes the trained float
weights with the same ``Q``, so the checkpoint computes exactly what the student trained with.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from quantkit.models.adapters.linears import is_transposed
from quantkit.quant.rtn import QuantizedWeight, rtn_quantize
from quantkit.quant.scheme import QuantScheme
from quantkit.quant.weights import weight_out_in


class FakeQuantize(nn.Module):
    def __init__(self, scheme: QuantScheme, name: str, transposed: bool = False) -> None:
        super().__init__()
        self.scheme, self.name, self.transposed = scheme, name, transposed

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out_in = weight.detach().float()
            out_in = out_in.t() if self.transposed else out_in
            represented = rtn_quantize(out_in, self.scheme, module_name=self.name).dequantize()
            represented = represented.t() if self.transposed else represented
        return weight + (represented.to(weight.dtype) - weight).detach()


def add_fake_quantization(model: nn.Module, names: list[str], scheme: QuantScheme) -> None:
    for name in names:
        module = model.get_submodule(name)
        parametrize.register_parametrization(module, "weight", FakeQuantize(scheme, name, is_transposed(module)))


def trained_parameter(module: nn.Module) -> nn.Parameter:
    """The parameter that trains: the raw weight under a parametrization, else the weight."""
    if parametrize.is_parametrized(module, "weight"):
        return module.parametrizations.weight.original
    return module.weight


def remove_fake_quantization(model: nn.Module, names: list[str]) -> None:
    """Back to plain linears holding the trained float weights."""
    for name in names:
        module = model.get_submodule(name)
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)


def quantized_weights(model: nn.Module, names: list[str], scheme: QuantScheme) -> dict[str, QuantizedWeight]:
    return {name: rtn_quantize(weight_out_in(model.get_submodule(name)).float(), scheme, module_name=name)
            for name in names}
