"""Adapters against the real transformers module trees of tiny random models of each family."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import transformers as tf
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.models.adapters import (
    SUPPORTED_MODEL_TYPES,
    LinearGroup,
    get_adapter,
    in_features,
    is_linear_like,
    linear_modules,
    out_features,
)
from quantkit.models.adapters.gemma import GemmaAdapter
from quantkit.models.folding import fold_input_scales

GROUP_ORDER = ["attn_in", "attn_out", "mlp_in", "mlp_out"]
SIZES = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 128,
}
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


@dataclass(frozen=True)
class Case:
    """A tiny model of one family and what its adapter must say about foldability."""

    id: str
    family: str
    make_config: Callable[[], tf.PretrainedConfig]
    attn_out_kind: str
    mlp_out_kind: str
    attn_in_kind: str = "norm"
    # Gemma's RMSNorm computes in float32 even in a float64 model, so its folds round at ~1e-7.
    fold_tolerance: float = 1e-9


def llama_like(config_class: type, kv_heads: int, **extra) -> Callable[[], tf.PretrainedConfig]:
    return lambda: config_class(**SIZES, **TOKEN_IDS, num_key_value_heads=kv_heads, **extra)


CASES = [
    Case("llama-gqa", "llama", llama_like(tf.LlamaConfig, 2), "none", "linear"),
    Case("llama-mha", "llama", llama_like(tf.LlamaConfig, 4, attention_bias=True), "linear", "linear"),
    Case("mistral", "mistral", llama_like(tf.MistralConfig, 2), "none", "linear"),
    Case("qwen2-mha", "qwen2", llama_like(tf.Qwen2Config, 4), "linear", "linear"),
    Case("qwen3-gqa", "qwen3", llama_like(tf.Qwen3Config, 2, head_dim=16), "none", "linear"),
    Case("qwen3-mha", "qwen3", llama_like(tf.Qwen3Config, 4, head_dim=16), "linear", "linear"),
    Case("phi3-mha", "phi3", llama_like(tf.Phi3Config, 4), "linear_slice", "linear_slice"),
    Case("phi3-gqa", "phi3", llama_like(tf.Phi3Config, 2), "none", "linear_slice"),
    Case(
        "gemma-mha",
        "gemma",
        llama_like(tf.GemmaConfig, 4, head_dim=16),
        "linear",
        "linear",
        fold_tolerance=1e-6,
    ),
    Case(
        "gemma2-gqa",
        "gemma2",
        llama_like(tf.Gemma2Config, 2, head_dim=16),
        "none",
        "linear",
        fold_tolerance=1e-6,
    ),
    Case(
        "gemma3-mha",
        "gemma3",
        llama_like(tf.Gemma3TextConfig, 4, head_dim=16),
        "linear",
        "linear",
        fold_tolerance=1e-6,
    ),
    Case(
        "opt-relu",
        "opt",
        lambda: tf.OPTConfig(
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
            **TOKEN_IDS,
        ),
        "linear",
        "linear",
    ),
    Case(
        "opt-gelu-post-norm",
        "opt",
        lambda: tf.OPTConfig(
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            word_embed_proj_dim=64,
            max_position_embeddings=64,
            activation_function="gelu",
            do_layer_norm_before=False,
            **TOKEN_IDS,
        ),
        "linear",
        "none",
        attn_in_kind="none",
    ),
    Case(
        "gpt2",
        "gpt2",
        lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, **TOKEN_IDS),
        "linear_slice",
        "none",
    ),
]


def build(case: Case, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(case.make_config()).to(dtype).eval()
    _randomize_norms(model)
    return model


def _randomize_norms(model: nn.Module) -> None:
    """Norms start as identity (weight 1 or 0, bias 0); random values make the checks meaningful."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(params=CASES, ids=[case.id for case in CASES])
def case(request) -> Case:
    return request.param


def test_every_tested_family_is_registered():
    assert {case.family for case in CASES} == {get_adapter(t).family for t in SUPPORTED_MODEL_TYPES}


def test_adapter_finds_the_model_parts(case):
    model = build(case)
    adapter = get_adapter(model)
    config = model.config
    assert adapter.family == case.family
    assert type(get_adapter(config)) is type(adapter)
    layers = adapter.decoder_layers(model)
    assert isinstance(layers, nn.ModuleList) and len(layers) == config.num_hidden_layers
    assert model.get_submodule(adapter.layer_prefix(model)) is layers
    assert adapter.lm_head(model) is model.lm_head
    embeddings = adapter.embeddings(model)
    assert embeddings[0] is model.get_input_embeddings()
    assert len(embeddings) == (2 if case.family in ("opt", "gpt2") else 1)
    assert all(isinstance(module, nn.Embedding) for module in embeddings)
    has_final_norm = config.model_type != "opt" or config.do_layer_norm_before
    assert (adapter.final_norm(model) is not None) == has_final_norm
    rotary = adapter.rotary_embedding(model)
    assert (rotary is None) == (case.family in ("opt", "gpt2"))
    for layer in layers:
        attention = adapter.attention(layer)
        assert "Attention" in type(attention).__name__
        norms = adapter.norms(layer)
        assert norms and all(layer.get_submodule(name) is norm for name, norm in norms.items())
        norm_like = {name for name, module in layer.named_modules() if "Norm" in type(module).__name__}
        assert set(norms) == norm_like


def test_linear_groups_partition_the_layer_linears(case):
    model = build(case)
    adapter = get_adapter(model)
    for layer in adapter.decoder_layers(model):
        groups = adapter.linear_groups(layer)
        assert [group.name for group in groups] == GROUP_ORDER
        named = [name for group in groups for name in group.linears]
        assert all(is_linear_like(layer.get_submodule(name)) for name in named)
        assert sorted(named) == sorted(
            name for name, module in layer.named_modules() if is_linear_like(module)
        )
        for group in groups:
            assert len({in_features(layer.get_submodule(name)) for name in group.linears}) == 1


def test_prev_kinds_match_what_is_exact(case):
    model = build(case)
    adapter = get_adapter(model)
    kinds = {group.name: group.prev_kind for group in adapter.linear_groups(adapter.decoder_layers(model)[0])}
    assert kinds == {
        "attn_in": case.attn_in_kind,
        "attn_out": case.attn_out_kind,
        "mlp_in": case.attn_in_kind,
        "mlp_out": case.mlp_out_kind,
    }


def test_norm_prev_output_is_exactly_the_group_input(case):
    model = build(case)
    adapter = get_adapter(model)
    seen: dict[str, torch.Tensor] = {}
    hooks = []

    def record(key: str, position: str):
        def hook(module, args, output=None):
            seen[key] = (output if position == "out" else args[0]).detach().clone()

        return hook

    checked = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for group in adapter.linear_groups(layer):
            if group.prev_kind != "norm":
                continue
            norm = layer.get_submodule(group.prev)
            hooks.append(norm.register_forward_hook(record(f"{index}.{group.prev}", "out")))
            for name in group.linears:
                linear = layer.get_submodule(name)
                hooks.append(linear.register_forward_pre_hook(record(f"{index}.{name}", "in")))
            checked += [(f"{index}.{group.prev}", f"{index}.{name}") for name in group.linears]
    logits(model)
    for hook in hooks:
        hook.remove()
    if case.attn_in_kind == "norm":
        assert checked
    for norm_key, linear_key in checked:
        assert torch.equal(seen[norm_key], seen[linear_key]), (norm_key, linear_key)


def test_folding_scales_into_prev_keeps_the_model_function(case):
    model = build(case, torch.float64)
    adapter = get_adapter(model)
    reference = logits(model)
    generator = torch.Generator().manual_seed(3)
    folded = []
    for layer in adapter.decoder_layers(model):
        for group in adapter.linear_groups(layer):
            if group.prev is None:
                continue
            width = in_features(layer.get_submodule(group.linears[0]))
            scales = torch.empty(width, dtype=torch.float64).uniform_(0.25, 4.0, generator=generator)
            fold_input_scales(layer, group, scales, adapter)
            folded.append(group.name)
    changed_weights = logits(model)
    assert folded
    torch.testing.assert_close(changed_weights, reference, rtol=0, atol=case.fold_tolerance)


def _fold_changes_output(model: nn.Module, layer_group: LinearGroup, adapter) -> bool:
    layer = adapter.decoder_layers(model)[0]
    before = logits(model)
    width = in_features(layer.get_submodule(layer_group.linears[0]))
    scales = torch.linspace(0.25, 4.0, width, dtype=torch.float64)
    fold_input_scales(layer, layer_group, scales, adapter)
    return not torch.allclose(logits(model), before, rtol=1e-6, atol=1e-6)


def test_folding_check_detects_a_wrong_fold():
    """The function-preserving check is sharp: folds that are not exact do change the output."""
    gpt2 = next(case for case in CASES if case.id == "gpt2")
    model = build(gpt2, torch.float64)
    through_gelu = LinearGroup("mlp_out", ("mlp.c_proj",), "mlp.c_fc", "linear")
    assert _fold_changes_output(model, through_gelu, get_adapter(model))

    gemma = next(case for case in CASES if case.id == "gemma-mha")
    model = build(gemma, torch.float64)
    attn_in = get_adapter(model).linear_groups(get_adapter(model).decoder_layers(model)[0])[0]

    class NoOffsetGemma(GemmaAdapter):
        norm_weight_offset = 0.0

    assert _fold_changes_output(model, attn_in, NoOffsetGemma())
    assert not _fold_changes_output(copy.deepcopy(model), attn_in, GemmaAdapter())


def test_slices_select_the_value_and_up_channels():
    phi3 = next(case for case in CASES if case.id == "phi3-mha")
    model = build(phi3)
    groups = get_adapter(model).linear_groups(get_adapter(model).decoder_layers(model)[0])
    assert groups[1].prev_slice == (128, 192)  # q 0:64, k 64:128, v 128:192
    assert groups[3].prev_slice == (96, 192)  # gate 0:96, up 96:192


def test_linear_modules_lists_every_layer_linear_and_the_head(case):
    model = build(case)
    adapter = get_adapter(model)
    found = linear_modules(model, adapter)
    prefix = adapter.layer_prefix(model)
    expected = {
        f"{prefix}.{index}.{name}"
        for index, layer in enumerate(adapter.decoder_layers(model))
        for name, module in layer.named_modules()
        if is_linear_like(module)
    } | {"lm_head"}
    assert set(found) == expected
    assert all(model.get_submodule(name) is module for name, module in found.items())
    assert found["lm_head"] is model.lm_head


def test_gpt2_conv1d_features_are_read_from_the_transposed_weight():
    model = build(next(case for case in CASES if case.id == "gpt2"))
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, tf.pytorch_utils.Conv1D)
    assert (in_features(c_attn), out_features(c_attn)) == (64, 192)


@pytest.mark.parametrize("model_type", ["xyz", "bert"])
def test_unknown_architecture_lists_the_supported_ones(model_type):
    if model_type == "bert":
        subject = tf.BertModel(
            tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        )
    else:
        subject = tf.PretrainedConfig()
        subject.model_type = model_type
    with pytest.raises(QuantkitError) as raised:
        get_adapter(subject)
    assert str(raised.value) == (
        f"architecture '{model_type}' is not supported; supported: "
        "gemma, gemma2, gemma3_text, gpt2, llama, mistral, opt, phi3, qwen2, qwen3"
    )


def test_linear_group_rejects_inconsistent_fields():
    with pytest.raises(ValueError):
        LinearGroup("attn_in", ("q",), None, "norm")
    with pytest.raises(ValueError):
        LinearGroup("attn_out", ("o",), "qkv", "linear_slice")
    with pytest.raises(ValueError):
        LinearGroup("attn_out", ("o",), "v", "weird")


def test_fold_refuses_non_positive_scales_and_groups_without_prev():
    model = build(CASES[0])
    adapter = get_adapter(model)
    layer = adapter.decoder_layers(model)[0]
    attn_in, attn_out = adapter.linear_groups(layer)[:2]
    with pytest.raises(ValueError, match="positive"):
        fold_input_scales(layer, attn_in, -torch.ones(64), adapter)
    with pytest.raises(ValueError, match="no module"):
        fold_input_scales(layer, attn_out, torch.ones(64), adapter)
    with pytest.raises(ValueError, match="input channels"):
        fold_input_scales(layer, attn_in, torch.ones(32), adapter)
