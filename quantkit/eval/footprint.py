"""How big a model is: logical weights, bytes of its checkpoint, bytes it holds in memory.

- ``parameters`` counts weights as the model means them: a layer holding packed quantized weights
  counts ``in_features * out_features`` plus its bias, not the packed int32 words, scales or zero
  points, whatever their names; every other parameter counts once (tied embeddings once). Packed
  layers are quantkit's ``DequantLinear`` layers (GPTQ, AWQ and compressed-tensors layouts) and
  any other module with a ``qweight`` tensor and ``in_features``/``out_features`` (other
  libraries' GPTQ and AWQ layers).
- ``bytes_on_disk`` sums the ``*.safetensors`` and ``*.bin`` files of the checkpoint folder; it is
  None when there is no local folder (a hub id, or no path).
- ``bytes_in_memory`` sums the unique tensors of the model's state dict: parameters and persistent
  buffers, i.e. what the checkpoint must keep resident. Non-persistent buffers (rotary
  ``inv_freq``) and plain tensor attributes (a lazily cached dequantized weight) are caches that
  are rebuilt on demand and are not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from quantkit.quant.dequant_linear import DequantLinear

WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin")


@dataclass
class Footprint:
    parameters: int
    bytes_on_disk: int | None
    bytes_in_memory: int

    def to_dict(self) -> dict:
        return asdict(self)


def footprint(model: nn.Module, path: str | None = None) -> Footprint:
    return Footprint(
        parameters=logical_parameter_count(model),
        bytes_on_disk=checkpoint_bytes(path),
        bytes_in_memory=resident_bytes(model),
    )


def is_packed_linear(module: nn.Module) -> bool:
    """A linear layer whose weight is stored packed: quantkit's, or another library's GPTQ/AWQ one."""
    return isinstance(module, DequantLinear) or (
        isinstance(getattr(module, "qweight", None), torch.Tensor)
        and hasattr(module, "in_features")
        and hasattr(module, "out_features")
    )


def logical_parameter_count(model: nn.Module) -> int:
    counted: set[int] = set()
    total = 0
    for module in model.modules():
        if not is_packed_linear(module):
            continue
        total += module.in_features * module.out_features
        own = chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for name, tensor in own:
            counted.add(id(tensor))  # packed data is covered by in * out; only the bias adds
            if name == "bias":
                total += tensor.numel()
    for parameter in model.parameters():  # parameters() yields a tied parameter once
        if id(parameter) not in counted:
            total += parameter.numel()
    return total


def resident_bytes(model: nn.Module) -> int:
    seen: set = set()
    total = 0
    for tensor in model.state_dict(keep_vars=True).values():
        key = _storage_key(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def _storage_key(tensor: torch.Tensor):
    # Tied weights are one tensor under two names; meta tensors have no address to compare.
    if tensor.device.type == "meta":
        return id(tensor)
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape))


def checkpoint_bytes(path: str | None) -> int | None:
    if path is None:
        return None
    location = Path(path).expanduser()
    if location.is_file():
        return location.stat().st_size
    if not location.is_dir():
        return None
    files = {file for pattern in WEIGHT_FILE_PATTERNS for file in location.glob(pattern)}
    return sum(file.stat().st_size for file in files if file.is_file())
