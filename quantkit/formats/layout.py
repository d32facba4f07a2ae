"""The save and load flow that every checkpoint layout follows; each layout says only what differs.

Saving: check the quantized weights against the layout, build its ``quantization_config``, pack
each quantized layer with the layout's ``DequantLinear`` class and write the folder atomically.
Loading: read the layout's settings from config.json, build the float model with empty
parameters, put an empty packed layer (filled from the checkpoint) wherever a layer stores the
layout's marker tensor, then load the remaining float tensors. The layouts are
``quantkit.formats.gptq``, ``.awq`` and ``.compressed_tensors``; helpers live in
``quantkit.formats.quantized_folder``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from quantkit.errors import QuantkitError
from quantkit.formats.checkpoint_files import read_safetensors
from quantkit.formats.quantized_folder import (
    checkpoint_tensors,
    empty_model,
    finish_loading,
    install_layer,
    packed_layer_names,
    resolve_dtype,
    write_quantized_folder,
)
from quantkit.quant.dequant_linear import DequantLinear
from quantkit.quant.rtn import QuantizedWeight
from quantkit.quant.scheme import QuantScheme


def no_extra_files(qcfg: dict) -> dict[str, str]:
    """The folder holds only the usual files."""
    return {}


@dataclass(frozen=True)
class QuantizedLayout:
    """A checkpoint layout: what its writer checks and describes, what its reader builds.

    ``check(model, quantized, scheme)`` refuses weights the layout cannot hold (QuantkitError, or
    ValueError when they do not match ``model``); ``quantization_config(model, quantized, scheme,
    algorithm_config)`` is the config.json entry the layout's loaders read; ``extra_files(qcfg)``
    names files besides the usual ones (name to text); ``read_settings(path)`` is what the reader
    needs from a folder's config.json, checked; ``empty_layer(model, name, tensors, settings)``
    is an empty ``layer_class`` layer in place of the float layer ``name`` (ValueError if it
    cannot be one).
    """

    name: str  # in messages: "GPTQ", "AWQ", "compressed-tensors"
    marker: str  # the tensor (``<layer>.<marker>``) that every packed layer stores
    layer_class: type[DequantLinear]  # the layer that holds the layout's tensors
    check: Callable[[nn.Module, Mapping[str, QuantizedWeight], QuantScheme], None]
    quantization_config: Callable[
        [nn.Module, Mapping[str, QuantizedWeight], QuantScheme, dict], dict
    ]
    read_settings: Callable[[Path | str], Any]
    empty_layer: Callable[[nn.Module, str, dict[str, torch.Tensor], Any], DequantLinear]
    optional_tensors: tuple[str, ...] = ()  # packed-layer tensors a checkpoint may leave out
    extra_files: Callable[[dict], dict[str, str]] = no_extra_files
    # (model, remaining tensors, settings) before the float tensors load: takes what else the layout stores
    prepare_model: Callable[[nn.Module, dict[str, torch.Tensor], Any], None] | None = None

    def save(
        self,
        model: PreTrainedModel,
        tokenizer,
        quantized: Mapping[str, QuantizedWeight],
        scheme: QuantScheme,
        out_dir: Path | str,
        *,
        overwrite: bool = False,
        algorithm_config: dict | None = None,
    ) -> Path:
        """Write ``model`` with the ``quantized`` layers in this layout to ``out_dir``.

        ``quantized`` maps full module names to their quantized weights (weights as (out, in), so
        Conv1D layers were transposed before quantizing). Nothing appears at ``out_dir`` unless
        the whole folder was written; an existing folder is replaced only with ``overwrite``.
        """
        self.check(model, quantized, scheme)
        qcfg = self.quantization_config(model, quantized, scheme, algorithm_config or {})
        tensors = checkpoint_tensors(model, quantized, self.layer_class)
        return write_quantized_folder(
            model, tokenizer, quantized, qcfg, tensors, out_dir, overwrite, self.extra_files(qcfg)
        )

    def load(
        self,
        path: Path | str,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: str | torch.device = "cpu",
    ) -> PreTrainedModel:
        """Build the model a folder in this layout describes, with packed layers where it has them.

        Non-quantized tensors are cast to ``dtype`` (a torch dtype, its name, or "auto": float32 on
        the CPU, float16 elsewhere); packed layers keep their stored buffers and compute in the
        dtype of their input. Shards (model.safetensors.index.json) are supported.
        """
        dtype = resolve_dtype(dtype, device)
        settings = self.read_settings(path)
        tensors = read_safetensors(path)
        model = empty_model(path, dtype)
        for name in packed_layer_names(tensors, self.marker):
            try:
                layer = self.empty_layer(model, name, tensors, settings)
            except ValueError as exc:
                raise QuantkitError(
                    f"layer '{name}' of '{path}' does not fit the {self.name} layout: {exc}"
                ) from None
            install_layer(model, name, layer, tensors, self.name, self.optional_tensors)
        if self.prepare_model is not None:
            self.prepare_model(model, tensors, settings)
        return finish_loading(model, tensors, dtype, path, device)
