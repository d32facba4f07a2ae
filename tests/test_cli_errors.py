"""Every user mistake gets one clear line, a non-zero exit, no traceback and no half-written output."""

import json

import pytest


def assert_clean_failure(result, *fragments):
    assert result.code == 2, (result.code, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    joined = " ".join(line.strip() for line in lines)
    assert joined.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in joined, (fragment, joined)


def test_missing_model_folder(run_cli, tmp_path):
    result = run_cli("quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert_clean_failure(result, "does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(run_cli, tmp_path):
    (tmp_path / "model").mkdir()
    result = run_cli("eval", str(tmp_path / "model"))
    assert_clean_failure(result, "no config.json")


def test_unknown_architecture_lists_supported(run_cli, tmp_path):
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    result = run_cli("quantize", str(folder), "-o", str(tmp_path / "out"))
    assert_clean_failure(result, "'bert' is not supported", "llama", "gpt2")
    assert not (tmp_path / "out").exists()


def test_group_size_that_does_not_divide(run_cli, tmp_path):
    result = run_cli("quantize", "-o", str(tmp_path / "out"), "--group-size", "96")
    assert_clean_failure(result, "group size 96 does not divide the input size 256")
    assert not (tmp_path / "out").exists()
    assert not any(tmp_path.iterdir()), "a partial output was left behind"


def test_bad_scheme_string(run_cli, tmp_path):
    result = run_cli("quantize", "-o", str(tmp_path / "out"), "--scheme", "w5a7")
    assert_clean_failure(result, "unknown scheme 'w5a7'", "w4a16")


def test_unreadable_recipe(run_cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: [\n")
    result = run_cli("quantize", "-o", str(tmp_path / "out"), "--recipe", str(recipe))
    assert_clean_failure(result, "is not valid YAML")
    result = run_cli("quantize", "-o", str(tmp_path / "out"), "--recipe", str(tmp_path / "missing.yaml"))
    assert_clean_failure(result, "does not exist")


def test_existing_output_folder_is_refused(run_cli, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_cli("quantize", "-o", str(out))
    assert_clean_failure(result, "exists; pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_seq_len_longer_than_context(run_cli):
    result = run_cli("eval", "--seq-len", "4096", "--max-windows", "1")
    assert_clean_failure(result, "longer than the model's context")


def test_debug_shows_traceback(run_cli, tmp_path, monkeypatch):
    from quantkit import cli

    monkeypatch.setattr(cli.console, "print_exception", lambda: print("TRACEBACK-SHOWN", file=__import__("sys").stderr))
    result = run_cli("--debug", "quantize", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    assert result.code == 2 and "TRACEBACK-SHOWN" in result.stderr


def test_usage_error_exits_nonzero(run_cli):
    result = run_cli("quantize", "--no-such-option")
    assert result.code == 2
    assert "No such option" in result.stderr
