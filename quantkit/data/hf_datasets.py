"""Documents from Hugging Face `datasets` objects: folders saved to disk and hub datasets."""

from __future__ import annotations

import os

from quantkit.errors import QuantkitError

_TRUE_VALUES = {"1", "on", "yes", "true"}


def texts_from_dataset(dataset, text_field: str, split: str | None, where: str) -> list[str]:
    """The `text_field` column of a Dataset, or of one split of a DatasetDict (default "train")."""
    from datasets import DatasetDict

    if isinstance(dataset, DatasetDict):
        dataset = _pick_split(dataset, split or "train", where)
    elif split is not None:
        raise QuantkitError(
            f"{where} holds a single dataset without splits: leave out the split ({split!r})"
        )
    if text_field not in dataset.column_names:
        raise QuantkitError(
            f"{where} has no column {text_field!r} (columns: "
            f"{', '.join(dataset.column_names)}): pass the name of the text column "
            "(text_field / --text-field)"
        )
    values = list(dataset[text_field])
    if not all(isinstance(value, str) or value is None for value in values):
        raise QuantkitError(f"{where}: column {text_field!r} does not hold strings")
    return [value for value in values if value is not None]


def _pick_split(dataset_dict, split: str, where: str):
    if split not in dataset_dict:
        raise QuantkitError(
            f"{where} has no split {split!r} (splits: "
            f"{', '.join(dataset_dict.keys())}): pass one of them as the split"
        )
    return dataset_dict[split]


def hub_is_offline() -> bool:
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return any(flag.strip().lower() in _TRUE_VALUES for flag in flags)


def load_hub_texts(dataset_id: str, text_field: str, split: str | None) -> list[str]:
    """A dataset from the Hugging Face hub (online only)."""
    if hub_is_offline():
        raise QuantkitError(
            f"{dataset_id!r} is not a bundled dataset or a local file, and the "
            "Hugging Face hub is offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE): "
            "pass a local .txt/.jsonl/.parquet file or a bundled name"
        )
    from datasets import load_dataset

    split = split or "train"
    try:
        dataset = load_dataset(dataset_id, split=split)
    except Exception as exc:  # noqa: BLE001 - any failure here is about the id or the network
        raise QuantkitError(
            f"could not load dataset {dataset_id!r} (split {split!r}) from the "
            f"Hugging Face hub: {type(exc).__name__}: {exc}"
        ) from None
    return texts_from_dataset(dataset, text_field, None, where=f"hub dataset {dataset_id!r}")
