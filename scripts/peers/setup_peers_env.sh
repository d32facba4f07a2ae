#!/usr/bin/env bash
# Creates .venv-peers: llm-compressor and GPTQModel, the peer tools quantkit is compared against,
# with the CPU build of torch and quantkit itself (editable, for its data loading and evaluation).
# They are NOT quantkit dependencies, so they live in this separate, git-ignored virtualenv.
#
#   scripts/peers/setup_peers_env.sh            # create or update .venv-peers
#   PEERS_VENV=/tmp/v scripts/peers/setup_peers_env.sh
#
# Versions that install and import together with torch 2.13.0+cpu (checked on Python 3.11):
#   llmcompressor 0.14.0.1 caps transformers at <=5.17.0 and brings compressed-tensors 0.19.0;
#   gptqmodel 7.7.0 needs torch>=2.14.1, so 7.6.0 (an sdist: builds pure Python, plus the pypcre
#   C extension, so a C compiler is needed; its CUDA kernels are JIT-built at run time, never at
#   install, so no BUILD_CUDA_EXT-style switch is needed) which pins numpy==2.2.6.
# torch==2.13.0+cpu comes from the local wheel folder pip is configured with; elsewhere, add
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${PEERS_VENV:-$REPO/.venv-peers}"
PYTHON="${PYTHON:-python3}"
PEERS=(llmcompressor==0.14.0.1 compressed-tensors==0.19.0 gptqmodel==7.6.0 transformers==5.17.0)

cd "$REPO"
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c constraints-cpu.txt torch==2.13.0+cpu "${PEERS[@]}" -e .

# The CPU pin must hold: no CUDA torch, no nvidia-* runtime wheels. nvidia-ml-py (pure-Python NVML
# bindings that llm-compressor imports to query GPUs) is no CUDA runtime and is allowed.
installed="$("$VENV/bin/python" -m pip list --format=freeze 2>/dev/null)"
torch_line="$(grep -i '^torch==' <<<"$installed")"
if [[ "$torch_line" != *"+cpu" ]]; then
    echo "error: expected the CPU build of torch, found: $torch_line" >&2
    exit 1
fi
cuda_wheels="$(grep -iE '^(nvidia-|triton==|cuda-)' <<<"$installed" | grep -iv '^nvidia-ml-py==' || true)"
if [[ -n "$cuda_wheels" ]]; then
    echo "error: CUDA packages were installed:" >&2
    echo "$cuda_wheels" >&2
    exit 1
fi
"$VENV/bin/python" -m pip check

HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES= "$VENV/bin/python" - <<'EOF' 2>/dev/null
from importlib.metadata import version

import gptqmodel  # noqa: F401 - the imports are the check
import llmcompressor  # noqa: F401
import quantkit  # noqa: F401

names = ("torch", "transformers", "llmcompressor", "compressed-tensors", "gptqmodel", "numpy")
print("peers venv ready: " + ", ".join(f"{name} {version(name)}" for name in names))
EOF
