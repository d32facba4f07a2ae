"""The AutoAWQ GEMM checkpoint layout (``version: "gemm"``, 4-bit): writer and reader.

The folder is a Hugging Face model folder (config.json, model.safetensors, generation_config.json,
tokenizer files). Each quantized linear layer ``<name>`` with ``in`` inputs, ``out`` outputs and
``G = in / group_size`` groups (1 for group_size -1) stores:

==================  =======  ============  ====================================================
tensor              dtype    shape         content
==================  =======  ============  ====================================================
``<name>.qweight``  int32    (in, out/8)   4-bit codes packed along the OUTPUT dimension;
                                           nibble ``i`` of word ``c`` holds output column
                                           ``8c + [0, 2, 4, 6, 1, 3, 5, 7][i]``
``<name>.qzeros``   int32    (G, out/8)    zero points, packed the same way, no offset
``<name>.scales``   float16  (G, out)      one scale per group and output channel
``<name>.bias``     float16  (out,)        only when the layer has a bias
==================  =======  ============  ====================================================

and ``W[o, i] = scales[i // group_size, o] * (q[i, o] - z[i // group_size, o])`` (see
``quantkit.quant.awq_linear``). There is no g_idx: groups are consecutive input rows, so weights
quantized with act-order are refused. Every other tensor is stored under its usual name in
float16. ``quantization_config`` holds ``quant_method: "awq"``, ``bits: 4``, ``group_size``,
``zero_point: true``, ``version: "gemm"``, ``modules_to_not_convert`` (full names of the linear
layers left in float) and, as in quantkit's GPTQ configs, ``meta`` naming the quantizer.

Facts this layout rests on, from the sources of the tools that write and read it:

* AutoAWQ ``awq/modules/linear/gemm.py`` (``WQLinear_GEMM``: only 4 bits, buffer shapes, fp16
  scales and bias, the pack order, ``group_size -1`` meaning the whole input) and
  ``awq/utils/packing_utils.py`` (``dequantize_gemm``: ``(q - z) * s``, zeros stored as is, so
  a zero point of 0 is representable, unlike GPTQ v1).
* vLLM ``vllm/model_executor/layers/quantization/awq.py`` (``AWQConfig.from_config`` reads
  ``bits``/``w_bit``, ``group_size``/``q_group_size``, ``zero_point`` and
  ``modules_to_not_convert``, matched as substrings of layer names; only 4 bits; ``group_size -1``
  is the whole input; the kernels always read ``qzeros``) and ``awq_marlin.py``
  (``is_awq_marlin_compatible``: type ``uint4`` with zero points; a config with
  ``zero_point: false`` is not Marlin-compatible).
* transformers ``utils/quantization_config.py`` (``AwqConfig``: ``version`` is the legacy name
  of ``format``, ``gemm`` by default; it skips the output head, so lm_head cannot be quantized).

Symmetric schemes are therefore written with explicit zero points ``2**(bits-1) = 8`` and
``zero_point: true``: the same weights, and loadable by every AWQ kernel.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from quantkit import __version__
from quantkit.errors import QuantkitError
from quantkit.formats.checkpoint_files import read_config_json
from quantkit.formats.layout import QuantizedLayout
from quantkit.formats.quantized_folder import (
    STORAGE_DTYPE,
    check_quantized_layers,
    float_linears,
    head_name,
    linear_shape,
    refuse_act_order,
)
from quantkit.quant.awq_linear import AWQ_BITS, AwqLinear, check_awq_shape
from quantkit.quant.rtn import QuantizedWeight
from quantkit.quant.scheme import QuantScheme

AWQ_VERSION = "gemm"


def awq_quantization_config(
    model: nn.Module,
    quantized: Mapping[str, QuantizedWeight],
    scheme: QuantScheme,
    algorithm_config: dict,
) -> dict:
    """The ``quantization_config`` entry that AutoAWQ, transformers and vLLM read."""
    quantizer = [f"quantkit:{__version__}"]
    return {
        "quant_method": "awq",
        "bits": AWQ_BITS,
        "group_size": scheme.group_size,
        "zero_point": True,
        "version": AWQ_VERSION,
        "modules_to_not_convert": float_linears(model, quantized),
        "meta": {
            "quantizer": quantizer,
            "quantkit": {"scheme": scheme.name, **algorithm_config},
        },
    }


def _check(
    model: nn.Module, quantized: Mapping[str, QuantizedWeight], scheme: QuantScheme
) -> None:
    if scheme.bits != AWQ_BITS:
        raise QuantkitError(
            f"the AWQ GEMM layout stores 4-bit weights only, not {scheme.bits}-bit; "
            "use --format gptq or --format compressed-tensors"
        )
    check_quantized_layers(model, quantized, scheme, "AWQ", fits=_fits)
    head = head_name(model)
    if head in quantized:
        raise QuantkitError(
            f"the AWQ layout cannot hold a quantized output head ('{head}'): transformers and vLLM "
            "load it in float; keep it in the ignore list"
        )
    refuse_act_order(quantized, "the AWQ layout cannot store")


def _fits(qw: QuantizedWeight) -> None:
    check_awq_shape(qw.in_features, qw.out_features, qw.group_size)


def _read_awq_group_size(path: Path | str) -> int:
    """The group size of an AWQ GEMM 4-bit folder; anything else is refused."""
    qcfg = read_config_json(path).get("quantization_config")
    if not isinstance(qcfg, dict) or str(qcfg.get("quant_method", "")).lower() != "awq":
        raise QuantkitError(
            f"'{path}' is not an AWQ checkpoint (config.json quant_method is not 'awq')"
        )
    version = str(qcfg.get("version") or qcfg.get("format") or AWQ_VERSION).lower()
    if version != AWQ_VERSION:
        raise QuantkitError(
            f"'{path}' uses AWQ version '{version}'; quantkit reads only the 'gemm' layout"
        )
    bits = qcfg.get("bits", qcfg.get("w_bit"))
    if bits != AWQ_BITS:
        raise QuantkitError(
            f"'{path}/config.json' has AWQ bits {bits!r}; the GEMM layout is 4-bit"
        )
    group_size = qcfg.get("group_size", qcfg.get("q_group_size"))
    valid = isinstance(group_size, int) and not isinstance(group_size, bool)
    if not valid or (group_size != -1 and group_size <= 0):
        raise QuantkitError(
            f"'{path}/config.json' has an invalid AWQ group_size {group_size!r}"
        )
    return group_size


def _empty_layer(
    model: nn.Module, name: str, tensors: dict[str, torch.Tensor], group_size: int
) -> AwqLinear:
    out_features, in_features = linear_shape(model, name)
    scales = tensors.get(f"{name}.scales")
    return AwqLinear(
        in_features, out_features, group_size, bias=f"{name}.bias" in tensors,
        dtype=STORAGE_DTYPE if scales is None else scales.dtype,
    )  # fmt: skip


LAYOUT = QuantizedLayout(
    name="AWQ",
    marker="qweight",
    layer_class=AwqLinear,
    check=_check,
    quantization_config=awq_quantization_config,
    read_settings=_read_awq_group_size,
    empty_layer=_empty_layer,
)
save_awq = LAYOUT.save
load_awq_model = LAYOUT.load
