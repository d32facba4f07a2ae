"""The compressed-tensors ``pack-quantized`` checkpoint layout (W2/W3/W4/W8 A16): writer and reader.

The folder is a Hugging Face model folder (config.json, model.safetensors, generation_config.json,
tokenizer files). Each quantized linear layer ``<name>`` with ``in`` inputs, ``out`` outputs,
``b`` bits and ``G`` groups (``in / group_size``; 1 per channel) stores:

=============================  =======  ===================  ====================================
tensor                         dtype    shape                content
=============================  =======  ===================  ====================================
``<name>.weight_packed``       int32    (out, ceil(in*b/32)) ``q`` packed along the INPUT
                                                             dimension, one dense bit stream per
                                                             row, low bits first
``<name>.weight_scale``        float16  (out, G)             one scale per channel and group
``<name>.weight_shape``        int64    (2,)                 ``[out, in]``
``<name>.weight_zero_point``   int32    (ceil(out*b/32), G)  asymmetric only: ``z`` packed along
                                                             the OUTPUT dimension
``<name>.bias``                float16  (out,)               only when the layer has a bias
=============================  =======  ===================  ====================================

where ``q`` and ``z`` are quantkit's unsigned codes and zero points: compressed-tensors' signed
values plus ``2**(b-1)``, which is exactly what ``pack-quantized`` stores, so
``W[o, i] = scale[o, i // group_size] * (q[o, i] - z[o, i // group_size])`` with ``z = 2**(b-1)``
for symmetric schemes (see ``quantkit.quant.pack_quantized_linear``). Every other tensor is
stored under its usual name in float16. ``quantization_config`` is what compressed-tensors'
``ModelCompressor.update_config`` writes: ``quant_method: "compressed-tensors"``,
``format: "pack-quantized"``, ``quantization_status: "compressed"``, ``version``,
``config_groups.group_0`` (``targets: ["Linear"]``, the ``weights`` quantization args,
``input_activations: null``), ``ignore`` (full names of the linear layers left in float),
``kv_cache_scheme: null``, ``global_compression_ratio: null``, ``sparsity_config: {}`` and
``transform_config: {}``.

Facts this layout rests on, from the sources of the tools that write and read it:

* compressed-tensors ``compressors/pack_quantized/base.py`` and ``helpers.py`` (tensor names;
  the ``+ 2**(b-1)`` offset; dense packing in which 32 values fill exactly ``b`` words, so 3-bit
  values cross words; zero points packed with ``packed_dim=0`` for the group and channel
  strategies and not stored for symmetric schemes), ``quantization/quant_args.py``
  (``QuantizationArgs``: unknown fields are forbidden; ``strategy: channel`` takes no positive
  group size; ``actorder: "group"``, the only mode with ``weight_g_idx``, is rejected since 0.20),
  ``quantization/quant_scheme.py`` (the ``W4A16``/``W8A16``/``W4A16_ASYM`` presets) and
  ``compressors/model_compressors/model_compressor.py`` (``update_config``: the top-level keys).
* vLLM ``compressed_tensors/compressed_tensors.py`` (``ignore`` and ``targets`` matching; only
  ``LinearBase`` layers are quantized, so vLLM cannot load a quantized lm_head, which
  compressed-tensors, transformers and quantkit do load) and
  ``schemes/compressed_tensors_wNa16.py`` (4 and 8 bits; symmetric as ``uint4b8``/``uint8b128``,
  asymmetric as ``uint4``/``uint8`` with ``weight_zero_point`` (out / pack_factor, G)).
* transformers ``utils/quantization_config.py`` (``CompressedTensorsConfig`` hands the dict to
  ``compressed_tensors.QuantizationConfig``).

Bit widths: vLLM runs 4- and 8-bit ``pack-quantized`` weights; 2- and 3-bit checkpoints load in
compressed-tensors and transformers (and quantkit). For 2, 4 and 8 bits every compressed-tensors
release packs alike; for 3 bits releases before the dense packing put 10 values in a word (2 bits
unused), so a 3-bit checkpoint needs a compressed-tensors with dense packing (0.20 has it).

Asymmetric checkpoints load in transformers with ``CompressedTensorsConfig(dequantize=True)``;
its default compressed mode (transformers 5.23, compressed-tensors 0.20) sizes
``weight_zero_point`` unpacked and refuses the packed tensor the library itself writes.

Act-order weights (a permuted g_idx) are refused: the current library rejects ``actorder:
"group"``. The reader still accepts ``weight_g_idx`` in older checkpoints. The writer's
``algorithm_config`` has no field in this config and is not stored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from quantkit.errors import QuantkitError
from quantkit.formats.checkpoint_files import read_config_json, read_safetensors
from quantkit.formats.gptq import STORAGE_DTYPE, _linear_module, _resolve_dtype
from quantkit.formats.quantized_folder import (
    check_quantized_layers,
    checkpoint_tensors,
    empty_model,
    finish_loading,
    float_linears,
    install_layer,
    linear_shape,
    write_quantized_folder,
)
from quantkit.quant.pack_quantized_linear import PackQuantizedLinear
from quantkit.quant.packing import PACKABLE_BITS
from quantkit.quant.rtn import QuantizedWeight, default_g_idx
from quantkit.quant.scheme import QuantScheme

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
# The compressed-tensors release whose layout and config this writer follows.
LAYOUT_VERSION = "0.20.0"
LAYOUT = "compressed-tensors"


def save_compressed_tensors(
    model: PreTrainedModel,
    tokenizer,
    quantized: Mapping[str, QuantizedWeight],
    scheme: QuantScheme,
    out_dir: Path | str,
    *,
    overwrite: bool = False,
    algorithm_config: dict | None = None,
) -> Path:
    """Write ``model`` with the ``quantized`` layers in the ``pack-quantized`` layout to ``out_dir``.

    ``quantized`` maps full module names to their quantized weights (out, in). Nothing appears at
    ``out_dir`` unless the whole folder was written. ``algorithm_config`` is accepted for the
    common writer signature; the compressed-tensors config has no place for it.
    """
    check_quantized_layers(model, quantized, scheme, LAYOUT)
    for name, qw in quantized.items():
        if not torch.equal(
            qw.g_idx.cpu(), default_g_idx(qw.in_features, qw.group_size)
        ):
            raise QuantkitError(
                f"layer '{name}' was quantized with act-order (permuted groups), which current "
                "compressed-tensors cannot load; quantize without act-order or use --format gptq"
            )
    qcfg = compressed_tensors_quantization_config(model, quantized, scheme)
    tensors = checkpoint_tensors(model, quantized, _pack_layer)
    return write_quantized_folder(
        model, tokenizer, quantized, qcfg, tensors, out_dir, overwrite
    )


def compressed_tensors_quantization_config(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight], scheme: QuantScheme
) -> dict:
    """The ``quantization_config`` entry that compressed-tensors, transformers and vLLM read."""
    return {
        "quant_method": QUANT_METHOD,
        "format": PACK_QUANTIZED,
        "quantization_status": "compressed",
        "version": LAYOUT_VERSION,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weight_quantization_args(scheme),
                "input_activations": None,
                "output_activations": None,
            }
        },
        "ignore": float_linears(model, quantized),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
    }


def weight_quantization_args(scheme: QuantScheme) -> dict:
    """compressed-tensors ``QuantizationArgs`` of the scheme's weights, as a JSON dict."""
    grouped = scheme.group_size != -1
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "group_size": scheme.group_size if grouped else None,
        "strategy": "group" if grouped else "channel",
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def load_compressed_tensors_model(
    path: Path | str,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
) -> PreTrainedModel:
    """Build the model a ``pack-quantized`` folder describes, with ``PackQuantizedLinear`` layers.

    Non-quantized tensors are cast to ``dtype`` (a torch dtype, its name, or "auto"); quantized
    layers keep their stored buffers and compute in the dtype of their input.
    """
    dtype = _resolve_dtype(dtype, device)
    groups = _read_config_groups(path)
    tensors = read_safetensors(path)
    model = empty_model(path, dtype)
    suffix = ".weight_packed"
    packed = sorted(key.removesuffix(suffix) for key in tensors if key.endswith(suffix))
    for name in packed:
        args = _weight_args_for(model, name, groups, path)
        layer = _empty_layer(model, name, args, tensors)
        install_layer(model, name, layer, tensors, LAYOUT)
        if layer.weight_shape.tolist() != [layer.out_features, layer.in_features]:
            raise QuantkitError(
                f"'{name}.weight_shape' is {layer.weight_shape.tolist()} but the layer is "
                f"[{layer.out_features}, {layer.in_features}]"
            )
    return finish_loading(model, tensors, dtype, path, device)


def _pack_layer(qw: QuantizedWeight, bias: torch.Tensor | None) -> PackQuantizedLinear:
    return PackQuantizedLinear.from_quantized(qw, bias, STORAGE_DTYPE)


def _read_config_groups(path: Path | str) -> list[dict]:
    """The config groups of a ``pack-quantized`` folder, each checked to be weight-only int."""
    qcfg = read_config_json(path).get("quantization_config")
    if (
        not isinstance(qcfg, dict)
        or str(qcfg.get("quant_method", "")).lower() != QUANT_METHOD
    ):
        raise QuantkitError(
            f"'{path}' is not a compressed-tensors checkpoint (config.json quant_method is not "
            f"'{QUANT_METHOD}')"
        )
    groups = qcfg.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantkitError(
            f"'{path}/config.json' has no compressed-tensors config_groups"
        )
    checked = []
    for label, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("targets"), list):
            raise QuantkitError(
                f"config group '{label}' of '{path}' is not a scheme with targets; quantkit "
                "reads explicit schemes, not preset names"
            )
        layout = group.get("format") or qcfg.get("format")
        if layout != PACK_QUANTIZED:
            raise QuantkitError(
                f"config group '{label}' of '{path}' uses format '{layout}'; quantkit reads "
                f"'{PACK_QUANTIZED}' checkpoints only"
            )
        _check_weight_only(group, label, path)
        checked.append(group)
    return checked


def _check_weight_only(group: dict, label: str, path: Path | str) -> None:
    if group.get("input_activations") or group.get("output_activations"):
        raise QuantkitError(
            f"config group '{label}' of '{path}' quantizes activations; quantkit reads weight-only "
            "(W*A16) compressed-tensors checkpoints"
        )
    args = group.get("weights")
    if not isinstance(args, dict):
        raise QuantkitError(
            f"config group '{label}' of '{path}' has no weights quantization args"
        )
    strategy = str(args.get("strategy", "")).lower()
    problems = {
        "type": str(args.get("type", "int")).lower() != "int",
        "num_bits": args.get("num_bits") not in PACKABLE_BITS,
        "dynamic": bool(args.get("dynamic", False)),
        "strategy": strategy not in ("group", "channel"),
        "group_size": strategy == "group"
        and not (isinstance(args.get("group_size"), int) and args["group_size"] > 0),
    }
    wrong = [field for field, bad in problems.items() if bad]
    if wrong:
        raise QuantkitError(
            f"config group '{label}' of '{path}' has weights {', '.join(wrong)} that quantkit "
            f"cannot read ({args}); it reads static int weights of {PACKABLE_BITS} bits with "
            "group or channel strategy"
        )


def _weight_args_for(
    model: nn.Module, name: str, groups: list[dict], path: Path | str
) -> dict:
    """The weights args of the first config group whose targets match layer ``name``."""
    module = _linear_module(model, name)
    for group in groups:
        if any(_matches(target, name, module) for target in group["targets"]):
            return group["weights"]
    raise QuantkitError(
        f"'{path}' stores layer '{name}' packed, but no config group targets it"
    )


def _matches(target: str, name: str, module: nn.Module) -> bool:
    """compressed-tensors target matching: ``re:`` regex, exact name, or a class name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target in {cls.__name__ for cls in type(module).__mro__}


def _empty_layer(
    model: nn.Module, name: str, args: dict, tensors: dict[str, torch.Tensor]
) -> PackQuantizedLinear:
    out_features, in_features = linear_shape(model, name)
    scale = tensors.get(f"{name}.weight_scale")
    grouped = str(args["strategy"]).lower() == "group"
    return PackQuantizedLinear(
        in_features,
        out_features,
        args["num_bits"],
        args["group_size"] if grouped else -1,
        symmetric=bool(args.get("symmetric", True)),
        bias=f"{name}.bias" in tensors,
        g_idx=f"{name}.weight_g_idx" in tensors,
        dtype=STORAGE_DTYPE if scale is None else scale.dtype,
    )
