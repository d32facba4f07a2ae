"""The bundled reference models: real Hugging Face folders with the promised shapes, offline."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from quantkit.models.bundled import BUNDLED_MODELS


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


@pytest.fixture(scope="module")
def models():
    return {name: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
            for name, path in BUNDLED_MODELS.items()}


def test_target_shape_matches_the_specification(models):
    target = models["quantkit-target"]
    cfg = target.config
    params = sum(p.numel() for p in target.parameters())
    assert cfg.model_type == "llama"
    assert 8e6 <= params <= 15e6
    assert cfg.hidden_size % 128 == 0
    assert cfg.num_hidden_layers >= 6
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert cfg.max_position_embeddings >= 1024


def test_draft_is_small_and_shares_the_tokenizer(models):
    target, draft = models["quantkit-target"], models["quantkit-draft"]
    t_params = sum(p.numel() for p in target.parameters())
    d_params = sum(p.numel() for p in draft.parameters())
    assert d_params < 0.2 * t_params
    assert draft.config.vocab_size == target.config.vocab_size
    t_tok = AutoTokenizer.from_pretrained(str(BUNDLED_MODELS["quantkit-target"]))
    d_tok = AutoTokenizer.from_pretrained(str(BUNDLED_MODELS["quantkit-draft"]))
    assert t_tok.get_vocab() == d_tok.get_vocab()


def test_bundled_models_fit_the_size_budget():
    total = sum(folder_bytes(path) for path in BUNDLED_MODELS.values())
    assert total < 25 * 1024 * 1024


def test_target_is_genuinely_trained(models):
    """Greedy continuation of a common phrase is fluent enough to repeat known words, and the
    target predicts held-out text far better than chance."""
    tok = AutoTokenizer.from_pretrained(str(BUNDLED_MODELS["quantkit-target"]))
    text = ("The city is the capital of the country and its largest city. It is located on the river, "
            "and has a population of about one million people.")
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = models["quantkit-target"](input_ids=ids, labels=ids).loss.item()
    assert loss < 4.0, loss  # chance level is ln(8192) = 9.0
