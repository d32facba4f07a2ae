"""atomic_output_dir: all-or-nothing output folders that never clobber without permission."""

import os

import pytest

from quantkit.errors import QuantkitError
from quantkit.formats.atomic import atomic_output_dir, check_output_dir


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_creates_the_folder_on_success(tmp_path):
    out = tmp_path / "nested" / "ckpt"
    with atomic_output_dir(out, overwrite=False) as staging:
        assert staging != out and staging.parent == out.parent and staging.is_dir()
        assert not out.exists()  # nothing at the destination until the block succeeds
        (staging / "model.safetensors").write_text("weights")
    assert (out / "model.safetensors").read_text() == "weights"
    assert _leftovers(out.parent) == []
    assert os.stat(out).st_mode & 0o755 == 0o755


def test_refuses_a_non_empty_folder_without_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(QuantkitError) as err, atomic_output_dir(out, overwrite=False):
        pytest.fail("the block must not run")
    assert (
        str(err.value)
        == f"output folder '{out}' exists; pass --overwrite to replace it"
    )
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_replaces_a_folder_with_overwrite(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output_dir(out, overwrite=True) as staging:
        (staging / "new.txt").write_text("new")
        assert (
            out / "old.txt"
        ).exists()  # the old folder stays until the new one is complete
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert _leftovers(tmp_path) == []


def test_an_empty_folder_may_be_reused(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    with atomic_output_dir(out, overwrite=False) as staging:
        (staging / "a.txt").write_text("a")
    assert [p.name for p in out.iterdir()] == ["a.txt"]


def test_refuses_an_existing_file(tmp_path):
    out = tmp_path / "ckpt"
    out.write_text("not a folder")
    for overwrite in (False, True):
        refused = pytest.raises(QuantkitError, match="output path '.*ckpt' is a file")
        with refused, atomic_output_dir(out, overwrite=overwrite):
            pytest.fail("the block must not run")
    assert out.read_text() == "not a folder"


@pytest.mark.parametrize("existing", [False, True])
def test_an_exception_leaves_the_destination_untouched(tmp_path, existing):
    out = tmp_path / "ckpt"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("old")
    failing = pytest.raises(RuntimeError, match="boom")
    with failing, atomic_output_dir(out, overwrite=True) as staging:
        (staging / "half-written.bin").write_text("partial")
        raise RuntimeError("boom")
    if existing:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert _leftovers(tmp_path) == []


def test_keyboard_interrupt_also_cleans_up(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt), atomic_output_dir(out) as staging:
        (staging / "x").write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_check_output_dir_can_run_before_long_work(tmp_path):
    check_output_dir(tmp_path / "new", overwrite=False)
    check_output_dir(str(tmp_path), overwrite=False)  # empty folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(QuantkitError, match="exists; pass --overwrite"):
        check_output_dir(tmp_path, overwrite=False)
    check_output_dir(tmp_path, overwrite=True)
    with pytest.raises(QuantkitError, match="is a file"):
        check_output_dir(tmp_path / "file", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
