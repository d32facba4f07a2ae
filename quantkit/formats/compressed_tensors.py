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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.formats.checkpoint_files import read_config_json
from quantkit.formats.layout import QuantizedLayout
from quantkit.formats.quantized_folder import (
    STORAGE_DTYPE,
    check_quantized_layers,
    float_linears,
    linear_module,
    linear_shape,
    refuse_act_order,
)
from quantkit.quant.pack_quantized_linear import PackQuantizedLinear
from quantkit.quant.packing import PACKABLE_BITS
from quantkit.quant.rtn import QuantizedWeight
from quantkit.quant.scheme import QuantScheme

QUANT_METHOD = "compressed-tensors"
PACK_QUANTIZED = "pack-quantized"
# The compressed-tensors release whose layout and config this writer follows.
LAYOUT_VERSION = "0.20.0"


@dataclass(frozen=True)
class ConfigGroups:
    """The checked config groups of a ``pack-quantized`` folder."""

    path: Path | str
    groups: list[dict]
    kv_cache_scheme: dict | None = None


def compressed_tensors_quantization_config(
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    scheme: QuantScheme,
    algorithm_config: dict | None = None,
) -> dict:
    """The ``quantization_config`` entry that compressed-tensors, transformers and vLLM read.

    ``algorithm_config`` is accepted like every layout's; this config has no place for it, except
    its ``kv_cache_scheme`` (a quantized KV cache, whose scales the attention modules hold:
    ``quantkit.formats.compressed_tensors_8bit``).
    """
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
        "kv_cache_scheme": (algorithm_config or {}).get("kv_cache_scheme"),
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


def _check(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight], scheme: QuantScheme
) -> None:
    check_quantized_layers(model, quantized, scheme, "compressed-tensors")
    refuse_act_order(quantized, "current compressed-tensors cannot load")


def _read_settings(path: Path | str) -> ConfigGroups:
    qcfg = read_config_json(path).get("quantization_config") or {}
    return ConfigGroups(path, _read_config_groups(path), qcfg.get("kv_cache_scheme"))


def _install_kv_cache_scales(model: nn.Module, tensors: dict[str, torch.Tensor], settings: ConfigGroups) -> None:
    from quantkit.formats.compressed_tensors_8bit import install_kv_cache_scales

    install_kv_cache_scales(model, tensors, settings.kv_cache_scheme, settings.path)


@dataclass(frozen=True)
class _CompressedTensorsLayout(QuantizedLayout):
    """``pack-quantized`` folders load here; the 8-bit formats (``int-quantized``,
    ``float-quantized``, and ``dense`` with a quantized KV cache) in ``compressed_tensors_8bit``."""

    def load(self, path: Path | str, *, dtype: torch.dtype | str = torch.float32,
             device: str | torch.device = "cpu") -> Any:
        from quantkit.formats.compressed_tensors_8bit import (
            EIGHT_BIT_FORMATS,
            load_8bit_checkpoint,
        )

        qcfg = read_config_json(path).get("quantization_config")
        if isinstance(qcfg, dict) and qcfg.get("format") in EIGHT_BIT_FORMATS:
            return load_8bit_checkpoint(path, dtype=dtype, device=device)
        return super().load(path, dtype=dtype, device=device)


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


def _weight_args_for(model: nn.Module, name: str, settings: ConfigGroups) -> dict:
    """The weights args of the first config group whose targets match layer ``name``."""
    module = linear_module(model, name)
    for group in settings.groups:
        if any(_matches(target, name, module) for target in group["targets"]):
            return group["weights"]
    raise QuantkitError(
        f"'{settings.path}' stores layer '{name}' packed, but no config group targets it"
    )


def _matches(target: str, name: str, module: nn.Module) -> bool:
    """compressed-tensors target matching: ``re:`` regex, exact name, or a class name."""
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name or target in {cls.__name__ for cls in type(module).__mro__}


def _check_weight_shape(
    tensors: dict[str, torch.Tensor], name: str, out_features: int, in_features: int
) -> None:
    stored = tensors.get(f"{name}.weight_shape")
    if stored is not None and stored.tolist() != [out_features, in_features]:
        raise QuantkitError(
            f"'{name}.weight_shape' is {stored.tolist()} but the layer is "
            f"[{out_features}, {in_features}]"
        )


def _empty_layer(
    model: nn.Module, name: str, tensors: dict[str, torch.Tensor], settings: ConfigGroups
) -> PackQuantizedLinear:
    args = _weight_args_for(model, name, settings)
    out_features, in_features = linear_shape(model, name)
    _check_weight_shape(tensors, name, out_features, in_features)
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


LAYOUT = _CompressedTensorsLayout(
    name="compressed-tensors",
    marker="weight_packed",
    layer_class=PackQuantizedLinear,
    check=_check,
    quantization_config=compressed_tensors_quantization_config,
    read_settings=_read_settings,
    empty_layer=_empty_layer,
    prepare_model=_install_kv_cache_scales,
)
save_compressed_tensors = LAYOUT.save
load_compressed_tensors_model = LAYOUT.load
