"""Pick the adapter for a model by its ``config.model_type``."""

from __future__ import annotations

from typing import Any

from quantkit.errors import QuantkitError
from quantkit.models.adapters.base import ModelAdapter
from quantkit.models.adapters.gemma import Gemma2Adapter, Gemma3TextAdapter, GemmaAdapter
from quantkit.models.adapters.gpt2 import GPT2Adapter
from quantkit.models.adapters.llama import LlamaAdapter
from quantkit.models.adapters.mistral import MistralAdapter
from quantkit.models.adapters.opt import OPTAdapter
from quantkit.models.adapters.phi3 import Phi3Adapter
from quantkit.models.adapters.qwen2 import Qwen2Adapter
from quantkit.models.adapters.qwen3 import Qwen3Adapter

ADAPTER_CLASSES: tuple[type[ModelAdapter], ...] = (
    LlamaAdapter,
    MistralAdapter,
    Qwen2Adapter,
    Qwen3Adapter,
    Phi3Adapter,
    GemmaAdapter,
    Gemma2Adapter,
    Gemma3TextAdapter,
    OPTAdapter,
    GPT2Adapter,
)

_BY_MODEL_TYPE: dict[str, type[ModelAdapter]] = {
    model_type: cls for cls in ADAPTER_CLASSES for model_type in cls.model_types
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_BY_MODEL_TYPE))


def model_type_of(model_or_config: Any) -> str | None:
    """``model_type`` of a model, a config, or the string itself."""
    if isinstance(model_or_config, str):
        return model_or_config
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None)


def get_adapter(model_or_config: Any) -> ModelAdapter:
    """The adapter for a model, its config, or a ``model_type`` string."""
    model_type = model_type_of(model_or_config)
    adapter_class = _BY_MODEL_TYPE.get(model_type or "")
    if adapter_class is None:
        raise QuantkitError(
            f"architecture '{model_type}' is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return adapter_class()
