"""Load a causal LM for quantkit: resolve the name, check the architecture, then read the weights.

The architecture check comes before any weight is read, so an unsupported model fails in a
second with a message that lists what is supported. Checkpoints that quantkit itself writes
(GPTQ today) are read by ``quantkit.formats`` so that transformers needs no extra packages.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from quantkit.errors import QuantkitError
from quantkit.models.adapters import ModelAdapter, get_adapter
from quantkit.models.bundled import resolve_model_path

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
# quant_method values of checkpoints that quantkit writes and quantkit.formats reads.
QUANTKIT_QUANT_METHODS = ("awq", "compressed-tensors", "gptq")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LoadedModel:
    """A model ready for calibration or evaluation, with what quantkit needs to know about it."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    path: str
    adapter: ModelAdapter
    quantization_config: dict | None
    # With ``load_model_lazy``: reads each decoder layer's tensors when the pipeline takes it.
    layer_weights: Any = None


def parse_dtype(text: str | torch.dtype) -> torch.dtype | str:
    """A dtype name ("bf16", "float16", ...) or "auto" to a torch dtype or "auto"."""
    if isinstance(text, torch.dtype):
        if text in DTYPE_NAMES.values():
            return text
        text = str(text)
    name = str(text).strip().lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in DTYPE_NAMES:
        raise QuantkitError(f"unknown dtype '{text}'; choose one of: auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def load_config(path: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's config (AutoConfig), turning every failure into one clear QuantkitError."""
    folder = Path(path)
    if folder.is_dir():
        read_config_json(folder)  # clear messages for a missing or malformed file
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:
        if not folder.is_dir():
            raise _unreachable(path, error) from error
        raise QuantkitError(f"transformers cannot read the config of '{path}': {_one_line(error)}") from error
    except Exception as error:  # a config is data: any failure to parse it is the user's file
        raise QuantkitError(f"transformers cannot read the config of '{path}': {_one_line(error)}") from error


def read_config_json(folder: Path) -> dict[str, Any]:
    """config.json of a local model folder as a dict, checked to name a ``model_type``."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise QuantkitError(f"'{folder}' has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise QuantkitError(f"'{config_file}' is not valid JSON: {error}") from error
    if not isinstance(config, dict) or not config.get("model_type"):
        raise QuantkitError(f"'{config_file}' has no model_type: not a Hugging Face model config")
    return config


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer (AutoTokenizer), with a clear error when there is none."""
    folder = Path(path)
    if folder.is_dir() and not _has_tokenizer(folder):
        raise QuantkitError(f"'{path}' has no tokenizer (tokenizer.json or tokenizer_config.json)")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as error:
        if folder.is_dir():
            raise QuantkitError(f"could not load the tokenizer in '{path}': {_one_line(error)}") from error
        raise _unreachable(path, error) from error
    except (ValueError, KeyError, TypeError) as error:
        raise QuantkitError(f"could not load the tokenizer in '{path}': {_one_line(error)}") from error


def load_model(
    model: str | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    device_map: str | dict | None = None,
    offload_folder: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM (bundled name, local folder or hub id; None means the bundled target).

    ``dtype="auto"`` loads float32 on the CPU (half-precision matmuls are slow or missing there)
    and the checkpoint's dtype on an accelerator. ``device_map``/``offload_folder`` go to
    accelerate through ``from_pretrained``; without them the model is moved to ``device``.
    """
    requested = parse_dtype(dtype)
    target = _checked_device(device)
    if offload_folder is not None and device_map is None:
        raise QuantkitError("offload_folder needs a device_map (for example 'auto')")
    path = resolve_model_path(model)
    config, adapter = _checked_config(path, trust_remote_code)
    quantization_config = _quantization_config(path, config)
    if quantization_config is not None:
        network = _load_quantized(path, quantization_config, requested, target, device_map, config)
    else:
        network = _load_pretrained(path, requested, target, device_map, offload_folder, trust_remote_code)
    network.eval()
    network.requires_grad_(False)
    tokenizer = _tokenizer_if_any(path, trust_remote_code)
    return LoadedModel(network, tokenizer, path, adapter, quantization_config)


def load_model_lazy(model: str | None = None, *, required: bool = False) -> LoadedModel | None:
    """The float model in float32 on the CPU with its decoder layers on the meta device, for the
    layer-by-layer pipeline (``models/lazy_loading.py``); None where that does not apply (not a
    local float safetensors checkpoint of a Llama-family model), or, with ``required``, a
    QuantkitError saying why."""
    from quantkit.models.lazy_loading import LAZY_MODEL_TYPES, lazy_loading_applies, load_lazy_model

    path = resolve_model_path(model)
    config, adapter = _checked_config(path, False)
    reason = None
    if not lazy_loading_applies(path, config.model_type):
        reason = (f"it needs a local safetensors checkpoint of a {', '.join(LAZY_MODEL_TYPES)} model "
                  f"('{path}' is a {config.model_type} model{'' if Path(path).is_dir() else ', not a local folder'})")
    elif _quantization_config(path, config) is not None:
        reason = f"'{path}' is already quantized"
    if reason is not None:
        if required:
            raise QuantkitError(f"cannot load layer by layer: {reason}")
        return None
    network, layer_weights = load_lazy_model(path, config, torch.float32, adapter)
    network.eval()
    network.requires_grad_(False)
    tokenizer = _tokenizer_if_any(path, False)
    return LoadedModel(network, tokenizer, path, adapter, None, layer_weights)


def _checked_config(path: str, trust_remote_code: bool) -> tuple[PretrainedConfig, ModelAdapter]:
    """The config and its adapter, found before any weight is read."""
    if Path(path).is_dir():
        # Fail fast, even for model types transformers itself does not know.
        get_adapter(read_config_json(Path(path))["model_type"])
    config = load_config(path, trust_remote_code)
    return config, get_adapter(config)


def _load_pretrained(
    path: str,
    requested: torch.dtype | str,
    target: torch.device,
    device_map: str | dict | None,
    offload_folder: str | None,
    trust_remote_code: bool,
) -> PreTrainedModel:
    is_local = Path(path).is_dir()
    if is_local and not _has_weights(Path(path)):
        raise QuantkitError(f"'{path}' has no weights: expected model.safetensors (or a sharded index)")
    on_cpu = target.type == "cpu" if device_map is None else _map_on_cpu(device_map)
    options: dict[str, Any] = {
        "dtype": torch.float32 if requested == "auto" and on_cpu else requested,
        "trust_remote_code": trust_remote_code,
        "output_loading_info": True,
    }
    if device_map is not None:
        options["device_map"] = device_map
    if offload_folder is not None:
        options["offload_folder"] = offload_folder
    try:
        network, info = AutoModelForCausalLM.from_pretrained(path, **options)
    except OSError as error:
        if not is_local:
            raise _unreachable(path, error) from error
        raise QuantkitError(f"could not load the weights in '{path}': {_one_line(error)}") from error
    except (SafetensorError, RuntimeError, ValueError) as error:
        raise QuantkitError(f"could not load the weights in '{path}': {_one_line(error)}") from error
    _check_nothing_missing(path, info)
    if device_map is None and target.type != "cpu":
        network.to(target)
    return network


def _check_nothing_missing(path: str, loading_info: dict) -> None:
    """transformers fills missing tensors with random values and only warns; quantkit refuses."""
    missing = sorted(loading_info.get("missing_keys") or ())
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise QuantkitError(f"'{path}' lacks {len(missing)} weight tensor(s) the model needs: {shown}")


def _load_quantized(
    path: str,
    quantization_config: dict,
    requested: torch.dtype | str,
    target: torch.device,
    device_map: str | dict | None,
    config: PretrainedConfig,
) -> PreTrainedModel:
    method = str(quantization_config.get("quant_method", "")).lower()
    if method not in QUANTKIT_QUANT_METHODS:
        raise QuantkitError(
            f"'{path}' is quantized with '{method}', which quantkit cannot load; "
            f"it reads: {', '.join(QUANTKIT_QUANT_METHODS)}"
        )
    if device_map is not None:
        raise QuantkitError("device_map is not supported for quantized checkpoints; pass device instead")
    dtype = requested if requested != "auto" else _auto_dtype(config, target.type == "cpu")
    from quantkit.formats import load_quantized_model  # heavy, and only for quantized folders

    return load_quantized_model(path, dtype=dtype, device=str(target))


def _tokenizer_if_any(path: str, trust_remote_code: bool) -> PreTrainedTokenizerBase | None:
    if Path(path).is_dir() and not _has_tokenizer(Path(path)):
        return None
    return load_tokenizer(path, trust_remote_code)


def _quantization_config(path: str, config: PretrainedConfig) -> dict | None:
    """quantization_config as config.json states it (the config object may have parsed it)."""
    folder = Path(path)
    found = read_config_json(folder).get("quantization_config") if folder.is_dir() else None
    if found is None:
        found = getattr(config, "quantization_config", None)
    if found is not None and not isinstance(found, dict):
        found = found.to_dict()
    return found


def _auto_dtype(config: PretrainedConfig, on_cpu: bool) -> torch.dtype:
    """float32 on the CPU; elsewhere the checkpoint's dtype (float16 when it names none)."""
    if on_cpu:
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, torch.dtype):
        return stored
    return DTYPE_NAMES.get(str(stored).removeprefix("torch."), torch.float16)


def _checked_device(device: str) -> torch.device:
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise QuantkitError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from error
    if target.type == "cuda" and not torch.cuda.is_available():
        raise QuantkitError(
            f"device '{device}' was asked for, but CUDA is not available here; use --device cpu"
        )
    return target


def _map_on_cpu(device_map: str | dict) -> bool:
    if isinstance(device_map, dict):
        return all(str(place) in ("cpu", "disk") for place in device_map.values())
    return device_map == "cpu" or not torch.cuda.is_available()


def _has_weights(folder: Path) -> bool:
    """A safetensors file or index, or transformers' legacy pytorch_model*.bin."""
    return any(
        name.endswith((".safetensors", ".safetensors.index.json"))
        or (name.startswith("pytorch_model") and name.endswith((".bin", ".bin.index.json")))
        for name in (entry.name for entry in folder.iterdir())
    )


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _unreachable(name: str, error: Exception) -> QuantkitError:
    return QuantkitError(
        f"could not load '{name}': not a local folder and the Hugging Face hub is not reachable ({_one_line(error)})"
    )


def _one_line(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
