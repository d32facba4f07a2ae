"""Prune quantkit's bundled target with llm-compressor's SparseGPT and Wanda; evaluate as quantkit does.

The pruning counterpart of run_peers.py (same driver, one child process per run, same calibration
tokens and perplexity protocol): SparseGPTModifier and WandaPruningModifier at 50% unstructured
and 2:4, lm_head left dense, everything else at llm-compressor's defaults (recorded per run).
Run it with the peers virtualenv:

    .venv-peers/bin/python scripts/peers/run_peers_sparsity.py            # 4 runs, 64 windows each
    .venv-peers/bin/python scripts/peers/run_peers_sparsity.py --only lc-sparsegpt-2of4 --quick

Results go to scripts/results/peers_sparsity.json; quantkit's own pruning table is
scripts/bench_sparsity.py (scripts/results/sparsity_bundled.json), on the same windows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import peer_runs
import run_peers

RESULTS = Path(__file__).resolve().parents[2] / "scripts" / "results" / "peers_sparsity.json"


def main(argv: list[str]) -> None:
    args = list(argv)
    if "--only" not in args and "--list" not in args and "--child" not in args:
        for spec in peer_runs.SPARSITY_RUNS:
            args += ["--only", spec.name]
    if "--results" not in args and "--quick" not in args and "--child" not in args:
        args += ["--results", str(RESULTS)]
    run_peers.main(args)


if __name__ == "__main__":
    main(sys.argv[1:])
