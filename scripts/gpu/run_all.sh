#!/usr/bin/env bash
# One device call: GPU tests, then the quantization speed benchmarks; results under $OUT (or ./out/gpu).
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
for method in ${METHODS:-gptq awq}; do
  python3 scripts/gpu/bench_quantize_8b.py --method "$method" --json "$OUT/quantize_8b_$method.json" 2>&1 | tail -20
done
