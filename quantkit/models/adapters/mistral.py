"""Mistral: the Llama module tree (sliding-window attention changes no module)."""

from quantkit.models.adapters.llama import LlamaAdapter


class MistralAdapter(LlamaAdapter):
    family = "mistral"
    model_types = ("mistral",)
