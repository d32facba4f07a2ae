"""The text bundled in `calibration_data/`, and which of it may be used for what.

- ``"wikitext2"``: calibration reads the WikiText-2 valid split (one document per article);
  evaluation reads the test split's rows.
- ``"wikipedia"``: the calibration cut of the Wikipedia articles (one document per article).
- ``"wikipedia-heldout"``: Wikipedia articles the bundled models never saw; evaluation only.
"""

from __future__ import annotations

import gzip

from quantkit.data.local_files import read_jsonl_field, read_text_file
from quantkit.data.locations import bundled_file
from quantkit.data.wikitext import articles_from_tokens, rows_from_raw
from quantkit.errors import QuantkitError

BUNDLED_DATASETS = ("wikitext2", "wikipedia", "wikipedia-heldout")
PURPOSES = ("calibration", "evaluation")

WIKITEXT2_TEST = "wikitext2/wiki.test.raw"
WIKITEXT2_VALID = "wikitext2/wiki.valid.tokens.gz"
WIKIPEDIA_CALIBRATION = "wikipedia/calibration.jsonl.gz"
WIKIPEDIA_HELDOUT = "wikipedia/heldout.jsonl.gz"


def heldout_titles() -> set[str]:
    """Titles of the held-out Wikipedia articles (the reference models' training excludes them)."""
    return set(read_jsonl_field(bundled_file(WIKIPEDIA_HELDOUT), "title"))


def wikitext2_test_rows() -> list[str]:
    """WikiText-2's raw test rows as the `datasets` library gives them (empty rows too)."""
    return rows_from_raw(read_text_file(bundled_file(WIKITEXT2_TEST)))


def bundled_texts(name: str, purpose: str) -> list[str]:
    """The documents of a bundled dataset for a purpose ("calibration" or "evaluation")."""
    check_purpose(purpose)
    if name == "wikitext2":
        return _wikitext2_valid_articles() if purpose == "calibration" else wikitext2_test_rows()
    if name == "wikipedia":
        return read_jsonl_field(bundled_file(WIKIPEDIA_CALIBRATION), "text")
    if name == "wikipedia-heldout":
        if purpose == "calibration":
            raise QuantkitError(
                "'wikipedia-heldout' is evaluation text and never calibration "
                "data (calibrating on it would leak the test set into the model): "
                "calibrate on 'wikipedia' or 'wikitext2'"
            )
        return read_jsonl_field(bundled_file(WIKIPEDIA_HELDOUT), "text")
    raise QuantkitError(
        f"unknown bundled dataset {name!r}: use one of {', '.join(BUNDLED_DATASETS)}"
    )


def check_purpose(purpose: str) -> None:
    if purpose not in PURPOSES:
        raise QuantkitError(f"unknown purpose {purpose!r}: use 'calibration' or 'evaluation'")


def _wikitext2_valid_articles() -> list[str]:
    with gzip.open(bundled_file(WIKITEXT2_VALID), "rt", encoding="utf-8") as f:
        return articles_from_tokens(f.read())
