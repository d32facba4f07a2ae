"""What the GPTQ, AWQ and compressed-tensors writers and readers share.

Writing: check the quantized layers against the model and the scheme, replace each quantized
layer's float tensors by the packed tensors of its layout (every other float tensor in float16,
tied tensors once), and write the folder atomically. Reading: build the model with empty
parameters, swap in a packed layer filled from the checkpoint for each quantized layer, then load
the remaining tensors. ``quantkit.formats.layout`` strings these steps together.
"""

from __future__ import annotations

import copy
import dataclasses
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
from quantkit.quant.dequant_linear import DequantLinear
from quantkit.quant.rtn import QuantizedWeight, default_g_idx
from quantkit.quant.scheme import QuantScheme

# Float tensors are written in float16, the dtype every GPTQ/AWQ/compressed-tensors loader expects.
STORAGE_DTYPE = torch.float16

# Raises ValueError when a layout cannot hold a quantized weight of this shape.
FitCheck = Callable[[QuantizedWeight], None]


# --- the model's layers ---------------------------------------------------------------------------


def linear_module(model: nn.Module, name: str) -> nn.Module:
    """The ``nn.Linear`` or GPT-2 ``Conv1D`` layer ``name`` of ``model``."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise QuantkitError(f"the model has no layer named '{name}'") from None
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise QuantkitError(
            f"layer '{name}' is a {type(module).__name__}, not a linear layer"
        )
    return module


def linear_shape(model: nn.Module, name: str) -> tuple[int, int]:
    """(out_features, in_features) of the float layer ``name``."""
    return _out_in(linear_module(model, name))


def head_name(model: nn.Module) -> str | None:
    """Full name of the model's output projection (lm_head), if it has one."""
    if not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    names = (name for name, module in model.named_modules() if module is head)
    return next(names, None)


def float_linears(model: nn.Module, quantized: Iterable[str]) -> list[str]:
    """Full names of the linear layers that stay in float, in model order."""
    packed = set(quantized)
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and name not in packed
    ]


def _out_in(module: nn.Module) -> tuple[int, int]:
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, Conv1D) else (rows, cols)


# --- checks before writing ------------------------------------------------------------------------


def check_quantized_layers(
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    scheme: QuantScheme,
    layout: str,
    *,
    allow_conv1d: bool = False,
    fits: FitCheck | None = None,
) -> None:
    """Each quantized weight fits its layer and the ``layout``, and was made with ``scheme``.

    GPT-2 ``Conv1D`` layers are refused unless ``allow_conv1d``; ``fits`` says whether the layout can
    hold a weight of that shape.
    """
    for name, qw in quantized.items():
        module = linear_module(model, name)
        if isinstance(module, Conv1D) and not allow_conv1d:
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
        if fits is not None:
            _check_fits(name, qw, fits)


def _check_fits(name: str, qw: QuantizedWeight, fits: FitCheck) -> None:
    try:
        fits(qw)
    except ValueError as exc:
        raise QuantkitError(
            f"layer '{name}' cannot be stored: {exc}; add it to the ignore list"
        ) from None


def has_act_order(qw: QuantizedWeight) -> bool:
    """Whether act-order permuted the weight's groups (its g_idx is not consecutive runs)."""
    return not torch.equal(qw.g_idx.cpu(), default_g_idx(qw.in_features, qw.group_size))


def refuse_act_order(quantized: Mapping[str, QuantizedWeight], reason: str) -> None:
    """QuantkitError naming the first layer quantized with act-order; ``reason`` says why not."""
    for name, qw in quantized.items():
        if has_act_order(qw):
            raise QuantkitError(
                f"layer '{name}' was quantized with act-order (permuted groups), which {reason}; "
                "quantize without act-order or use --format gptq"
            )


# --- writing --------------------------------------------------------------------------------------


def checkpoint_tensors(
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    layer_class: type[DequantLinear],
) -> dict[str, torch.Tensor]:
    """State dict with the quantized layers packed as ``layer_class`` and every float tensor in float16."""
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in quantized.items():
        state.pop(f"{name}.weight", None)
        bias = state.pop(f"{name}.bias", None)
        layer = layer_class.from_quantized(
            _to_cpu(qw), None if bias is None else bias.detach().cpu(), STORAGE_DTYPE
        )
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
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write weights, config.json (with ``qcfg``), generation config, tokenizer and any
    ``extra_files`` (name to text), atomically."""
    out_dir = Path(out_dir)
    with atomic_output_dir(out_dir, overwrite) as staging:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        _save_config(model, quantized, qcfg, staging)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return out_dir


def _to_cpu(qw: QuantizedWeight) -> QuantizedWeight:
    tensors = {
        key: getattr(qw, key).cpu() for key in ("codes", "scales", "zeros", "g_idx")
    }
    return dataclasses.replace(qw, **tensors)


def _save_config(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight], qcfg: dict, folder: Path
) -> None:
    config = copy.deepcopy(model.config)
    config.quantization_config = qcfg
    config.dtype = STORAGE_DTYPE
    # A packed lm_head can no longer share the embeddings' tensor.
    head_packed = head_name(model) in quantized
    if head_packed and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    config.save_pretrained(folder)


# --- reading --------------------------------------------------------------------------------------


def resolve_dtype(dtype: torch.dtype | str, device: str | torch.device) -> torch.dtype:
    """A torch dtype, its name, or "auto" (float32 on the CPU, float16 elsewhere) to a dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else STORAGE_DTYPE
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise QuantkitError(
            f"unknown dtype '{dtype}': use float32, float16, bfloat16 or auto"
        )
    return resolved


def empty_model(path: Path | str, dtype: torch.dtype) -> PreTrainedModel:
    """The float model the folder's config describes, parameters on the meta device."""
    config = AutoConfig.from_pretrained(path)
    # Build the plain model; the readers swap in their own layers.
    del config.quantization_config
    # Parameters on the meta device (no memory, no init); buffers such as RoPE tables stay real.
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def packed_layer_names(tensors: Mapping[str, torch.Tensor], marker: str) -> list[str]:
    """Sorted names of the layers that store a tensor named ``marker`` (e.g. ``qweight``)."""
    suffix = f".{marker}"
    return sorted(key.removesuffix(suffix) for key in tensors if key.endswith(suffix))


def install_layer(
    model: nn.Module,
    name: str,
    layer: nn.Module,
    tensors: dict[str, torch.Tensor],
    layout: str,
    optional: Iterable[str] = (),
) -> None:
    """Fill ``layer`` with (and remove from ``tensors``) its checkpoint tensors; put it at ``name``.

    Tensors named in ``optional`` may be absent: the layer then keeps the value it was built with.
    """
    skipped = {key for key in optional if f"{name}.{key}" not in tensors}
    keys = [key for key in layer.state_dict() if key not in skipped]
    try:
        state = {key: tensors.pop(f"{name}.{key}") for key in keys}
        layer.load_state_dict(state, strict=not skipped)
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
    """Load the float tensors left in ``tensors`` (cast to ``dtype``), tie weights, move to ``device``."""
    state = {
        key: value.to(dtype) if value.is_floating_point() else value
        for key, value in tensors.items()
    }
    result = model.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise QuantkitError(
            f"'{path}' holds tensors the model does not use: {result.unexpected_keys[:5]}"
        )
    model.tie_weights()
    missing = [name for name, param in model.named_parameters() if param.is_meta]
    if missing:
        raise QuantkitError(f"'{path}' lacks tensors the model needs: {missing[:5]}")
    return model.to(device).eval()
