"""Documents from local files: .txt, .jsonl / .jsonl.gz, .parquet and `save_to_disk` folders.

A .txt file is one document (its whole text): split a corpus into documents by writing JSON lines.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from quantkit.data.hf_datasets import texts_from_dataset
from quantkit.errors import QuantkitError

SUPPORTED_FILES = ".txt, .jsonl, .jsonl.gz, .parquet or a datasets folder saved with save_to_disk"


def read_local_texts(path: Path, text_field: str, split: str | None) -> list[str]:
    """Every document in a local file or `datasets` folder, in order."""
    if path.is_dir():
        return _read_saved_dataset(path, text_field, split)
    if split is not None:
        raise QuantkitError(
            f"{path} is a single file: a split ({split!r}) applies only to "
            "datasets folders and hub datasets; leave it out"
        )
    name = path.name.lower()
    if name.endswith(".txt"):
        return [read_text_file(path)]
    if name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl_field(path, text_field)
    if name.endswith(".parquet"):
        return _read_parquet_column(path, text_field)
    raise QuantkitError(f"{path}: unsupported file type; use {SUPPORTED_FILES}")


def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise QuantkitError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def read_jsonl_field(path: Path, field: str) -> list[str]:
    """The string `field` of every JSON object in a .jsonl or .jsonl.gz file."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    values = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                values.append(_field_of_line(path, number, line, field))
    return values


def _field_of_line(path: Path, number: int, line: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise QuantkitError(f"{path} line {number} is not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict) or field not in record:
        raise QuantkitError(
            f"{path} line {number} has no field {field!r}: "
            "pass the name of the text field (text_field / --text-field)"
        )
    if not isinstance(record[field], str):
        raise QuantkitError(f"{path} line {number}: field {field!r} is not a string")
    return record[field]


def _read_parquet_column(path: Path, column: str) -> list[str]:
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    if column not in names:
        raise QuantkitError(
            f"{path} has no column {column!r} (columns: {', '.join(names)}): "
            "pass the name of the text column (text_field / --text-field)"
        )
    values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    if not all(isinstance(value, str) or value is None for value in values):
        raise QuantkitError(f"{path}: column {column!r} does not hold strings")
    return [value for value in values if value is not None]


def _read_saved_dataset(path: Path, text_field: str, split: str | None) -> list[str]:
    from datasets import load_from_disk

    try:
        dataset = load_from_disk(str(path))
    except FileNotFoundError:
        raise QuantkitError(
            f"{path} is a folder but not a datasets folder saved with "
            f"save_to_disk; use {SUPPORTED_FILES}"
        ) from None
    return texts_from_dataset(dataset, text_field, split, where=str(path))
