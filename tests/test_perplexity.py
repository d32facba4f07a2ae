"""quantkit.eval.perplexity against a hand-written reference loop on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from quantkit.errors import QuantkitError
from quantkit.eval import perplexity as perplexity_module
from quantkit.eval.perplexity import mean_next_token_nll, perplexity, text_windows

TEXT = " ".join(
    f"the {adjective} fox number {i} jumps over the {adjective} dog."
    for i, adjective in zip(range(60), ["quick", "lazy", "brown", "small", "old"] * 12)
)


def make_tokenizer(with_bos: bool = False):
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    if with_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def make_model(vocab_size: int, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_model(len(tokenizer))


def reference_perplexity(model, tokenizer, text: str, seq_len: int, max_windows=None) -> float:
    """exp(mean over windows of the model's own loss), one window at a time."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    count = ids.shape[1] // seq_len
    if max_windows is not None:
        count = min(count, max_windows)
    losses = []
    with torch.no_grad():
        for i in range(count):
            window = ids[:, i * seq_len : (i + 1) * seq_len]
            losses.append(model(input_ids=window, labels=window).loss.item())
    return math.exp(sum(losses) / len(losses))


def test_matches_the_reference_loop(model, tokenizer):
    expected = reference_perplexity(model, tokenizer, TEXT, seq_len=32)
    result = perplexity(model, tokenizer, TEXT, seq_len=32, progress=False, dataset="toy")
    total = len(tokenizer(TEXT)["input_ids"])
    assert result.windows == total // 32 >= 8
    assert result.tokens == result.windows * 32
    assert (result.seq_len, result.dataset) == (32, "toy")
    assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-5)


def test_batch_size_does_not_change_the_result(model, tokenizer):
    one = perplexity(model, tokenizer, TEXT, seq_len=32, batch_size=1, progress=False)
    four = perplexity(model, tokenizer, TEXT, seq_len=32, batch_size=4, progress=False)
    assert one.windows == four.windows
    assert one.perplexity == pytest.approx(four.perplexity, rel=1e-6)


def test_max_windows_limits_the_windows(model, tokenizer):
    result = perplexity(model, tokenizer, TEXT, seq_len=32, max_windows=2, progress=False)
    assert (result.windows, result.tokens) == (2, 64)
    expected = reference_perplexity(model, tokenizer, TEXT, seq_len=32, max_windows=2)
    assert result.perplexity == pytest.approx(expected, rel=1e-5)


def test_logit_chunking_gives_the_same_nll(model, tokenizer, monkeypatch):
    whole = perplexity(model, tokenizer, TEXT, seq_len=32, progress=False)
    monkeypatch.setattr(perplexity_module, "_LOGIT_CHUNK_TOKENS", 5)
    chunked = perplexity(model, tokenizer, TEXT, seq_len=32, progress=False)
    assert chunked.nll == pytest.approx(whole.nll, rel=1e-6)


def test_half_precision_logits_are_scored_in_float32():
    torch.manual_seed(1)
    logits = (torch.randn(40, 300) * 4).to(torch.bfloat16)
    ids = torch.randint(0, 300, (40,))
    expected = F.cross_entropy(logits[:-1].double(), ids[1:]).item()
    assert mean_next_token_nll(logits, ids).dtype == torch.float32
    assert mean_next_token_nll(logits, ids).item() == pytest.approx(expected, rel=1e-6)


def test_bos_is_prepended_once_when_the_tokenizer_adds_one():
    tokenizer = make_tokenizer(with_bos=True)
    windows = text_windows(tokenizer, TEXT, seq_len=16, max_windows=None)
    bos = tokenizer.bos_token_id
    assert windows[0, 0].item() == bos
    assert (windows == bos).sum().item() == 1
    plain = text_windows(make_tokenizer(), TEXT, seq_len=16, max_windows=None)
    assert (plain == bos).sum().item() == 0


def test_bad_arguments(model, tokenizer):
    with pytest.raises(
        QuantkitError,
        match="longer than the model's context "
        r"\(max_position_embeddings = 64\)",
    ):
        perplexity(model, tokenizer, TEXT, seq_len=65, progress=False)
    with pytest.raises(QuantkitError, match="fewer than one window of 32"):
        perplexity(model, tokenizer, "the fox", seq_len=32, progress=False)
    with pytest.raises(QuantkitError, match="seq_len must be at least 2"):
        perplexity(model, tokenizer, TEXT, seq_len=1, progress=False)
    with pytest.raises(QuantkitError, match="batch_size must be at least 1"):
        perplexity(model, tokenizer, TEXT, batch_size=0, seq_len=32, progress=False)
    with pytest.raises(QuantkitError, match="max_windows must be at least 1"):
        perplexity(model, tokenizer, TEXT, max_windows=0, seq_len=32, progress=False)


def test_model_mode_is_restored(model, tokenizer):
    model.train()
    perplexity(model, tokenizer, TEXT, seq_len=32, max_windows=1, progress=False)
    assert model.training
    model.eval()
