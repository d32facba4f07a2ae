"""`load_texts`: the documents of a text source, whatever form the source takes.

A source is, in this order: a bundled name (see `quantkit.data.bundled`), an existing local file or
`datasets` folder, or else a Hugging Face hub dataset id (online only). Blank documents are dropped.
"""

from __future__ import annotations

from pathlib import Path

from quantkit.data.bundled import BUNDLED_DATASETS, bundled_texts, check_purpose
from quantkit.data.hf_datasets import load_hub_texts
from quantkit.data.local_files import SUPPORTED_FILES, read_local_texts
from quantkit.errors import QuantkitError

_FILE_SUFFIXES = (".txt", ".jsonl", ".gz", ".json", ".parquet", ".arrow", ".csv")


def load_texts(
    source: str, *, purpose: str = "calibration", text_field: str = "text", split: str | None = None
) -> list[str]:
    """The non-blank documents of `source`; `purpose="calibration"` never yields evaluation text.

    `text_field` names the text column of .jsonl/.parquet/`datasets` sources; `split` picks a split
    of a `datasets` folder or hub dataset (default "train") and is an error for other sources.
    """
    check_purpose(purpose)
    if source in BUNDLED_DATASETS:
        if split is not None:
            raise QuantkitError(
                f"bundled dataset {source!r} has fixed splits (calibration or "
                f"evaluation); leave out the split ({split!r})"
            )
        texts = bundled_texts(source, purpose)
    else:
        path = Path(source).expanduser()
        if path.exists():
            texts = read_local_texts(path, text_field, split)
        elif _looks_like_path(source):
            raise QuantkitError(
                f"no such file or folder: {source} (a text source is a bundled "
                f"name — {', '.join(BUNDLED_DATASETS)} — or {SUPPORTED_FILES})"
            )
        else:
            texts = load_hub_texts(source, text_field, split)
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise QuantkitError(
            f"{source} holds no text in field {text_field!r}: every document is empty"
        )
    return texts


def _looks_like_path(source: str) -> bool:
    """Hub ids look like "owner/name"; anything with a file suffix or a path prefix is a path."""
    if source.startswith(("/", "./", "../", "~")) or "\\" in source:
        return True
    return source.lower().endswith(_FILE_SUFFIXES) or source.count("/") > 1
