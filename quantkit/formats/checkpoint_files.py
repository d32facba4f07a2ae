"""Read a checkpoint folder's config.json and its safetensors weights (one file or shards).

Only safetensors are read: no pickled weights, so opening a folder never runs its code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from quantkit.errors import QuantkitError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


def read_config_json(folder: Path | str) -> dict:
    """The folder's config.json as a dict."""
    folder = Path(folder)
    if not folder.is_dir():
        raise QuantkitError(f"checkpoint folder '{folder}' does not exist")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise QuantkitError(
            f"'{folder}' has no {CONFIG_NAME}; point at a Hugging Face checkpoint folder"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise QuantkitError(f"'{path}' is not valid JSON: {exc}") from None


def read_quantization_config(folder: Path | str) -> dict:
    """The ``quantization_config`` entry of the folder's config.json."""
    qcfg = read_config_json(folder).get("quantization_config")
    if not isinstance(qcfg, dict):
        raise QuantkitError(
            f"'{folder}' holds no quantized model (config.json has no quantization_config); "
            "load it as a float model"
        )
    return qcfg


def read_safetensors(folder: Path | str) -> dict[str, torch.Tensor]:
    """All tensors of the folder's ``model.safetensors`` or of the shards its index lists."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    elif (folder / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise QuantkitError(
            f"'{folder}' has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        shard = folder / name
        if not shard.is_file():
            raise QuantkitError(
                f"shard '{shard}' listed in {WEIGHTS_INDEX_NAME} is missing"
            )
        tensors.update(load_file(shard))
    return tensors
