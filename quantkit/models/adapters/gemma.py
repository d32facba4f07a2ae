"""Gemma (1, 2, 3-text): the Llama module tree with RMSNorm computing x * (1 + weight).

Gemma 2 and 3 add a norm after attention and one before and after the MLP; there the MLP reads
``pre_feedforward_layernorm`` (``post_attention_layernorm`` normalises the attention output before
the residual add, so it is no group's input). Gemma 3 also has q_norm/k_norm, as Qwen3 does.
"""

from torch import nn

from quantkit.models.adapters.llama import LlamaAdapter


class GemmaAdapter(LlamaAdapter):
    family = "gemma"
    model_types = ("gemma",)
    norm_weight_offset = 1.0


class Gemma2Adapter(GemmaAdapter):
    family = "gemma2"
    model_types = ("gemma2",)
    mlp_input_norm = "pre_feedforward_layernorm"

    def norms(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {
            **super().norms(layer),
            "pre_feedforward_layernorm": layer.pre_feedforward_layernorm,
            "post_feedforward_layernorm": layer.post_feedforward_layernorm,
        }


class Gemma3TextAdapter(Gemma2Adapter):
    family = "gemma3"
    model_types = ("gemma3_text",)

    def norms(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {
            **super().norms(layer),
            "self_attn.q_norm": layer.self_attn.q_norm,
            "self_attn.k_norm": layer.self_attn.k_norm,
        }
