#!/usr/bin/env bash
# One device call's worth of GPU work, by phase: tests, sweep, kernels, runtime, spec.
#   OUT=/some/dir bash scripts/gpu/device_session.sh tests sweep
# Each phase writes its log (and JSON) under $OUT; a failing phase does not stop the next.
set -uo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:?set OUT}
TEXT=calibration_data/wikitext2/wiki.test.raw
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/device.txt" 2>&1
for phase in "$@"; do
  start=$(date +%s)
  case $phase in
    tests)
      # the kernel and runtime folders whole (their Triton tests run on CUDA when it is there), the rest by marker
      timeout 240 python -m pytest -q -p no:cacheprovider --durations=8 tests/kernels tests/runtime/test_engine_gpu.py \
        tests/runtime/test_decode_graphs.py > "$OUT/gpu_tests.txt" 2>&1
      timeout 120 python -m pytest -q -p no:cacheprovider -m gpu tests/test_awq_algorithm.py tests/test_gptq_algorithm.py \
        tests/test_model_loading.py >> "$OUT/gpu_tests.txt" 2>&1 ;;
    runtime-tests)
      timeout 200 python -m pytest -q -p no:cacheprovider --durations=8 tests/runtime/test_engine_gpu.py \
        tests/runtime/test_decode_graphs.py tests/runtime/test_speed_gate.py tests/kernels/test_kernels_layer_ops.py \
        tests/kernels/test_w4a16_default_configs_gpu.py > "$OUT/gpu_tests.txt" 2>&1 ;;
    sweep)
      timeout 330 python scripts/gpu/bench_kernels.py --fused --sweep --skip-attention --rows 1,2,4,8,16,32,64,128,256,512,1024,4096 \
        --json "$OUT/kernels_sweep.json" > "$OUT/kernels_sweep.txt" 2>&1 ;;
    sweep-gemv)
      timeout 300 python scripts/gpu/bench_kernels.py --fused --sweep --skip-attention --skip-linear --rows 1 \
        --json "$OUT/kernels_sweep.json" > "$OUT/kernels_sweep.txt" 2>&1 ;;
    kernels)
      python scripts/gpu/bench_kernels.py --fused --json "$OUT/kernels.json" > "$OUT/kernels.txt" 2>&1 ;;
    runtime)
      timeout 420 python scripts/gpu/bench_runtime.py --json "$OUT/runtime_8b.json" > "$OUT/runtime_8b.txt" 2>&1 ;;
    runtime-w4)
      timeout 300 python scripts/gpu/bench_runtime.py --models w4a16 --no-baseline --json "$OUT/runtime_8b_w4.json" \
        > "$OUT/runtime_8b_w4.txt" 2>&1 ;;
    w8a8)
      timeout 150 python -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_w8a8.py tests/sparsity/test_sparse_linear.py \
        > "$OUT/gpu_tests_helpers.txt" 2>&1
      timeout 240 python scripts/gpu/bench_w8a8_gemm.py --out "$OUT/w8a8_gemm.json" > "$OUT/w8a8_gemm.txt" 2>&1 ;;
    helper-tests)
      # issues 6 and 7: the 8-bit and KV-quant kernels, the W8A8 engine, the 2:4 sparse linear, on CUDA
      timeout 240 python -m pytest -q -p no:cacheprovider --durations=8 tests/kernels/test_kernels_w8a8.py \
        tests/kernels/test_kernels_kv_quant.py tests/runtime/test_engine_w8a8.py tests/sparsity/test_sparse_linear.py \
        > "$OUT/gpu_tests_helpers.txt" 2>&1 ;;
    w8a8-sweep)
      timeout 300 python scripts/gpu/bench_w8a8_gemm.py --sweep --out "$OUT/w8a8_gemm.json" > "$OUT/w8a8_gemm.txt" 2>&1 ;;
    w8a8-sweep-ws)
      # issue 6: the INT8 TMA kernel with Triton's automatic warp specialization, from 2048 tokens
      timeout 300 python scripts/gpu/bench_w8a8_gemm.py --sweep --warp-specialize --tokens 2048,4096,8192 \
        --out "$OUT/w8a8_gemm_ws.json" > "$OUT/w8a8_gemm_ws.txt" 2>&1 ;;
    fp8-accum)
      # issue 6: FP8 fast accumulation's GEMM error at 8B shapes and the bundled target's fp8-dynamic perplexity, on and off
      timeout 300 python scripts/gpu/check_fp8_fast_accum.py --out "$OUT/fp8_fast_accum.json" > "$OUT/fp8_fast_accum.txt" 2>&1 ;;
    sparse)
      timeout 150 python scripts/gpu/bench_sparse_linear.py --out "$OUT/sparse_linear.json" > "$OUT/sparse_linear.txt" 2>&1 ;;
    distill)
      timeout 560 python scripts/gpu/run_distill.py --out "$OUT/distill.json" > "$OUT/distill.txt" 2>&1 ;;
    serve)
      # the GPU machine has no network and no server packages: wheels carried in .device_wheels (see README)
      [ -d .device_wheels ] && python -m pip install -q --no-index --find-links .device_wheels fastapi uvicorn httptools uvloop \
        prometheus-client httpx > "$OUT/serve_pip.txt" 2>&1
      timeout 330 python scripts/gpu/bench_serve.py --out "$OUT/serve" > "$OUT/serve.txt" 2>&1 ;;
    serve-proc)
      # the engine in its own process (quantkit serve --engine-process)
      [ -d .device_wheels ] && python -m pip install -q --no-index --find-links .device_wheels fastapi uvicorn httptools \
        uvloop prometheus-client httpx > "$OUT/serve_pip.txt" 2>&1
      timeout 330 python scripts/gpu/bench_serve.py --engine-process --out "$OUT/serve_proc" > "$OUT/serve_proc.txt" 2>&1 ;;
    spec)
      for draft in none quantkit-draft; do
        for conc in 1 64; do
          extra=(); [ "$draft" != none ] && extra=(--draft "$draft")
          timeout 150 python -m quantkit bench quantkit-target --device cuda --dtype bfloat16 --text-file "$TEXT" \
            --num-requests 64 --input-len-range 128,128 --output-len-range 128,128 --max-concurrency "$conc" \
            "${extra[@]}" --json "/tmp/spec_${draft}_c${conc}.json" >> "$OUT/spec.txt" 2>&1
        done
      done
      python -c "import glob, json, sys; json.dump({f: json.load(open(f)) for f in sorted(glob.glob('/tmp/spec_*.json'))}, open(sys.argv[1], 'w'), indent=1)" "$OUT/spec.json" ;;
    multi-gpu)
      # issue 8: torchrun on every GPU of the host; NVLink multicast stays off (the device tool's KINDS.md says why)
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      timeout 340 python scripts/gpu/bench_quantize_multi_gpu.py --gpus 1,2 --layers "${MULTI_GPU_LAYERS:-6}" \
        --json "$OUT/quantize_70b_multi_gpu.json" > "$OUT/quantize_70b_multi_gpu.txt" 2>&1
      timeout 200 python -m pytest -q -p no:cacheprovider -m gpu tests/test_data_parallel_cli.py \
        > "$OUT/gpu_tests_multi.txt" 2>&1 ;;
    profile-decode)
      # issue 4: batch-1 decode step, GPU busy against wall, synchronous and asynchronous scheduling
      for variant in "--no-async-scheduling" "" "--w4a16 --no-async-scheduling" "--w4a16"; do
        name=profile$(echo "$variant" | tr -d ' -' | sed 's/scheduling//'); name=${name:-profile}
        timeout 150 python scripts/gpu/profile_decode.py $variant --json "/tmp/$name.json" >> "$OUT/profile_decode.txt" 2>&1
      done
      (cd /tmp && tar czf "$OUT/profile_decode_json.tgz" profile*.json) ;;
    gptq-kernel)
      # issue 8: the one-launch GPTQ block kernel against its reference and the CUDA-graph path, and its tile sweep
      timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_gptq_block.py tests/test_gptq_algorithm.py tests/test_awq_algorithm.py \
        tests/test_gptq_row_split.py > "$OUT/gpu_tests_gptq.txt" 2>&1
      timeout 200 python scripts/gpu/bench_gptq_block.py ${GPTQ_BLOCK_SWEEP---sweep} --json "$OUT/gptq_block.json" > "$OUT/gptq_block.txt" 2>&1 ;;
    gpu-all)
      # every test marked gpu (server packages from the carried .device_wheels), then the kernel folder
      # whole (its Triton tests run on CUDA when it is there)
      [ -d .device_wheels ] && python -m pip install -q --no-index --find-links .device_wheels fastapi uvicorn httptools \
        uvloop prometheus-client httpx > "$OUT/serve_pip.txt" 2>&1
      timeout 280 python -m pytest -q -p no:cacheprovider --durations=8 -m gpu tests --ignore=tests/kernels \
        > "$OUT/gpu_tests_all.txt" 2>&1
      timeout 290 python -m pytest -q -p no:cacheprovider tests/kernels > "$OUT/gpu_tests_kernels.txt" 2>&1 ;;
    profile-gptq)
      # issue 8: where GPTQ's time goes on a 70B-shaped layer, and how the column solve scales with the rows kept
      timeout 240 python scripts/gpu/profile_gptq_layer.py --json "$OUT/profile_gptq.json" > "$OUT/profile_gptq.txt" 2>&1 ;;
    *) echo "unknown phase $phase" ;;
  esac
  echo "$phase: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/phases.txt"
done
