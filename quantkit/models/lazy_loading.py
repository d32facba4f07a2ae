"""Load a model for the layer-by-layer pipeline without holding its decoder layers in host memory.

The model is built on the meta device (accelerate's ``init_empty_weights``); the tensors outside
the decoder layers (embeddings, final norm, lm_head) are read at once; each decoder layer's
tensors are read from the safetensors file(s) (``safe_open``, only that layer's keys, found
through ``model.safetensors.index.json`` or the single file's header) just before the pipeline
works on it (``LazyLayers.load``), and once the layer is done the float weights of its quantized
linears go back to the meta device (``LazyLayers.release``): the writer packs those from the
quantized weights and reads only the layer's other tensors (norms, biases, ignored linears),
which stay. Host memory is then the embeddings and head, one float layer, the small tensors of
finished layers and the quantized weights kept for writing, instead of the whole float model.

Tensors are cast as ``from_pretrained(dtype=...)`` casts them, so the written checkpoint is the
one the eager path writes (``tests/test_lazy_loading.py`` checks it byte for byte). Under
torchrun every rank reads the same layer; the OS page cache shares the file reads.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from quantkit.errors import QuantkitError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Model types whose module tree and checkpoint keys are Llama's (the adapters of that family).
LAZY_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def lazy_loading_applies(path: str, model_type: str | None) -> bool:
    """A local float safetensors checkpoint (single file or index) of a Llama-family model."""
    folder = Path(path)
    if not folder.is_dir() or model_type not in LAZY_MODEL_TYPES:
        return False
    return (folder / INDEX_NAME).is_file() or (folder / SINGLE_NAME).is_file()


class SafetensorsCheckpoint:
    """Where each tensor of a local safetensors checkpoint lives, and reading a few of them."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
                raise QuantkitError(f"'{index}' is not a safetensors index (a JSON 'weight_map'): {error}") from None
            if not isinstance(weight_map, dict):
                raise QuantkitError(f"'{index}' is not a safetensors index: its 'weight_map' is not an object")
            self.files = {str(key): str(name) for key, name in weight_map.items()}
            for name in sorted(set(self.files.values())):
                if not (self.folder / name).is_file():
                    raise QuantkitError(f"'{self.folder}' lacks the shard '{name}' that {INDEX_NAME} names")
        elif (self.folder / SINGLE_NAME).is_file():
            with self._open(SINGLE_NAME) as handle:
                self.files = {key: SINGLE_NAME for key in handle.keys()}
        else:
            raise QuantkitError(f"'{self.folder}' has no weights: expected {SINGLE_NAME} (or {INDEX_NAME})")

    def _open(self, name: str):
        try:
            return safe_open(str(self.folder / name), framework="pt", device="cpu")
        except (SafetensorError, OSError) as error:
            raise QuantkitError(f"could not read '{self.folder / name}': {error}") from None

    def check_has(self, keys: list[str]) -> None:
        missing = sorted(key for key in keys if key not in self.files)
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise QuantkitError(f"'{self.folder}' lacks {len(missing)} weight tensor(s) the model needs: {shown}")

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each shard opened once."""
        self.check_has(keys)
        by_file: dict[str, list[str]] = defaultdict(list)
        for key in keys:
            by_file[self.files[key]].append(key)
        tensors = {}
        for name, wanted in by_file.items():
            with self._open(name) as handle:
                for key in wanted:
                    try:
                        tensors[key] = handle.get_tensor(key)
                    except (SafetensorError, OSError) as error:
                        raise QuantkitError(f"could not read '{key}' from '{self.folder / name}': {error}") from None
        return tensors


class LazyLayers:
    """The decoder layers' weights, read when the pipeline takes a layer and dropped after."""

    def __init__(self, model: nn.Module, layers: nn.ModuleList, prefix: str, checkpoint: SafetensorsCheckpoint,
                 dtype: torch.dtype) -> None:
        self.model, self.layers, self.prefix = model, layers, prefix
        self.checkpoint, self.dtype = checkpoint, dtype

    def keys(self, index: int) -> list[str]:
        return [f"{self.prefix}.{index}.{name}" for name in _meta_tensor_names(self.layers[index])]

    def load(self, index: int, layer: nn.Module) -> None:
        """Read layer ``index``'s tensors that are still on the meta device."""
        names = _meta_tensor_names(layer)
        tensors = self.checkpoint.read([f"{self.prefix}.{index}.{name}" for name in names])
        for name in names:
            _assign(layer, name, _cast(tensors[f"{self.prefix}.{index}.{name}"], self.dtype))

    def release(self, index: int, layer: nn.Module, quantized) -> None:
        """Put the float weights of the layer's quantized linears back on the meta device."""
        for name, module in layer.named_modules():
            if name and f"{self.prefix}.{index}.{name}" in quantized:
                weight = module.weight
                module._parameters["weight"] = nn.Parameter(torch.empty_like(weight, device="meta"),
                                                            requires_grad=False)


def load_lazy_model(path: str, config, dtype: torch.dtype, adapter):
    """The model with its tensors outside the decoder layers read and its layers on meta, and
    the ``LazyLayers`` that fills the layers in turn."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, GenerationConfig

    checkpoint = SafetensorsCheckpoint(path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.config._name_or_path = path
    if (Path(path) / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise QuantkitError(f"could not read the generation config of '{path}': {error}") from None
    _tie_head(model)
    layers = adapter.decoder_layers(model)
    prefix = adapter.layer_prefix(model)
    lazy = LazyLayers(model, layers, prefix, checkpoint, dtype)
    # Every tensor the model needs must be in the checkpoint, checked before any work.
    checkpoint.check_has([key for index in range(len(layers)) for key in lazy.keys(index)])
    outside = [name for name in _meta_tensor_names(model) if not name.startswith(prefix + ".")]
    tensors = checkpoint.read(outside)
    for name in outside:
        _assign(model, name, _cast(tensors[name], dtype))
    return model, lazy


def _tie_head(model: nn.Module) -> None:
    """Share the embeddings' parameter with the lm_head when the config ties them, as
    ``from_pretrained`` does (the checkpoint then stores it once, under the embeddings' name)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and head is not None and head.weight is not embeddings.weight:
        head.weight = embeddings.weight


def _meta_tensor_names(module: nn.Module) -> list[str]:
    """Names of the module's parameters and persistent buffers on the meta device; a tied
    parameter once (under its first name, as the checkpoint stores it)."""
    names, seen = [], set()
    for name, tensor in module.named_parameters():
        if tensor.is_meta and id(tensor) not in seen:
            seen.add(id(tensor))
            names.append(name)
    for name, tensor in module.named_buffers():
        owner, _, leaf = name.rpartition(".")
        holder = module.get_submodule(owner) if owner else module
        if tensor.is_meta and leaf not in holder._non_persistent_buffers_set:
            names.append(name)
    return names


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def _assign(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the meta tensor ``name`` by ``value`` everywhere it is used (tied weights too)."""
    owner, _, leaf = name.rpartition(".")
    holder = root.get_submodule(owner) if owner else root
    if leaf in holder._buffers:
        holder._buffers[leaf] = value
        return
    old = holder._parameters[leaf]
    new = nn.Parameter(value, requires_grad=False)
    for module in root.modules():
        for key, param in module._parameters.items():
            if param is old:
                module._parameters[key] = new
