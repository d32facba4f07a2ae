"""Llama: ``model.model.layers``, RMSNorm, separate q/k/v and gate/up/down projections.

The layout (names and data flow) is shared by Mistral, Qwen2, Qwen3 and Gemma, whose adapters
subclass this one and change only what differs.
"""

from __future__ import annotations

from torch import nn

from quantkit.models.adapters.base import LinearGroup, ModelAdapter, no_fold


def value_to_output_group(attention: nn.Module, prefix: str = "self_attn") -> LinearGroup:
    """The attention-output group, folding into ``v_proj`` only when that is exact.

    Attention mixes positions per channel, so o_proj's input channel c is a weighted sum of
    v_proj's output channel c: exact when there are as many key/value heads as query heads.
    With grouped-query attention one value channel feeds several o_proj channels, so no
    per-channel scale of o_proj can be folded into v_proj.
    """
    linears = (f"{prefix}.o_proj",)
    if attention.v_proj.out_features != attention.o_proj.in_features:
        return no_fold("attn_out", linears)
    return LinearGroup("attn_out", linears, f"{prefix}.v_proj", "linear")


class LlamaAdapter(ModelAdapter):
    """Llama and models that reuse its module tree unchanged."""

    family = "llama"
    model_types = ("llama",)
    mlp_input_norm = "post_attention_layernorm"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def embeddings(self, model: nn.Module) -> list[nn.Module]:
        return [model.model.embed_tokens]

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        return model.model.norm

    def rotary_embedding(self, model: nn.Module) -> nn.Module | None:
        return model.model.rotary_emb

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def norms(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {
            "input_layernorm": layer.input_layernorm,
            "post_attention_layernorm": layer.post_attention_layernorm,
        }

    def linear_groups(self, layer: nn.Module) -> list[LinearGroup]:
        return [
            LinearGroup(
                "attn_in",
                ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                "input_layernorm",
                "norm",
            ),
            value_to_output_group(layer.self_attn),
            LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj"), self.mlp_input_norm, "norm"),
            # down_proj reads act(gate) * up: linear in up, channel by channel.
            LinearGroup("mlp_out", ("mlp.down_proj",), "mlp.up_proj", "linear"),
        ]
