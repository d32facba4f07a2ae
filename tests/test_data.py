"""quantkit.data: the bundled files, every kind of text source, calibration samples."""

from __future__ import annotations

import gzip
import hashlib
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from quantkit.data import (
    BUNDLED_DATASETS,
    calibration_samples,
    evaluation_text,
    heldout_titles,
    load_texts,
)
from quantkit.data.locations import CHECKOUT_DATA_DIR
from quantkit.data.samples import random_windows
from quantkit.data.wikitext import articles_from_tokens, detokenize, rows_from_raw
from quantkit.errors import QuantkitError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
BUNDLED = REPO_ROOT / "calibration_data"


def make_tokenizer():
    """A tiny byte-level BPE tokenizer trained here, with an end-of-text token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write_jsonl(path: Path, records: list[dict]) -> Path:
    lines = "".join(json.dumps(record) + "\n" for record in records)
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


# --- the bundled folder --------------------------------------------------------------------------


def test_bundled_wikitext_test_is_the_exact_file():
    data = (BUNDLED / "wikitext2" / "wiki.test.raw").read_bytes()
    assert hashlib.md5(data).hexdigest() == "7c0137fc034ddbc56a296bce31b4f7fb"


def test_wikitext2_evaluation_text_is_the_datasets_rows_joined_by_blank_lines():
    # The `datasets` WikiText builder reads the file line by line, keeping each line's newline,
    # and turns a blank line into the empty row: rebuild the rows that way, independently.
    with open(BUNDLED / "wikitext2" / "wiki.test.raw", encoding="utf-8", newline="") as f:
        rows = [line if line.strip() else "" for line in f]
    assert len(rows) == 4358
    text = evaluation_text("wikitext2")
    assert text == "\n\n".join(rows)
    assert len(text) == 1_294_336
    assert text.startswith("\n\n = Robert Boulter = \n\n\n\n\n Robert Boulter is an English film")


def test_rows_from_raw_maps_space_lines_to_empty_rows():
    assert rows_from_raw(" \n = T = \n \n a b \n") == ["", " = T = \n", "", " a b \n"]


def test_detokenize_and_article_split():
    assert detokenize("well @-@ known 1 @,@ 000 and 3 @.@ 5") == "well-known 1,000 and 3.5"
    tokens = " \n = A = \n \n x @-@ y \n \n = = Sub = = \n \n z \n \n = B = \n \n w \n"
    assert articles_from_tokens(tokens) == ["= A =\n\nx-y\n\n= = Sub = =\n\nz", "= B =\n\nw"]


def test_wikitext2_calibration_is_the_valid_split_by_article():
    articles = load_texts("wikitext2")
    assert len(articles) == 60
    assert articles[0].startswith("= Homarus gammarus =\n\nHomarus gammarus , known as")
    assert any(a.startswith("= M-82 ( Michigan highway ) =") for a in articles)
    assert not any(mark in a for a in articles for mark in (" @-@ ", " @,@ ", " @.@ "))
    test_text = evaluation_text("wikitext2")
    assert "Homarus gammarus" not in test_text  # valid and test articles are disjoint


def test_wikitext2_evaluation_texts_are_the_nonempty_test_rows():
    rows = load_texts("wikitext2", purpose="evaluation")
    assert len(rows) == 2891
    assert rows[0] == " = Robert Boulter = \n"


def test_wikipedia_cuts_and_heldout_titles():
    calibration = load_texts("wikipedia")
    heldout = load_texts("wikipedia-heldout", purpose="evaluation")
    assert (len(calibration), len(heldout)) == (300, 150)
    titles = heldout_titles()
    assert len(titles) == 150
    with gzip.open(BUNDLED / "wikipedia" / "calibration.jsonl.gz", "rt", encoding="utf-8") as f:
        calibration_titles = {json.loads(line)["title"] for line in f}
    assert not titles & calibration_titles
    assert evaluation_text("wikipedia-heldout") == "\n\n".join(heldout)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs the shared source corpus")
def test_make_calibration_data_rebuilds_identical_files(tmp_path, monkeypatch):
    script = REPO_ROOT / "scripts" / "make_calibration_data.py"
    monkeypatch.setattr(
        sys, "argv", [str(script), "--source", str(SHARED_DATA), "--out", str(tmp_path)]
    )
    runpy.run_path(str(script), run_name="__main__")
    for built in sorted(p for p in tmp_path.rglob("*") if p.is_file()):
        relative = built.relative_to(tmp_path)
        assert built.read_bytes() == (BUNDLED / relative).read_bytes(), relative
    with gzip.open(
        SHARED_DATA / "wikipedia-en" / "wiki_part03.jsonl.gz", "rt", encoding="utf-8"
    ) as f:
        last = [json.loads(line)["title"] for line in f if line.strip()][-150:]
    assert heldout_titles() == set(last)


def test_calibration_refuses_evaluation_text(tokenizer):
    with pytest.raises(QuantkitError, match="evaluation text and never calibration"):
        load_texts("wikipedia-heldout")
    with pytest.raises(QuantkitError, match="evaluation text"):
        calibration_samples(tokenizer, "wikipedia-heldout")
    with pytest.raises(QuantkitError, match="calibration text"):
        evaluation_text("wikipedia")


def test_bad_purpose_and_split_on_bundled():
    with pytest.raises(QuantkitError, match="unknown purpose 'training'"):
        load_texts("wikipedia", purpose="training")
    with pytest.raises(QuantkitError, match="fixed splits"):
        load_texts("wikitext2", split="test")
    assert set(BUNDLED_DATASETS) == {"wikitext2", "wikipedia", "wikipedia-heldout"}


def test_data_dir_override(tmp_path, monkeypatch):
    (tmp_path / "wikipedia").mkdir()
    write_jsonl(
        tmp_path / "wikipedia" / "heldout.jsonl.gz", [{"title": "Only", "text": "one article"}]
    )
    monkeypatch.setenv("QUANTKIT_DATA_DIR", str(tmp_path))
    assert heldout_titles() == {"Only"}
    with pytest.raises(QuantkitError, match="calibration.jsonl.gz is missing"):
        load_texts("wikipedia")
    monkeypatch.setenv("QUANTKIT_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(QuantkitError, match="QUANTKIT_DATA_DIR points to"):
        heldout_titles()
    monkeypatch.delenv("QUANTKIT_DATA_DIR")
    assert CHECKOUT_DATA_DIR == BUNDLED


# --- local files, datasets folders, the hub -----------------------------------------------------


def test_txt_file_is_one_document(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first paragraph\n\nsecond paragraph\n", encoding="utf-8")
    assert load_texts(str(path)) == ["first paragraph\n\nsecond paragraph\n"]
    assert evaluation_text(str(path)) == "first paragraph\n\nsecond paragraph\n"


@pytest.mark.parametrize("name", ["docs.jsonl", "docs.jsonl.gz"])
def test_jsonl_field(tmp_path, name):
    path = write_jsonl(
        tmp_path / name, [{"body": "alpha", "id": 1}, {"body": " "}, {"body": "beta"}]
    )
    assert load_texts(str(path), text_field="body") == ["alpha", "beta"]  # blank documents dropped
    with pytest.raises(QuantkitError, match=rf"{name} line 1 has no field 'text'"):
        load_texts(str(path))


def test_jsonl_evaluation_text_joins_documents(tmp_path):
    path = write_jsonl(tmp_path / "eval.jsonl", [{"text": "one"}, {"text": "two"}])
    assert evaluation_text(str(path)) == "one\n\ntwo"


def test_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(QuantkitError, match="bad.jsonl line 2 is not valid JSON"):
        load_texts(str(bad))
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"text": ""}, {"text": "  "}])
    with pytest.raises(QuantkitError, match="empty.jsonl holds no text in field 'text'"):
        load_texts(str(empty))
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"text": 3}])
    with pytest.raises(QuantkitError, match="field 'text' is not a string"):
        load_texts(str(numbers))


def test_parquet_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["x y", None, "z"], "n": [1, 2, 3]}), path)
    assert load_texts(str(path), text_field="content") == ["x y", "z"]
    with pytest.raises(
        QuantkitError, match=r"docs.parquet has no column 'text' \(columns: content, n\)"
    ):
        load_texts(str(path))


def test_saved_datasets(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(tmp_path / "single"))
    assert load_texts(str(tmp_path / "single")) == ["a", "b"]
    with pytest.raises(QuantkitError, match="single dataset without splits"):
        load_texts(str(tmp_path / "single"), split="test")

    splits = DatasetDict(
        {
            "train": Dataset.from_dict({"text": ["t"], "other": ["o"]}),
            "validation": Dataset.from_dict({"text": ["v"], "other": ["p"]}),
        }
    )
    splits.save_to_disk(str(tmp_path / "splits"))
    assert load_texts(str(tmp_path / "splits")) == ["t"]
    assert load_texts(str(tmp_path / "splits"), split="validation", text_field="other") == ["p"]
    with pytest.raises(QuantkitError, match="has no split 'test' \\(splits: train, validation\\)"):
        load_texts(str(tmp_path / "splits"), split="test")
    with pytest.raises(QuantkitError, match="has no column 'body'"):
        load_texts(str(tmp_path / "splits"), text_field="body")


def test_unusable_local_sources(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(QuantkitError, match="not a datasets folder saved with save_to_disk"):
        load_texts(str(tmp_path / "plain"))
    (tmp_path / "table.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(QuantkitError, match="table.csv: unsupported file type"):
        load_texts(str(tmp_path / "table.csv"))
    with pytest.raises(QuantkitError, match="no such file or folder: .*missing.jsonl"):
        load_texts(str(tmp_path / "missing.jsonl"))
    text_file = tmp_path / "a.txt"
    text_file.write_text("x", encoding="utf-8")
    with pytest.raises(QuantkitError, match="a split .* applies only to datasets folders"):
        load_texts(str(text_file), split="train")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        QuantkitError,
        match="'allenai/c4' is not a bundled dataset or a local "
        "file, and the Hugging Face hub is offline",
    ):
        load_texts("allenai/c4")


# --- calibration samples -------------------------------------------------------------------------


def test_samples_are_windows_of_the_eos_joined_stream(tmp_path, tokenizer):
    docs = ["the quick brown fox", "jumps over", "the lazy dog and the fox"] * 4
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": d} for d in docs])
    samples = calibration_samples(tokenizer, str(path), num_samples=6, seq_len=5, seed=3)
    assert samples.shape == (6, 5) and samples.dtype == torch.long

    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i, doc in enumerate(docs):
        stream += ([eos] if i else []) + tokenizer(doc, add_special_tokens=False)["input_ids"]
    windows = {tuple(stream[i : i + 5]) for i in range(len(stream) - 4)}
    assert all(tuple(row.tolist()) in windows for row in samples)
    assert (samples == eos).any()  # windows cross document boundaries through the EOS token

    again = calibration_samples(tokenizer, str(path), num_samples=6, seq_len=5, seed=3)
    other = calibration_samples(tokenizer, str(path), num_samples=6, seq_len=5, seed=4)
    assert torch.equal(samples, again)
    assert not torch.equal(samples, other)


def test_windows_start_at_distinct_offsets():
    stream = torch.arange(10)  # a window's first token is its offset
    windows = random_windows(stream, num_samples=8, seq_len=3, seed=0, source="ramp")
    assert len(set(windows[:, 0].tolist())) == 8
    assert torch.equal(windows, windows[:, :1] + torch.arange(3))
    every_offset = random_windows(stream, num_samples=8, seq_len=3, seed=1, source="ramp")
    assert sorted(every_offset[:, 0].tolist()) == list(range(8))


def test_too_little_text_states_tokens_available_and_needed(tmp_path, tokenizer):
    path = tmp_path / "short.txt"
    path.write_text("the quick brown fox jumps over the lazy dog", encoding="utf-8")
    available = len(tokenizer(path.read_text(), add_special_tokens=False)["input_ids"])
    most = available - 4 + 1
    assert calibration_samples(tokenizer, str(path), num_samples=most, seq_len=4).shape == (most, 4)
    with pytest.raises(
        QuantkitError,
        match=rf"has {available} tokens but {most + 1} distinct "
        rf"windows of 4 tokens need at least {available + 1}",
    ):
        calibration_samples(tokenizer, str(path), num_samples=most + 1, seq_len=4)


def test_samples_validate_arguments(tokenizer):
    with pytest.raises(QuantkitError, match="num_samples must be at least 1"):
        calibration_samples(tokenizer, num_samples=0)
    with pytest.raises(QuantkitError, match="seq_len must be at least 2"):
        calibration_samples(tokenizer, seq_len=1)


def test_samples_from_bundled_wikitext2(tokenizer):
    samples = calibration_samples(tokenizer, "wikitext2", num_samples=4, seq_len=64, seed=0)
    assert samples.shape == (4, 64)
    assert int(samples.max()) < len(tokenizer)
