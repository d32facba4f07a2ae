"""compressed-tensors ``int-quantized`` (W8A8 INT8) and ``float-quantized`` (FP8 e4m3: W8A8 and
W8A16) checkpoints, and KV-cache scales (in these and in ``pack-quantized`` folders).

Each quantized linear ``<name>`` stores, as vLLM's schemes create them:

==========================  ==================  =============  ===================================
tensor                      dtype               shape          content
==========================  ==================  =============  ===================================
``<name>.weight``           int8 / float8_e4m3  (out, in)      the codes: ``W ≈ weight_scale * q``
``<name>.weight_scale``     float32             (out, 1) or    per output channel, or one per
                                                (1,)           tensor
``<name>.input_scale``      float32             (1,)           static activations only
``<name>.bias``             float16             (out,)         when the layer has one
==========================  ==================  =============  ===================================

KV cache: ``<layer>.self_attn.k_scale`` and ``v_scale`` (float16; (num_kv_heads, 1, 1) for the
``attn_head`` strategy, (1,) for ``tensor``), dequantizing ``k = k_scale * q``.

``quantization_config``: ``quant_method: compressed-tensors``, ``format`` ``int-quantized`` /
``float-quantized`` (``dense`` when only the KV cache is quantized), ``config_groups.group_0``
with ``targets: [Linear]``, the ``weights`` args (8 bits, int or float, symmetric, strategy
channel or tensor, static) and ``input_activations`` (strategy ``token`` and ``dynamic: true``,
strategy ``tensor`` and ``dynamic: false``, or null for W8A16 FP8), ``ignore`` (the float
linears, lm_head among them) and ``kv_cache_scheme`` (8 bits, int or float, strategy
``attn_head`` or ``tensor``, symmetric) or null.

Sources (how the loaders read these folders):

* vLLM ``model_executor/layers/quantization/compressed_tensors/compressed_tensors.py``:
  ``_quantization_scheme_map_from_config`` (input activations are read for the activation
  formats ``naive-/int-/float-quantized``; ``input_activations: null`` is allowed only for float
  weights, i.e. W8A16 FP8), ``_is_dynamic_token_w8a8`` / ``_is_static_tensor_w8a8`` (8-bit
  symmetric int weights per tensor or channel with token-dynamic or tensor-static inputs),
  ``_is_fp8_w8a8`` / ``_is_fp8_w8a16``, ``get_quant_method`` (attention layers get
  ``CompressedTensorsKVCacheMethod``, whose ``validate_kv_cache_scheme`` accepts 8-bit float,
  symmetric, strategy ``tensor`` — and ``attn_head`` in current releases; vLLM has no INT8 KV
  cache, so KV-INT8 folders run in quantkit only);
* vLLM ``schemes/compressed_tensors_w8a8_int8.py``, ``compressed_tensors_w8a8_fp8.py``,
  ``compressed_tensors_w8a16_fp8.py`` (``create_weights``: the tensor names, dtypes and shapes
  above); ``model_loader/weight_utils.py`` (``maybe_remap_kv_scale_name``) and
  ``quantization/kv_cache.py`` (``BaseKVCacheMethod``: ``k_scale``/``v_scale`` on the attention);
* compressed-tensors ``compressors/naive_quantized/base.py`` (``IntQuantizationCompressor``,
  ``FloatQuantizationCompressor``: ``weight`` and ``weight_scale``, no zero point when symmetric),
  ``quantization/quant_args.py`` (the args' fields), ``quantization/lifecycle/initialize.py``
  (scale shapes per strategy, ``attn_head`` = (heads, 1, 1)) and ``quantization/lifecycle/apply.py``
  (``kv_cache_scheme`` becomes the attention's input-activation scheme).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantkit.errors import QuantkitError
from quantkit.formats.checkpoint_files import read_config_json, read_safetensors
from quantkit.formats.quantized_folder import (
    STORAGE_DTYPE,
    empty_model,
    finish_loading,
    float_linears,
    install_layer,
    linear_module,
    linear_shape,
    resolve_dtype,
    write_quantized_folder,
)
from quantkit.quant.kv_cache import (
    attach_kv_scales,
    kv_cache_scheme_args,
    use_kv_quantized_attention,
)
from quantkit.quant.w8a8 import FP8_DTYPE, EightBitWeight
from quantkit.quant.w8a8_linear import W8A8Linear

INT_QUANTIZED = "int-quantized"
FLOAT_QUANTIZED = "float-quantized"
DENSE = "dense"
EIGHT_BIT_FORMATS = (INT_QUANTIZED, FLOAT_QUANTIZED, DENSE)
LAYOUT_VERSION = "0.20.0"


def weight_args(kind: str, strategy: str) -> dict:
    """compressed-tensors ``QuantizationArgs`` of 8-bit symmetric static weights."""
    return {"num_bits": 8, "type": kind, "symmetric": True, "group_size": None, "strategy": strategy,
            "block_structure": None, "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def input_args(kind: str, activations: str) -> dict | None:
    """The ``input_activations`` args: per-token dynamic, per-tensor static, or None (weight-only)."""
    if activations == "none":
        return None
    dynamic = activations == "dynamic"
    return {"num_bits": 8, "type": kind, "symmetric": True, "group_size": None,
            "strategy": "token" if dynamic else "tensor", "block_structure": None, "dynamic": dynamic,
            "actorder": None, "observer": None if dynamic else "minmax", "observer_kwargs": {}}


def eight_bit_quantization_config(model: nn.Module, quantized: Mapping[str, EightBitWeight], weights,
                                  kv_cache) -> dict:
    """config.json's ``quantization_config`` for ``weights`` (an ``EightBitStep`` or None: float
    weights) and ``kv_cache`` (a ``KVCacheStep`` or None)."""
    if weights is None:
        fmt, groups, ignore = DENSE, {}, []
    else:
        fmt = INT_QUANTIZED if weights.type == "int" else FLOAT_QUANTIZED
        groups = {"group_0": {"targets": ["Linear"], "weights": weight_args(weights.type, weights.weight_strategy),
                              "input_activations": input_args(weights.type, weights.activations),
                              "output_activations": None}}
        ignore = float_linears(model, quantized)
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "version": LAYOUT_VERSION,
        "config_groups": groups,
        "ignore": ignore,
        "kv_cache_scheme": None if kv_cache is None else kv_cache_scheme_args(kv_cache.type, kv_cache.strategy),
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def save_8bit_checkpoint(model: nn.Module, tokenizer, quantized: Mapping[str, EightBitWeight], weights, kv_cache,
                         out_dir: Path | str, *, overwrite: bool = False) -> Path:
    """Write ``model`` with its 8-bit layers (and KV scales on its attention modules) atomically."""
    if weights is None and kv_cache is None:
        raise ValueError("nothing to write: neither 8-bit weights nor a KV-cache scheme")
    _check(model, quantized, weights)
    if kv_cache is not None:
        _check_kv_scales(model, kv_cache)
    qcfg = eight_bit_quantization_config(model, quantized, weights, kv_cache)
    tensors = _tensors(model, quantized)
    return write_quantized_folder(model, tokenizer, quantized, qcfg, tensors, out_dir, overwrite)


def _check(model: nn.Module, quantized: Mapping[str, EightBitWeight], weights) -> None:
    for name, record in quantized.items():
        module = linear_module(model, name)
        if isinstance(module, Conv1D):
            raise QuantkitError(f"layer '{name}' is a GPT-2 Conv1D; the compressed-tensors layout holds nn.Linear "
                                "layers only: add it to the ignore list")
        if (record.out_features, record.in_features) != linear_shape(model, name):
            raise ValueError(f"8-bit weight of '{name}' has shape {tuple(record.weight.shape)}, "
                             f"layer has {linear_shape(model, name)}")
        if weights is not None and (record.type, record.strategy, record.activations) != (
                weights.type, weights.weight_strategy, weights.activations):
            raise ValueError(f"'{name}' was quantized with a different scheme than {weights.name}")


def _check_kv_scales(model: nn.Module, kv_cache) -> None:
    missing = [name for name, module in _attention_modules(model) if getattr(module, "k_scale", None) is None]
    if missing:
        raise QuantkitError(f"attention modules without calibrated KV scales: {missing[:3]}; refusing to write a "
                            "kv_cache_scheme with default scales")


def _tensors(model: nn.Module, quantized: Mapping[str, EightBitWeight]) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for name, record in quantized.items():
        state.pop(f"{name}.weight", None)
        bias = state.pop(f"{name}.bias", None)
        layer = W8A8Linear.from_quantized(record.cpu(), None if bias is None else bias.detach().cpu(), STORAGE_DTYPE)
        for key, value in layer.state_dict().items():
            tensors[f"{name}.{key}"] = value.contiguous()
    seen: set[int] = set()
    for key, value in state.items():
        if value.numel() and value.data_ptr() in seen:  # tied weights once
            continue
        seen.add(value.data_ptr())
        value = value.detach().cpu()
        tensors[key] = (value.to(STORAGE_DTYPE) if value.is_floating_point() else value).contiguous()
    return tensors


# --- reading ----------------------------------------------------------------------------------------


def load_8bit_checkpoint(path: Path | str, *, dtype: torch.dtype | str = torch.float32,
                         device: str | torch.device = "cpu") -> nn.Module:
    """The model of an ``int-quantized``, ``float-quantized`` or ``dense`` (KV-only) folder."""
    dtype = resolve_dtype(dtype, device)
    qcfg = read_config_json(path).get("quantization_config") or {}
    fmt = qcfg.get("format")
    if fmt not in EIGHT_BIT_FORMATS:
        raise QuantkitError(f"'{path}' has compressed-tensors format {fmt!r}; expected one of "
                            f"{', '.join(EIGHT_BIT_FORMATS)}")
    groups = _read_groups(qcfg, path, fmt)
    tensors = read_safetensors(path)
    model = empty_model(path, dtype)
    for name in _eight_bit_layers(tensors):
        kind, strategy, activations = _scheme_for(model, name, groups, path)
        out_features, in_features = linear_shape(model, name)
        layer = W8A8Linear(in_features, out_features, kind=kind, strategy=strategy, activations=activations,
                           bias=f"{name}.bias" in tensors, dtype=dtype)
        install_layer(model, name, layer, tensors, "compressed-tensors")
    install_kv_cache_scales(model, tensors, qcfg.get("kv_cache_scheme"), path)
    return finish_loading(model, tensors, dtype, path, device)


def _eight_bit_layers(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    names = []
    for key in tensors:
        if key.endswith(".weight_scale"):
            name = key.removesuffix(".weight_scale")
            weight = tensors.get(f"{name}.weight")
            if weight is not None and weight.dtype in (torch.int8, FP8_DTYPE):
                names.append(name)
    return sorted(names)


def _read_groups(qcfg: dict, path, fmt: str) -> list[dict]:
    groups = qcfg.get("config_groups") or {}
    if not isinstance(groups, dict):
        raise QuantkitError(f"'{path}/config.json' has malformed config_groups")
    checked = []
    for label, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("targets"), list):
            raise QuantkitError(f"config group '{label}' of '{path}' is not a scheme with targets")
        weights = group.get("weights") or {}
        strategy = str(weights.get("strategy", "")).lower()
        kind = str(weights.get("type", "int")).lower()
        if weights.get("num_bits") != 8 or strategy not in ("channel", "tensor") or kind not in ("int", "float") \
                or not weights.get("symmetric", True) or weights.get("dynamic"):
            raise QuantkitError(f"config group '{label}' of '{path}' (format {fmt!r}) has weights quantkit cannot "
                                f"read as 8-bit ({weights}); it reads 8-bit symmetric static int/float weights per "
                                "channel or tensor")
        inputs = group.get("input_activations")
        if inputs is None:
            if kind != "float":
                raise QuantkitError(f"config group '{label}' of '{path}': int-quantized weights need "
                                    "input_activations (W8A8)")
            activations = "none"
        else:
            in_strategy = str(inputs.get("strategy", "")).lower()
            if inputs.get("num_bits") != 8 or str(inputs.get("type", "int")).lower() != kind \
                    or not inputs.get("symmetric", True):
                raise QuantkitError(f"config group '{label}' of '{path}' has input activations quantkit cannot "
                                    f"read ({inputs}); it reads 8-bit symmetric inputs of the weights' type")
            if inputs.get("dynamic") and in_strategy == "token":
                activations = "dynamic"
            elif not inputs.get("dynamic") and in_strategy == "tensor":
                activations = "static"
            else:
                raise QuantkitError(f"config group '{label}' of '{path}': input activations must be dynamic per "
                                    f"token or static per tensor (got strategy {in_strategy!r}, dynamic "
                                    f"{inputs.get('dynamic')!r})")
        checked.append({"targets": group["targets"], "scheme": (kind, strategy, activations)})
    return checked


def _scheme_for(model: nn.Module, name: str, groups: list[dict], path) -> tuple[str, str, str]:
    from quantkit.formats.compressed_tensors import _matches

    module = linear_module(model, name)
    for group in groups:
        if any(_matches(target, name, module) for target in group["targets"]):
            return group["scheme"]
    raise QuantkitError(f"'{path}' stores layer '{name}' in 8 bits, but no config group targets it")


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from quantkit.models.adapters import get_adapter

    adapter = get_adapter(model.config)
    prefix = adapter.layer_prefix(model)
    found = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        attention = adapter.attention(layer)
        relative = next(n for n, m in layer.named_modules() if m is attention)
        found.append((f"{prefix}.{index}.{relative}", attention))
    return found


def install_kv_cache_scales(model: nn.Module, tensors: dict[str, torch.Tensor], scheme: dict | None, path) -> None:
    """Move each attention's ``k_scale``/``v_scale`` from ``tensors`` onto the module and route the
    model's attention through the KV-quantizing function. Every attention must have both scales."""
    stray = [key for key in tensors if key.endswith((".k_scale", ".v_scale"))]
    if scheme is None:
        if stray:
            raise QuantkitError(f"'{path}' stores KV-cache scales ({stray[0]}) but config.json has no kv_cache_scheme")
        return
    kind, strategy = str(scheme.get("type", "")).lower(), str(scheme.get("strategy", "")).lower()
    if scheme.get("num_bits") != 8 or kind not in ("int", "float") or strategy not in ("attn_head", "tensor") \
            or not scheme.get("symmetric", True) or scheme.get("dynamic"):
        raise QuantkitError(f"kv_cache_scheme of '{path}' is not one quantkit runs ({scheme}); it reads static "
                            "symmetric 8-bit int or float scales per attention head or per tensor")
    heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    for name, attention in _attention_modules(model):
        try:
            k_scale, v_scale = tensors.pop(f"{name}.k_scale"), tensors.pop(f"{name}.v_scale")
        except KeyError:
            raise QuantkitError(f"'{path}' declares a kv_cache_scheme but lacks {name}.k_scale/v_scale; "
                                "quantkit does not fall back to a scale of 1.0") from None
        expected = (heads, 1, 1) if strategy == "attn_head" else (1,)
        for label, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
            if scale.numel() != (heads if strategy == "attn_head" else 1) or not bool((scale.float() > 0).all()):
                raise QuantkitError(f"{name}.{label} of '{path}' has shape {tuple(scale.shape)} (expected "
                                    f"{expected}) or a non-positive value")
        attach_kv_scales(attention, k_scale.float().reshape(expected), v_scale.float().reshape(expected), kind)
    use_kv_quantized_attention(model.config)
