"""Scaffolding shared by the checkpoint-layout tests: a tiny Llama, its RTN weights, references."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from quantkit.quant.rtn import QuantizedWeight, rtn_quantize
from quantkit.quant.scheme import QuantScheme
from quantkit.quant.weights import set_weight_out_in

VOCAB = 256


def tiny_llama(seed: int = 0, tie: bool = False, intermediate: int = 256) -> LlamaForCausalLM:
    """A random 2-layer Llama (hidden 128, grouped-query attention) in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=128, intermediate_size=intermediate, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, tie_word_embeddings=tie,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``VOCAB`` tokens, enough for a checkpoint folder to hold one."""
    vocab = {f"t{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def quantize_linears(
    model: nn.Module, scheme: QuantScheme, min_zero: int = 1
) -> dict[str, QuantizedWeight]:
    """RTN weights of every ``nn.Linear`` the scheme does not ignore.

    ``min_zero=1`` suits GPTQ v1 (it stores zero - 1); AWQ and compressed-tensors store zero points
    as they are, so they take ``min_zero=0``.
    """
    return {
        name: rtn_quantize(module.weight, scheme, min_zero=min_zero, module_name=name)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not scheme.is_ignored(name)
    }


def reference_model(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> nn.Module:
    """The float model as the checkpoint represents it: fp16-rounded tensors, dequantized linears."""
    reference = copy.deepcopy(model).eval()
    if "lm_head" in quantized:  # a quantized head no longer shares the embeddings
        reference.lm_head.weight = nn.Parameter(reference.lm_head.weight.detach().clone())
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.half().float())
    for name, qw in quantized.items():
        set_weight_out_in(reference.get_submodule(name), qw.dequantize())
    return reference


def write_config(folder: Path, quantization_config: dict | None) -> Path:
    """A folder holding only a Llama config.json, with ``quantization_config`` unless None."""
    folder.mkdir()
    config: dict = {"model_type": "llama"}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def assert_logits_match(
    loaded: nn.Module,
    model: nn.Module,
    quantized: dict[str, QuantizedWeight],
    ids: torch.Tensor,
    rtol: float = 0.0,
    atol: float = 1e-4,
) -> None:
    """``loaded`` computes on ``ids`` the logits of the model the checkpoint represents."""
    with torch.no_grad():
        expected = reference_model(model, quantized)(ids).logits
        got = loaded(ids).logits.float()
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
