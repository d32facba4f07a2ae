"""Write an output folder all at once, or not at all.

Writers fill a temporary folder next to the destination (same filesystem, so the final rename is
atomic) and only a fully written folder is renamed into place. An existing destination is replaced
only on success and only when the caller allowed it; on any error the temporary folder is removed
and whatever was at the destination stays untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from quantkit.errors import QuantkitError

_FOLDER_MODE = 0o755  # mkdtemp creates 0700 folders; a checkpoint should be readable like any other


@contextmanager
def atomic_output_dir(out: Path | str, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``out`` when the ``with`` block succeeds."""
    out = Path(out)
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(staging, _FOLDER_MODE)
    try:
        yield staging
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def check_output_dir(out: Path | str, overwrite: bool) -> None:
    """Refuse a destination that is a file, or a non-empty folder unless ``overwrite``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise QuantkitError(
            f"output path '{out}' is a file; choose a folder path for the output"
        )
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise QuantkitError(
            f"output folder '{out}' exists; pass --overwrite to replace it"
        )


def _move_into_place(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    # Keep the old folder aside until the new one is in place, then delete it.
    retired = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(out, retired)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(retired, out)
        raise
    shutil.rmtree(retired, ignore_errors=True)
