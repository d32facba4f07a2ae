"""Phi-3: the Llama layout with fused projections ``qkv_proj`` (q, k, v rows in that order) and
``gate_up_proj`` (gate rows, then up rows).

Folding into a fused producer touches only the rows that feed the group: the value rows for
o_proj (when there are as many key/value heads as query heads) and the up rows for down_proj.
"""

from torch import nn

from quantkit.models.adapters.base import LinearGroup, no_fold
from quantkit.models.adapters.llama import LlamaAdapter


class Phi3Adapter(LlamaAdapter):
    family = "phi3"
    model_types = ("phi3",)

    def linear_groups(self, layer: nn.Module) -> list[LinearGroup]:
        attention, mlp = layer.self_attn, layer.mlp
        return [
            LinearGroup("attn_in", ("self_attn.qkv_proj",), "input_layernorm", "norm"),
            self._attention_output(attention),
            LinearGroup("mlp_in", ("mlp.gate_up_proj",), "post_attention_layernorm", "norm"),
            LinearGroup(
                "mlp_out",
                ("mlp.down_proj",),
                "mlp.gate_up_proj",
                "linear_slice",
                (mlp.down_proj.in_features, 2 * mlp.down_proj.in_features),
            ),
        ]

    @staticmethod
    def _attention_output(attention: nn.Module) -> LinearGroup:
        width = attention.o_proj.in_features  # num_heads * head_dim
        if attention.qkv_proj.out_features != 3 * width:  # grouped-query attention
            return no_fold("attn_out", ("self_attn.o_proj",))
        return LinearGroup(
            "attn_out", ("self_attn.o_proj",), "self_attn.qkv_proj", "linear_slice", (2 * width, 3 * width)
        )
