"""`evaluation_text`: the single string a perplexity evaluation reads.

- ``"wikitext2"``: the WikiText-2 test rows joined by ``"\\n\\n"``, the GPTQ-style protocol
  (``"\\n\\n".join(load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"])``).
- ``"wikipedia-heldout"``: the held-out articles joined by ``"\\n\\n"``.
- a local .txt file: its text as it is; any other local source `load_texts` reads: its documents
  joined by ``"\\n\\n"``.
"""

from __future__ import annotations

from pathlib import Path

from quantkit.data.bundled import wikitext2_test_rows
from quantkit.data.local_files import read_text_file
from quantkit.data.sources import load_texts
from quantkit.errors import QuantkitError


def evaluation_text(name: str = "wikitext2") -> str:
    if name == "wikitext2":
        return "\n\n".join(wikitext2_test_rows())
    if name == "wikipedia":
        raise QuantkitError(
            "'wikipedia' is calibration text (and the bundled models' training "
            "text): evaluate on 'wikitext2' or 'wikipedia-heldout'"
        )
    path = Path(name).expanduser()
    if path.is_file() and path.name.lower().endswith(".txt"):
        text = read_text_file(path)
        if not text.strip():
            raise QuantkitError(f"{path} is empty: nothing to evaluate on")
        return text
    return "\n\n".join(load_texts(name, purpose="evaluation"))
