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

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats.checkpoint_files import read_config_json
from quantkit.formats.layout import QuantizedLayout
from quantkit.formats.quantized_folder import (
    check_quantized_layers,
    has_act_order,
    head_name,
    linear_shape,
)
from quantkit.quant.linear import QuantLinear, check_packable
from quantkit.quant.rtn import QuantizedWeight
from quantkit.quant.scheme import QuantScheme

GPTQ_FORMAT = "gptq"
QUANTIZE_CONFIG_NAME = "quantize_config.json"


def gptq_quantization_config(
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    scheme: QuantScheme,
    algorithm_config: dict,
) -> dict:
    """The ``quantization_config`` entry that GPTQ loaders read."""
    permuted = any(has_act_order(qw) for qw in quantized.values())
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
        "lm_head": head_name(model) in quantized,
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


def _check(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight], scheme: QuantScheme
) -> None:
    check_quantized_layers(
        model, quantized, scheme, "GPTQ", allow_conv1d=True, fits=_fits
    )


def _fits(qw: QuantizedWeight) -> None:
    check_packable(qw.in_features, qw.out_features, qw.bits)


def _quantize_config_file(qcfg: dict) -> dict[str, str]:
    # GPTQModel and AutoGPTQ also read the config from quantize_config.json.
    return {QUANTIZE_CONFIG_NAME: json.dumps(qcfg, indent=2) + "\n"}


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
    head = head_name(model)
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


def _empty_layer(
    model: nn.Module, name: str, tensors: dict[str, torch.Tensor], qcfg: dict
) -> QuantLinear:
    out_features, in_features = linear_shape(model, name)
    return QuantLinear(
        in_features, out_features, qcfg["bits"], qcfg["group_size"],
        bias=f"{name}.bias" in tensors,
    )  # fmt: skip


LAYOUT = QuantizedLayout(
    name="GPTQ",
    marker="qweight",
    layer_class=QuantLinear,
    check=_check,
    quantization_config=gptq_quantization_config,
    read_settings=_read_gptq_config,
    empty_layer=_empty_layer,
    # Some older checkpoints omit g_idx; the layer then keeps consecutive groups.
    optional_tensors=("g_idx",),
    extra_files=_quantize_config_file,
)
save_gptq = LAYOUT.save
load_gptq_model = LAYOUT.load
