"""OPT: ``model.model.decoder.layers``, LayerNorm with bias, q/k/v/out_proj, fc1/fc2, learned
position embedding.

Foldability: with ``do_layer_norm_before`` (every OPT but 350m) the layer norms feed q/k/v and
fc1; otherwise they sit after the residual add and nothing folds into them. v_proj -> out_proj is
exact (OPT has no grouped-query attention). fc1 -> fc2 is exact when the activation is ReLU, which
commutes with positive scales.
"""

from torch import nn

from quantkit.models.adapters.base import LinearGroup, ModelAdapter, no_fold


class OPTAdapter(ModelAdapter):
    family = "opt"
    model_types = ("opt",)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def embeddings(self, model: nn.Module) -> list[nn.Module]:
        decoder = model.model.decoder
        return [decoder.embed_tokens, decoder.embed_positions]

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        return getattr(model.model.decoder, "final_layer_norm", None)

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def norms(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {
            "self_attn_layer_norm": layer.self_attn_layer_norm,
            "final_layer_norm": layer.final_layer_norm,
        }

    def linear_groups(self, layer: nn.Module) -> list[LinearGroup]:
        attn_in = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
        if getattr(layer, "do_layer_norm_before", True):
            attention_input = LinearGroup("attn_in", attn_in, "self_attn_layer_norm", "norm")
            mlp_input = LinearGroup("mlp_in", ("fc1",), "final_layer_norm", "norm")
        else:  # norms after the residual add: they feed no group
            attention_input, mlp_input = no_fold("attn_in", attn_in), no_fold("mlp_in", ("fc1",))
        if isinstance(layer.activation_fn, nn.ReLU):
            mlp_output = LinearGroup("mlp_out", ("fc2",), "fc1", "linear")
        else:
            mlp_output = no_fold("mlp_out", ("fc2",))
        return [attention_input, self._attention_output(layer.self_attn), mlp_input, mlp_output]

    @staticmethod
    def _attention_output(attention: nn.Module) -> LinearGroup:
        if attention.v_proj.out_features != attention.out_proj.in_features:
            return no_fold("attn_out", ("self_attn.out_proj",))
        return LinearGroup("attn_out", ("self_attn.out_proj",), "self_attn.v_proj", "linear")
