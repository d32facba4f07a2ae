"""The reference models shipped inside the package, and turning a ``--model`` value into a path.

A model is named by a bundled name, a local folder, or a Hugging Face hub id ("org/name");
``resolve_model_path`` tells them apart without touching the network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from quantkit.errors import QuantkitError

BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"
DEFAULT_MODEL = "quantkit-target"
BUNDLED_MODELS: dict[str, Path] = {
    "quantkit-target": BUNDLED_DIR / "target",
    "quantkit-draft": BUNDLED_DIR / "draft",
}

# Hub ids: "name" or "org/name", letters, digits, '-', '_', '.'; no leading '.' or '-'.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """A bundled model's folder, a checked local folder, or a hub id returned unchanged."""
    if name_or_path is None:
        name_or_path = DEFAULT_MODEL
    text = os.fspath(name_or_path)
    if text in BUNDLED_MODELS:
        return _bundled_folder(text)
    path = Path(text).expanduser()
    if path.exists():
        return _checked_folder(text, path)
    if _looks_local(text):
        raise QuantkitError(f"model folder '{text}' does not exist")
    return text


def _bundled_folder(name: str) -> str:
    folder = BUNDLED_MODELS[name]
    if not (folder / "config.json").is_file():
        raise QuantkitError(
            f"bundled model '{name}' is not installed (expected it in {folder}); "
            "reinstall quantkit or pass a model folder or hub id"
        )
    return str(folder)


def _checked_folder(text: str, path: Path) -> str:
    if not path.is_dir():
        raise QuantkitError(f"'{text}' is a file, not a model folder: pass the folder that holds config.json")
    if not (path / "config.json").is_file():
        raise QuantkitError(f"'{text}' has no config.json: not a Hugging Face model folder")
    return str(path.resolve())


def _looks_local(text: str) -> bool:
    if text.startswith((".", "/", "~")):
        return True
    return os.sep in text and not _HUB_ID.match(text)
