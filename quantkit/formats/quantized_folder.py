"""What the AWQ and compressed-tensors writers and readers share.

Writing: check the quantized layers against the model and the scheme, replace each quantized
layer's float tensors by the packed tensors of its layout (every other float tensor in float16,
tied tensors once), and write the folder atomically. Reading: build the model with empty
parameters, swap in a packed layer filled from the checkpoint for each quantized layer, then load
the remaining tensors. The GPTQ module (``quantkit.formats.gptq``) provides the lower-level helpers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from quantkit.errors import QuantkitError
from quantkit.formats.atomic import atomic_output_dir
from quantkit.formats.checkpoint_files import WEIGHTS_NAME
from quantkit.formats.gptq import (
    STORAGE_DTYPE,
    _linear_module,
    _load_remaining,
    _out_in,
    _output_name,
    _save_config,
    _to_cpu,
)
from quantkit.quant.rtn import QuantizedWeight
from quantkit.quant.scheme import QuantScheme

# Builds the packed layer (whose state_dict holds the layout's tensors) from a quantized weight
# and the layer's bias.
PackLayer = Callable[[QuantizedWeight, torch.Tensor | None], nn.Module]


def check_quantized_layers(
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    scheme: QuantScheme,
    layout: str,
) -> None:
    """Each quantized weight fits its layer (an ``nn.Linear``) and was made with ``scheme``."""
    for name, qw in quantized.items():
        module = _linear_module(model, name)
        if isinstance(module, Conv1D):
            raise QuantkitError(
                f"layer '{name}' is a GPT-2 Conv1D; the {layout} layout holds nn.Linear layers only, "
                "so use --format gptq or add the layer to the ignore list"
            )
        if tuple(qw.codes.shape) != _out_in(module):
            raise ValueError(
                f"quantized weight of '{name}' has shape {tuple(qw.codes.shape)}, "
                f"layer has {_out_in(module)}"
            )
        if (qw.bits, qw.group_size, qw.symmetric) != (
            scheme.bits,
            scheme.group_size,
            scheme.symmetric,
        ):
            raise ValueError(
                f"'{name}' was quantized with a different scheme than {scheme.name}"
            )
        if qw.symmetric and not bool((qw.zeros == 1 << (qw.bits - 1)).all()):
            raise ValueError(
                f"symmetric layer '{name}' must use zero point {1 << (qw.bits - 1)}"
            )


def float_linears(model: nn.Module, quantized: Iterable[str]) -> list[str]:
    """Full names of the linear layers that stay in float, in model order."""
    packed = set(quantized)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and name not in packed
    ]


def head_name(model: nn.Module) -> str | None:
    """Full name of the model's output projection (lm_head), if it has one."""
    return _output_name(model)


def checkpoint_tensors(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight], pack_layer: PackLayer
) -> dict[str, torch.Tensor]:
    """State dict with the quantized layers packed and every float tensor in float16."""
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in quantized.items():
        state.pop(f"{name}.weight", None)
        bias = state.pop(f"{name}.bias", None)
        layer = pack_layer(_to_cpu(qw), None if bias is None else bias.detach().cpu())
        for key, value in layer.state_dict().items():
            tensors[f"{name}.{key}"] = value.contiguous()
    seen: set[int] = set()
    for key, value in state.items():
        # Tied weights (lm_head sharing the embeddings) are stored once.
        if value.numel() and value.data_ptr() in seen:
            continue
        seen.add(value.data_ptr())
        value = value.detach().cpu()
        tensors[key] = (
            value.to(STORAGE_DTYPE) if value.is_floating_point() else value
        ).contiguous()
    return tensors


def write_quantized_folder(
    model: PreTrainedModel,
    tokenizer,
    quantized: Mapping[str, QuantizedWeight],
    qcfg: dict,
    tensors: dict[str, torch.Tensor],
    out_dir: Path | str,
    overwrite: bool,
) -> Path:
    """Write weights, config.json (with ``qcfg``), generation config and tokenizer, atomically."""
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite) as staging:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        _save_config(model, quantized, qcfg, staging)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return out_dir


def empty_model(path: Path | str, dtype: torch.dtype) -> PreTrainedModel:
    """The float model the folder's config describes, parameters on the meta device."""
    config = AutoConfig.from_pretrained(path)
    # Build the plain model; the readers swap in their own layers.
    del config.quantization_config
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def linear_shape(model: nn.Module, name: str) -> tuple[int, int]:
    """(out_features, in_features) of the float layer ``name``."""
    return _out_in(_linear_module(model, name))


def install_layer(
    model: nn.Module,
    name: str,
    layer: nn.Module,
    tensors: dict[str, torch.Tensor],
    layout: str,
) -> None:
    """Fill ``layer`` with (and remove from ``tensors``) its checkpoint tensors; put it at ``name``."""
    keys = list(layer.state_dict())
    try:
        layer.load_state_dict({key: tensors.pop(f"{name}.{key}") for key in keys})
    except (KeyError, RuntimeError) as exc:
        raise QuantkitError(
            f"{layout} tensors of layer '{name}' are missing or mis-shaped: {exc}"
        ) from None
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def finish_loading(
    model: PreTrainedModel,
    tensors: dict[str, torch.Tensor],
    dtype: torch.dtype,
    path: Path | str,
    device: str | torch.device,
) -> PreTrainedModel:
    """Load the float tensors left in ``tensors``, tie weights, move to ``device``."""
    _load_remaining(model, tensors, dtype, path)
    return model.to(device).eval()
