"""The GPTQ checkpoint layout (v1, ``checkpoint_format: "gptq"``): writer and reader.

The folder is a Hugging Face model folder (config.json, model.safetensors, generation_config.json,
tokenizer files) plus a copy of the quantization config in quantize_config.json. Each quantized
linear layer ``<name>`` with ``in`` inputs, ``out`` outputs, ``b`` bits and ``G`` groups stores:

==================  =======  ==================  ==============================================
tensor              dtype    shape               content
==================  =======  ==================  ==============================================
``<name>.qweight``  int32    (in * b / 32, out)  codes packed along the input dimension, low
                                                 bits first (3-bit: 32 codes in 3 words)
``<name>.qzeros``   int32    (G, out * b / 32)   ``zero - 1`` packed along the output dimension
``<name>.scales``   float16  (G, out)            one scale per group and output channel
``<name>.g_idx``    int32    (in,)               group of each input column (``i // group_size``
                                                 unless act-order permuted the columns)
``<name>.bias``     float16  (out,)              only when the layer has a bias
==================  =======  ==================  ==============================================

with ``G = ceil(in / group_size)`` (1 for group_size -1), and the weight is
``W[o, i] = scales[g_idx[i], o] * (q[i, o] - (qzeros[g_idx[i], o] + 1))``. Every other tensor is
stored under its usual name in float16. ``quantization_config`` in config.json holds
``quant_method: "gptq"``, ``bits``, ``group_size``, ``desc_act``, ``sym``, ``damp_percent``,
``true_sequential``, ``static_groups``, ``checkpoint_format``/``format: "gptq"``, ``lm_head``,
``modules_in_block_to_quantize`` and, when some layers of a block are left unquantized in only
some blocks, ``dynamic`` negative rules (``"-:<regex>": {}``) naming them.

Facts this layout rests on, from the sources of the tools that write and read it:

* AutoGPTQ ``auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py`` (``QuantLinear.pack``): buffer
  shapes, ``zeros -= 1`` before packing qzeros, the 3-bit 10|1|10|1|10 word pattern, fp16 scales
  and bias, Conv1D weights transposed to (out, in) before packing.
* GPTQModel ``gptqmodel/nn_modules/qlinear/__init__.py`` (``pack_block``, ``dequantize_weight``):
  the same packing; GPTQModel works in the v2 convention internally (true zero points) and
  subtracts one when it saves ``format="gptq"``.
* vLLM ``vllm/model_executor/layers/quantization/gptq.py``: the same shapes, and
  ``use_v2_format = checkpoint_format == "gptq_v2"`` (v1 kernels add one to the stored zeros);
  ``gptq_marlin.py``: Marlin takes only ``sym: true`` with 4 or 8 bits (types ``uint4b8`` and
  ``uint8b128``, i.e. the zero point is fixed at 8 or 128 and qzeros is ignored), reading
  ``bits``, ``group_size``, ``desc_act``, ``sym``, ``lm_head``, ``dynamic`` and
  ``modules_in_block_to_quantize``; ``utils/gptq_utils.py``: ``"-:"`` dynamic rules exclude
  modules by ``re.match`` on the full name, and block modules are matched by substring.
* transformers ``utils/quantization_config.py`` (``GPTQConfig``: bits in 2/3/4/8,
  0 < damp_percent < 1, ``format`` with legacy ``checkpoint_format``) and
  ``quantizers/quantizer_gptq.py`` (loading needs ``optimum`` and ``gptqmodel``); optimum
  ``optimum/gptq/quantizer.py`` (``convert_model`` replaces the linear layers inside the decoder
  blocks whose names end with an entry of ``modules_in_block_to_quantize``; ``lm_head`` is never
  quantized there).

Asymmetric zero points of 0 cannot be stored in v1 (``0 - 1`` does not fit), so quantkit
quantizes with zero points in ``[1, 2**bits - 1]`` (``min_zero=1``); symmetric zero points are
``2**(bits - 1)``, which Marlin assumes.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.pytorch_utils import Conv1D

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats.atomic import atomic_output_dir
from quantkit.formats.checkpoint_files import (
    WEIGHTS_NAME,
    read_config_json,
    read_safetensors,
)
from quantkit.quant.linear import QuantLinear, check_packable
from quantkit.quant.rtn import QuantizedWeight, default_g_idx
from quantkit.quant.scheme import QuantScheme

GPTQ_FORMAT = "gptq"
QUANTIZE_CONFIG_NAME = "quantize_config.json"
REQUIRED_TENSORS = ("qweight", "qzeros", "scales")
OPTIONAL_TENSORS = ("g_idx", "bias")
STORAGE_DTYPE = torch.float16


def save_gptq(
    model: PreTrainedModel,
    tokenizer,
    quantized: Mapping[str, QuantizedWeight],
    scheme: QuantScheme,
    out_dir: Path | str,
    *,
    overwrite: bool = False,
    algorithm_config: dict | None = None,
) -> Path:
    """Write ``model`` with the ``quantized`` layers in the GPTQ v1 layout to ``out_dir``.

    ``quantized`` maps full module names to their quantized weights (weights as (out, in), so
    Conv1D layers were transposed before quantizing). Nothing appears at ``out_dir`` unless the
    whole folder was written.
    """
    out_dir = Path(out_dir)
    _check_quantized(model, quantized, scheme)
    qcfg = gptq_quantization_config(model, quantized, scheme, algorithm_config or {})
    tensors = _checkpoint_tensors(model, quantized)
    with atomic_output_dir(out_dir, overwrite) as staging:
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        _save_config(model, quantized, qcfg, staging)
        (staging / QUANTIZE_CONFIG_NAME).write_text(json.dumps(qcfg, indent=2) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(staging)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
    return out_dir


def gptq_quantization_config(
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    scheme: QuantScheme,
    algorithm_config: dict,
) -> dict:
    """The ``quantization_config`` entry that GPTQ loaders read."""
    permuted = any(
        not torch.equal(qw.g_idx.cpu(), _default_g_idx(qw)) for qw in quantized.values()
    )
    in_block, excluded = _block_coverage(model, quantized)
    quantizer = [f"quantkit:{__version__}"]
    qcfg = {
        "quant_method": "gptq",
        "bits": scheme.bits,
        "group_size": scheme.group_size,
        "desc_act": bool(algorithm_config.get("desc_act", False)) or permuted,
        "sym": scheme.symmetric,
        "damp_percent": float(algorithm_config.get("damp_percent", 0.1)),
        "true_sequential": bool(algorithm_config.get("true_sequential", True)),
        "static_groups": bool(algorithm_config.get("static_groups", False)),
        "checkpoint_format": GPTQ_FORMAT,
        "format": GPTQ_FORMAT,
        "lm_head": _output_name(model) in quantized,
        "modules_in_block_to_quantize": [in_block],
        "quantizer": quantizer,
        "meta": {
            "quantizer": quantizer,
            "quantkit": {"scheme": scheme.name, **algorithm_config},
        },
    }
    if excluded:
        qcfg["dynamic"] = {f"-:{re.escape(name)}$": {} for name in excluded}
    return qcfg


def load_gptq_model(
    path: Path | str,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Build the model a GPTQ v1 folder describes, with ``QuantLinear`` for its quantized layers.

    Non-quantized tensors are cast to ``dtype`` (a torch dtype, its name, or "auto": float32 on
    the CPU, float16 elsewhere); quantized layers keep their stored buffers and compute in the
    dtype of their input. Shards (model.safetensors.index.json) are supported.
    """
    dtype = _resolve_dtype(dtype, device)
    qcfg = _read_gptq_config(path)
    tensors = read_safetensors(path)
    config = AutoConfig.from_pretrained(path)
    # Build the plain model; quantkit swaps in its own layers below.
    del config.quantization_config
    # Parameters on the meta device (no memory, no init); buffers such as RoPE tables stay real.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    packed = sorted(
        key.removesuffix(".qweight") for key in tensors if key.endswith(".qweight")
    )
    for name in packed:
        _install_quant_linear(model, name, tensors, qcfg)
    _load_remaining(model, tensors, dtype, path)
    return model.to(device).eval()


def _resolve_dtype(dtype: torch.dtype | str, device: str | torch.device) -> torch.dtype:
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


def _check_quantized(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight], scheme: QuantScheme
) -> None:
    for name, qw in quantized.items():
        module = _linear_module(model, name)
        expected = _out_in(module)
        if tuple(qw.codes.shape) != expected:
            raise ValueError(
                f"quantized weight of '{name}' has shape {tuple(qw.codes.shape)}, layer has {expected}"
            )
        layout = (qw.bits, qw.group_size, qw.symmetric)
        if layout != (scheme.bits, scheme.group_size, scheme.symmetric):
            raise ValueError(
                f"'{name}' was quantized with a different scheme than {scheme.name}"
            )
        if qw.symmetric and not bool((qw.zeros == 1 << (qw.bits - 1)).all()):
            raise ValueError(
                f"symmetric layer '{name}' must use zero point {1 << (qw.bits - 1)}"
            )
        try:
            check_packable(qw.in_features, qw.out_features, qw.bits)
        except ValueError as exc:
            raise QuantkitError(
                f"layer '{name}' cannot be stored: {exc}; add it to the ignore list"
            ) from None


def _linear_module(model: nn.Module, name: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise QuantkitError(f"the model has no layer named '{name}'") from None
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise QuantkitError(
            f"layer '{name}' is a {type(module).__name__}, not a linear layer"
        )
    return module


def _out_in(module: nn.Module) -> tuple[int, int]:
    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, Conv1D) else (rows, cols)


def _default_g_idx(qw: QuantizedWeight) -> torch.Tensor:
    return default_g_idx(qw.in_features, qw.group_size)


def _output_name(model: nn.Module) -> str | None:
    if not hasattr(model, "get_output_embeddings"):
        return None
    head = model.get_output_embeddings()
    names = (name for name, module in model.named_modules() if module is head)
    return next(names, None)


def _block_position(model: nn.Module, name: str) -> tuple[str, str] | None:
    """(block name, name inside the block) when ``name`` lies in a decoder layer list."""
    parts = name.split(".")
    for i, part in enumerate(parts[1:], start=1):
        if part.isdigit() and isinstance(
            model.get_submodule(".".join(parts[:i])), nn.ModuleList
        ):
            return ".".join(parts[: i + 1]), ".".join(parts[i + 1 :])
    return None


def _block_coverage(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight]
) -> tuple[list[str], list[str]]:
    """Names-in-block quantized somewhere, and full names of block linears those names miss."""
    head = _output_name(model)
    in_block: list[str] = []
    for name in quantized:
        position = _block_position(model, name)
        if position is None and name != head:
            raise QuantkitError(
                f"layer '{name}' lies outside the decoder layers; the GPTQ layout quantizes only "
                "decoder-layer linears and lm_head, so add it to the ignore list"
            )
        if position is not None and position[1] not in in_block:
            in_block.append(position[1])
    excluded = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D))
        and name not in quantized
        and (position := _block_position(model, name)) is not None
        and position[1] in in_block
    ]
    return in_block, excluded


def _checkpoint_tensors(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight]
) -> dict[str, torch.Tensor]:
    """State dict with the quantized layers packed and every float tensor in float16."""
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in quantized.items():
        state.pop(f"{name}.weight", None)
        bias = state.pop(f"{name}.bias", None)
        packed = QuantLinear.from_quantized(
            _to_cpu(qw), None if bias is None else bias.cpu(), STORAGE_DTYPE
        )
        tensors.update(
            {f"{name}.{key}": value for key, value in packed.state_dict().items()}
        )
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
    head_packed = _output_name(model) in quantized
    if head_packed and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    config.save_pretrained(folder)


def _read_gptq_config(path: Path | str) -> dict:
    qcfg = read_config_json(path).get("quantization_config")
    if (
        not isinstance(qcfg, dict)
        or str(qcfg.get("quant_method", "")).lower() != "gptq"
    ):
        raise QuantkitError(
            f"'{path}' is not a GPTQ checkpoint (config.json quant_method is not 'gptq')"
        )
    layout = str(
        qcfg.get("checkpoint_format") or qcfg.get("format") or GPTQ_FORMAT
    ).lower()
    if layout != GPTQ_FORMAT:
        raise QuantkitError(
            f"'{path}' uses GPTQ checkpoint_format '{layout}'; quantkit reads only 'gptq' (v1) for now"
        )
    if qcfg.get("bits") not in (2, 3, 4, 8) or not isinstance(
        qcfg.get("group_size"), int
    ):
        raise QuantkitError(
            f"'{path}/config.json' has an invalid GPTQ bits or group_size"
        )
    return qcfg


def _install_quant_linear(
    model: nn.Module, name: str, tensors: dict[str, torch.Tensor], qcfg: dict
) -> None:
    """Replace the float layer ``name`` by a QuantLinear filled from the checkpoint tensors."""
    out_features, in_features = _out_in(_linear_module(model, name))
    has_bias = f"{name}.bias" in tensors
    layer = QuantLinear(
        in_features, out_features, qcfg["bits"], qcfg["group_size"], bias=has_bias
    )
    # Some older checkpoints omit g_idx; the layer then keeps consecutive groups.
    present = [key for key in OPTIONAL_TENSORS if f"{name}.{key}" in tensors]
    keys = [*REQUIRED_TENSORS, *present]
    try:
        layer_state = {key: tensors.pop(f"{name}.{key}") for key in keys}
        layer.load_state_dict(layer_state, strict=False)
    except (KeyError, RuntimeError) as exc:
        raise QuantkitError(
            f"GPTQ tensors of layer '{name}' are missing or mis-shaped: {exc}"
        ) from None
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)


def _load_remaining(
    model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype, path
) -> None:
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
