"""GPT-2: ``model.transformer.h``, LayerNorm with bias, ``Conv1D`` linears (weight stored as
(in, out)), a fused ``c_attn`` whose output columns are q, k, v in that order, learned positions.

c_proj of attention folds into the value columns of c_attn (GPT-2 has no grouped-query
attention); the MLP's c_proj reads GELU(c_fc(x)), which no scale passes through exactly.
"""

from torch import nn

from quantkit.models.adapters.base import LinearGroup, ModelAdapter, no_fold


class GPT2Adapter(ModelAdapter):
    family = "gpt2"
    model_types = ("gpt2",)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.transformer.h

    def embeddings(self, model: nn.Module) -> list[nn.Module]:
        return [model.transformer.wte, model.transformer.wpe]

    def final_norm(self, model: nn.Module) -> nn.Module | None:
        return model.transformer.ln_f

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.attn

    def norms(self, layer: nn.Module) -> dict[str, nn.Module]:
        return {"ln_1": layer.ln_1, "ln_2": layer.ln_2}

    def linear_groups(self, layer: nn.Module) -> list[LinearGroup]:
        return [
            LinearGroup("attn_in", ("attn.c_attn",), "ln_1", "norm"),
            self._attention_output(layer.attn),
            LinearGroup("mlp_in", ("mlp.c_fc",), "ln_2", "norm"),
            no_fold("mlp_out", ("mlp.c_proj",)),
        ]

    @staticmethod
    def _attention_output(attention: nn.Module) -> LinearGroup:
        width = attention.c_proj.nx
        if attention.c_attn.nf != 3 * width:
            return no_fold("attn_out", ("attn.c_proj",))
        return LinearGroup(
            "attn_out", ("attn.c_proj",), "attn.c_attn", "linear_slice", (2 * width, 3 * width)
        )
