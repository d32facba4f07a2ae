"""Qwen2: the Llama module tree with biases on q/k/v (folding scales v_proj's bias too)."""

from quantkit.models.adapters.llama import LlamaAdapter


class Qwen2Adapter(LlamaAdapter):
    family = "qwen2"
    model_types = ("qwen2",)
