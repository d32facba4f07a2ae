"""Top-1 agreement and KL between two models, against a direct computation."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.eval.agreement import prediction_agreement


class ByteTokenizer:
    """Ids are bytes modulo the tiny vocabulary: enough to cut a text into windows."""

    def __call__(self, text, **_):
        return {"input_ids": [b % 64 for b in text.encode()]}


def tiny(seed):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_identical_models_agree_fully():
    model = tiny(0)
    result = prediction_agreement(model, model, ByteTokenizer(), "hello world " * 40, seq_len=32, progress=False)
    assert result.top1_agreement == 1.0
    assert result.mean_kl == pytest.approx(0.0, abs=1e-7)
    assert result.positions == (len("hello world " * 40) // 32) * 31


def test_matches_a_direct_computation():
    a, b = tiny(1), tiny(2)
    text = "the quick brown fox jumps over the lazy dog. " * 20
    result = prediction_agreement(a, b, ByteTokenizer(), text, seq_len=16, batch_size=3, progress=False)
    ids = torch.tensor(ByteTokenizer()(text)["input_ids"])
    windows = ids[: len(ids) // 16 * 16].view(-1, 16)
    with torch.no_grad():
        la = torch.log_softmax(a(input_ids=windows).logits[:, :-1].double(), -1)
        lb = torch.log_softmax(b(input_ids=windows).logits[:, :-1].double(), -1)
    agree = (la.argmax(-1) == lb.argmax(-1)).double().mean().item()
    kl = (lb.exp() * (lb - la)).sum(-1).mean().item()
    assert result.top1_agreement == pytest.approx(agree)
    assert result.mean_kl == pytest.approx(kl, rel=1e-4)
    assert 0 < result.top1_agreement < 1 and result.mean_kl > 0


def test_paired_evaluation_matches_separate_perplexities():
    from quantkit.eval.agreement import paired_evaluation
    from quantkit.eval.perplexity import perplexity

    a, b = tiny(3), tiny(4)
    text = "pack my box with five dozen liquor jugs. " * 20
    got, want, agreement = paired_evaluation(a, b, ByteTokenizer(), text, seq_len=16, batch_size=5, progress=False)
    assert got.perplexity == pytest.approx(perplexity(a, ByteTokenizer(), text, seq_len=16, progress=False).perplexity)
    assert want.perplexity == pytest.approx(perplexity(b, ByteTokenizer(), text, seq_len=16, progress=False).perplexity)
    assert agreement.positions == got.windows * 15
