"""Qwen3: the Llama module tree plus per-head RMSNorms on queries and keys (q_norm, k_norm).

q_norm/k_norm act on q and k only, so v_proj -> o_proj folding is as exact as in Llama.
"""

from torch import nn

from quantkit.models.adapters.llama import LlamaAdapter


class Qwen3Adapter(LlamaAdapter):
    family = "qwen3"
    model_types = ("qwen3",)

    def norms(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {
            **super().norms(layer),
            "self_attn.q_norm": layer.self_attn.q_norm,
            "self_attn.k_norm": layer.self_attn.k_norm,
        }
