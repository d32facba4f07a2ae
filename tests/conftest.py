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


# Folders whose tests work on tiny tensors: one torch thread there, since on a small shared machine
# OpenMP threads competing with other processes make these small ops tens of times slower.
ONE_THREAD_FOLDERS = {"distill", "sparsity", "w8a8"}


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_tensors(request):
    if request.node.path.parent.name not in ONE_THREAD_FOLDERS:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
