"""Shared test setup: no hub access, deterministic seeds, and a way to run the CLI in-process."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `quantkit ARGS...` through the real entry point; return exit code and output."""
    from quantkit import cli

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["quantkit", *map(str, args)])
        monkeypatch.setitem(cli._state, "debug", False)
        code = 0
        try:
            cli.main()
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else 1
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
