"""Layer-by-layer loading (``quantkit/models/lazy_loading.py``): the model's decoder layers stay on
the meta device until the pipeline takes them, and the written checkpoint is byte for byte the
one the eager path (the whole float model in memory) writes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.compress import compress
from quantkit.errors import QuantkitError
from quantkit.models import lazy_loading
from quantkit.models.bundled import resolve_model_path
from quantkit.recipe import weight_quant_recipe
from quantkit.sparsity.step import SparsityStep

CALIBRATION = {"dataset": "wikitext2", "num_samples": 4, "seq_len": 32, "seed": 0}


# searches kept short: the test compares two paths, not quality
FAST = {"gptq": {"clip_search": False}, "awq": {"grid": 4, "clip_grid": 4}}


def _recipe(method: str, group_size: int = 32):
    return weight_quant_recipe("w4a16", group_size=group_size, method=method, symmetric=method != "awq",
                               fmt="awq" if method == "awq" else "gptq", options=FAST.get(method),
                               calibration=CALIBRATION)


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory) -> Path:
    """A tiny random Llama (untied head) saved in bfloat16 as several safetensors shards, with the
    bundled target's tokenizer."""
    folder = tmp_path_factory.mktemp("sharded-llama")
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=8192, max_position_embeddings=128,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder, max_shard_size="300KB")
    bundled = Path(resolve_model_path(None))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(bundled / name, folder / name)
    assert len(json.loads((folder / lazy_loading.INDEX_NAME).read_text())["weight_map"]) > 0
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    return folder


def _files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


class _Peak:
    """The most float decoder-layer parameters materialized (not on meta) at once, sampled each
    time a layer is loaded."""

    def __init__(self, monkeypatch) -> None:
        self.peak, self.layer_size, self.loads = 0, 0, 0
        original = lazy_loading.LazyLayers.load

        def load(lazy, index, layer):
            original(lazy, index, layer)
            self.loads += 1
            self.layer_size = max(self.layer_size, sum(p.numel() for p in layer.parameters()))
            live = sum(p.numel() for p in lazy.layers.parameters() if not p.is_meta)
            self.peak = max(self.peak, live)

        monkeypatch.setattr(lazy_loading.LazyLayers, "load", load)


# the bundled target (one file, tied head) with RTN to keep the test short; the sharded Llama
# (bfloat16 shards, untied head) with the calibrated methods
@pytest.mark.parametrize("model_kind, method", [("bundled", "rtn"), ("sharded", "gptq"), ("sharded", "awq")])
def test_layer_by_layer_loading_writes_the_eager_checkpoint(model_kind, method, sharded_llama, tmp_path,
                                                            monkeypatch):
    model = None if model_kind == "bundled" else str(sharded_llama)
    group_size = 64 if model_kind == "bundled" else 32
    eager, lazy = tmp_path / "eager", tmp_path / "lazy"
    compress(model, _recipe(method, group_size), eager, low_host_memory=False)
    peak = _Peak(monkeypatch)
    result = compress(model, _recipe(method, group_size), lazy)  # the default where it applies
    assert peak.loads == result.num_layers
    # one layer at a time: the finished layers keep only their norms (tiny next to a layer)
    assert peak.peak <= 1.1 * peak.layer_size
    assert _files(lazy) == _files(eager)


def test_missing_shard_is_a_clear_error(sharded_llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_llama, broken)
    next(iter(sorted(broken.glob("model-*.safetensors")))).unlink()
    with pytest.raises(QuantkitError, match="lacks the shard"):
        compress(str(broken), _recipe("gptq"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_key_missing_from_the_index_is_a_clear_error(sharded_llama, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_llama, broken)
    index_file = broken / lazy_loading.INDEX_NAME
    index = json.loads(index_file.read_text())
    del index["weight_map"]["model.layers.2.mlp.down_proj.weight"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(QuantkitError, match=r"lacks 1 weight tensor\(s\) the model needs: "
                                            r"model.layers.2.mlp.down_proj.weight"):
        compress(str(broken), _recipe("gptq"), tmp_path / "out", low_host_memory=True)


def test_asked_for_where_it_does_not_apply_says_why(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(gpt2)
    recipe = weight_quant_recipe("w4a16", group_size=32, method="rtn")
    with pytest.raises(QuantkitError, match="cannot load layer by layer: it needs a local safetensors checkpoint"):
        compress(str(gpt2), recipe, tmp_path / "out", low_host_memory=True)
    compress(str(gpt2), recipe, tmp_path / "out")  # by default: the whole model, as before
    pruning = weight_quant_recipe("w4a16", group_size=32, method="rtn")
    pruning = dataclasses.replace(pruning, steps=(SparsityStep(method="magnitude", sparsity=0.5),))
    with pytest.raises(QuantkitError, match="cannot load layer by layer: a pruning recipe"):
        compress(None, pruning, tmp_path / "pruned", low_host_memory=True)
