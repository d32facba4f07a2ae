#!/usr/bin/env bash
# Loads quantkit's GPTQ, AWQ and compressed-tensors checkpoints with the reference loaders
# (transformers + gptqmodel + optimum, and the compressed-tensors library) and compares logits.
# Those packages are not quantkit dependencies and do not install beside the test environment's
# newer transformers, so the tests skip in CI; this runs them in .venv-peers (setup_peers_env.sh).
#
#   scripts/peers/check_reference_loaders.sh     # prints the pytest summary
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${PEERS_VENV:-$REPO/.venv-peers}"
cd "$REPO"
"$VENV/bin/python" -m pip install -q -c constraints-cpu.txt optimum pytest hypothesis
HF_HUB_OFFLINE=1 "$VENV/bin/python" -m pytest -v -p no:cacheprovider \
    tests/test_gptq_format.py tests/test_awq_format.py tests/test_compressed_tensors_format.py \
    -k "transformers or library"
