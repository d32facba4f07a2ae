"""Where the bundled `calibration_data/` folder lives.

Lookup order:
1. ``$QUANTKIT_DATA_DIR`` when set — a copy of the folder;
2. ``quantkit/calibration_data/`` inside an installed wheel (setup.py copies the folder there);
3. ``calibration_data/`` at the root of the source checkout this package was imported from
   (running from the repository, or an editable install).
"""

from __future__ import annotations

import os
from pathlib import Path

from quantkit.errors import QuantkitError

DATA_DIR_ENV = "QUANTKIT_DATA_DIR"
INSTALLED_DATA_DIR = Path(__file__).resolve().parents[1] / "calibration_data"
CHECKOUT_DATA_DIR = Path(__file__).resolve().parents[2] / "calibration_data"


def calibration_data_dir() -> Path:
    """The folder holding the bundled text; a QuantkitError when it cannot be found."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        folder = Path(override).expanduser()
        if not folder.is_dir():
            raise QuantkitError(
                f"${DATA_DIR_ENV} points to {folder}, which is not a folder: "
                "set it to a copy of the repository's calibration_data/ folder"
            )
        return folder
    for folder in (INSTALLED_DATA_DIR, CHECKOUT_DATA_DIR):
        if folder.is_dir():
            return folder
    raise QuantkitError(
        f"the bundled calibration_data/ folder is not at {CHECKOUT_DATA_DIR}: "
        f"set ${DATA_DIR_ENV} to a copy of the repository's calibration_data/ folder"
    )


def bundled_file(relative: str) -> Path:
    """A file inside the bundled folder, which must exist."""
    path = calibration_data_dir() / relative
    if not path.is_file():
        raise QuantkitError(
            f"bundled data file {path} is missing: rebuild the folder with "
            "scripts/make_calibration_data.py or fix $" + DATA_DIR_ENV
        )
    return path
