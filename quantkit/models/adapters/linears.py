"""Linear-like modules: ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (weight stored transposed).

Code that scales or quantizes weights must know which weight axis holds the input channels;
these helpers answer that for both kinds.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from quantkit.models.adapters.base import ModelAdapter


def is_linear_like(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and GPT-2's ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


def is_transposed(module: nn.Module) -> bool:
    """True when the weight is stored as (in_features, out_features), as ``Conv1D`` does."""
    return isinstance(module, Conv1D)


def in_features(module: nn.Module) -> int:
    """Number of input channels of a linear-like module."""
    return module.nx if is_transposed(module) else module.in_features


def out_features(module: nn.Module) -> int:
    """Number of output channels of a linear-like module."""
    return module.nf if is_transposed(module) else module.out_features


def linear_modules(model: nn.Module, adapter: ModelAdapter) -> dict[str, nn.Module]:
    """Full name -> module for every linear-like module in the decoder layers, then the LM head."""
    prefix = adapter.layer_prefix(model)
    found: dict[str, nn.Module] = {}
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for name, module in layer.named_modules():
            if is_linear_like(module):
                found[f"{prefix}.{index}.{name}"] = module
    head = adapter.lm_head(model)
    head_name = next(name for name, module in model.named_modules() if module is head)
    found[head_name] = head
    return found
