"""quantkit.eval.footprint and quantkit.eval.report: sizes counted right, deltas shown right."""

from __future__ import annotations

import io
import json

import pytest
import torch
from quant_helpers import quantize_linears
from rich.console import Console
from torch import nn

from quantkit.eval.footprint import Footprint, footprint
from quantkit.eval.perplexity import PerplexityResult
from quantkit.eval.report import (
    EvalResult,
    render_eval_table,
    results_to_json,
)
from quantkit.formats import load_quantized_model, save_checkpoint
from quantkit.quant.scheme import QuantScheme

HIDDEN, VOCAB, LAYERS, INTER, HEADS, KV_HEADS = 32, 100, 2, 64, 4, 2


def make_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).eval()


def llama_parameter_count(tied: bool) -> int:
    head_dim = HIDDEN // HEADS
    attention = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head_dim
    layer = attention + 3 * HIDDEN * INTER + 2 * HIDDEN
    return VOCAB * HIDDEN * (1 if tied else 2) + LAYERS * layer + HIDDEN


class PackedLinear(nn.Module):
    """A 4-bit packed layer in the GPTQ layout: qweight words, scales, a bias buffer, a cache."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "qweight", torch.zeros(in_features * 4 // 32, out_features, dtype=torch.int32)
        )
        self.register_buffer("scales", torch.ones(1, out_features, dtype=torch.float16))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16))
        self.cached_weight = torch.zeros(out_features, in_features)  # rebuilt on demand

    def forward(self, x):
        return x @ self.cached_weight.t()


# --- footprint -----------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_llama_parameters_and_memory(tied):
    model = make_llama(tied)
    result = footprint(model)
    assert result.parameters == llama_parameter_count(tied)
    # float32 parameters only: the rotary inv_freq buffer is a non-persistent cache, not counted
    assert result.bytes_in_memory == 4 * llama_parameter_count(tied)
    assert result.bytes_on_disk is None


def test_packed_layers_count_logical_weights():
    model = nn.Sequential(nn.Linear(64, 16), PackedLinear(16, 32), nn.LayerNorm(32))
    result = footprint(model)
    assert result.parameters == (64 * 16 + 16) + (16 * 32 + 32) + 2 * 32
    packed_bytes = (16 * 4 // 32) * 32 * 4 + 32 * 2 + 32 * 2  # qweight int32, scales and bias fp16
    float_bytes = 4 * ((64 * 16 + 16) + 2 * 32)
    assert result.bytes_in_memory == packed_bytes + float_bytes  # the cached weight is left out


@pytest.mark.parametrize("layout", ["gptq", "awq", "compressed-tensors"])
def test_quantized_checkpoints_count_the_float_models_parameters(tmp_path, layout):
    # compressed-tensors layers hold ``weight_packed``, not ``qweight``: every layout counts alike.
    model = make_llama(tied=False)
    scheme = QuantScheme(bits=4, group_size=32, symmetric=False)
    quantized = quantize_linears(model, scheme, min_zero=1)
    out = save_checkpoint(layout, model, None, quantized, scheme, tmp_path / layout)
    loaded = load_quantized_model(out)
    assert len(quantized) == LAYERS * 7
    assert footprint(loaded).parameters == llama_parameter_count(tied=False)


def test_bytes_on_disk_counts_weight_files_only(tmp_path):
    model = make_llama(tied=True)
    model.save_pretrained(tmp_path)
    weights = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert weights > 0
    (tmp_path / "extra.bin").write_bytes(b"x" * 123)
    (tmp_path / "notes.txt").write_bytes(b"y" * 1000)
    assert footprint(model, str(tmp_path)).bytes_on_disk == weights + 123
    assert footprint(model, "some-org/some-model").bytes_on_disk is None


# --- report --------------------------------------------------------------------------------------


def ppl(value: float, dataset: str) -> PerplexityResult:
    return PerplexityResult(
        perplexity=value, nll=0.0, tokens=1024, windows=2, seq_len=512, dataset=dataset
    )


BASELINE = EvalResult(
    model="target-fp16",
    path="/models/target",
    perplexity={
        "wikitext2": ppl(20.0, "wikitext2"),
        "wikipedia-heldout": ppl(10.0, "wikipedia-heldout"),
    },
    footprint=Footprint(parameters=8_400_000, bytes_on_disk=18_100_000, bytes_in_memory=16_800_000),
)
QUANTIZED = EvalResult(
    model="target-w4",
    path="/models/w4",
    perplexity={
        "wikitext2": ppl(20.5, "wikitext2"),
        "wikipedia-heldout": ppl(9.9, "wikipedia-heldout"),
    },
    footprint=Footprint(parameters=8_400_000, bytes_on_disk=5_000_000, bytes_in_memory=8_400_000),
    extra={"recipe": "w4a16-gptq"},
)


def test_json_holds_results_and_changes():
    data = json.loads(json.dumps(results_to_json([QUANTIZED], BASELINE)))  # JSON-ready
    assert data["baseline"]["model"] == "target-fp16"
    assert [m["key"] for m in data["metrics"]] == [
        "ppl:wikitext2",
        "ppl:wikipedia-heldout",
        "parameters",
        "bytes_on_disk",
        "bytes_in_memory",
    ]
    model = data["models"][0]
    assert model["perplexity"]["wikitext2"]["perplexity"] == 20.5
    assert model["footprint"]["bytes_on_disk"] == 5_000_000
    assert model["extra"] == {"recipe": "w4a16-gptq"}
    change = model["change"]
    assert change["ppl:wikitext2"] == {
        "delta": pytest.approx(0.5),
        "delta_percent": pytest.approx(2.5),
    }
    assert change["ppl:wikipedia-heldout"]["delta_percent"] == pytest.approx(-1.0)
    assert change["bytes_on_disk"] == {"ratio": pytest.approx(3.62), "text": "3.62x smaller"}
    assert change["bytes_in_memory"]["text"] == "2.00x smaller"
    assert change["parameters"] == {"ratio": 1.0, "text": "same"}


def render(results, baseline) -> str:
    buffer = io.StringIO()
    render_eval_table(results, baseline, Console(file=buffer, width=200, color_system=None))
    return buffer.getvalue()


def test_table_shows_values_and_deltas():
    text = render([QUANTIZED], BASELINE)
    wikitext_row = next(line for line in text.splitlines() if "WikiText-2 ppl" in line)
    assert "20.00" in wikitext_row and "20.50" in wikitext_row and "+0.50 (+2.5%)" in wikitext_row
    heldout_row = next(line for line in text.splitlines() if "Wikipedia held-out ppl" in line)
    assert "-0.10 (-1.0%)" in heldout_row
    disk_row = next(line for line in text.splitlines() if "size on disk (MB)" in line)
    assert "18.10" in disk_row and "5.00" in disk_row and "3.62x smaller" in disk_row
    assert "8,400,000" in text and "target-fp16 (baseline)" in text
    assert (
        text.index("WikiText-2 ppl")
        < text.index("Wikipedia held-out ppl")
        < text.index("parameters")
    )


def test_table_without_baseline_or_with_missing_values():
    bare = EvalResult(
        model="hub-model",
        perplexity={"wikitext2": ppl(7.25, "wikitext2")},
        footprint=Footprint(parameters=10, bytes_on_disk=None, bytes_in_memory=40),
    )
    text = render([bare], None)
    assert "7.25" in text and "change" not in text
    disk_row = next(line for line in text.splitlines() if "size on disk (MB)" in line)
    assert "—" in disk_row
    data = results_to_json([bare], BASELINE)
    assert data["models"][0]["change"]["bytes_on_disk"] is None
    assert data["models"][0]["change"]["ppl:wikipedia-heldout"] is None
    larger = EvalResult(model="big", footprint=Footprint(10, 40_000_000, 20_000_000))
    assert "2.21x larger" in render([larger], BASELINE)


def test_agreement_rows_appear_beside_a_baseline():
    from quantkit.eval.perplexity import PerplexityResult
    from quantkit.eval.report import EvalResult, metric_value, metrics_of

    ppl = {"wikitext2": PerplexityResult(10.0, 2.3, 100, 2, 50, "wikitext2")}
    model = EvalResult(model="q", perplexity=ppl, extra={"agreement": {"wikitext2": {"top1_agreement": 0.9, "mean_kl": 0.05,
                                                                     "positions": 10, "dataset": "wikitext2"}}})
    base = EvalResult(model="f", perplexity=ppl)
    keys = [m.key for m in metrics_of([base, model])]
    assert keys[:3] == ["ppl:wikitext2", "agree:wikitext2", "kl:wikitext2"]
    assert metric_value(model, "agree:wikitext2") == 0.9 and metric_value(model, "kl:wikitext2") == 0.05
    assert metric_value(base, "agree:wikitext2") is None
