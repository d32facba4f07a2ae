"""Where a batch-1 decode step's time goes: GPU kernel time against wall time, kernel by kernel.

Builds the random Llama-3-8B-shaped model on the GPU (bf16, and W4A16 RTN g128 in place with
``--w4a16``, as ``bench_runtime.py`` does), runs one warm-up request on quantkit's engine (CUDA
graphs captured), then one request of ``--input-len`` random ids and ``--output-len`` greedy
tokens under ``torch.profiler``. Prints the wall time per decode step, the GPU busy time per step
(sum of kernel times), the gap between them (host time the GPU waits for) and the kernels that
take the most time per step; ``--json`` keeps it.

    python scripts/gpu/profile_decode.py [--w4a16] [--no-async-scheduling] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import (
    LLAMA3_8B,
    TINY,
    in_memory,
    quantize_w4a16_in_place,
    random_model,
)

from quantkit.eval.latency import close_engine, open_engine
from quantkit.runtime.sampling_params import SamplingParams


def run_request(engine, prompt: list[int], output_len: int) -> list[float]:
    """Step end times of one greedy request run alone."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    engine.add_request(prompt, params)
    ends = []
    while engine.has_unfinished():
        engine.step()
        ends.append(time.perf_counter())
    return ends


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--w4a16", action="store_true")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="the engine launches each decode step before the previous step's tokens reach the host "
                         "(default: the engine's, on for CUDA)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tiny", action="store_true", help="a small shape on the CPU (checks the script)")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    shape = TINY if args.tiny else {**LLAMA3_8B, "num_hidden_layers": args.layers}
    model = random_model(shape, device)
    if args.w4a16:
        quantize_w4a16_in_place(model)
    label = "w4a16" if args.w4a16 else "bf16"
    engine = open_engine(in_memory(model, label), device=device, dtype="auto", kv_cache_tokens=8192,
                         async_scheduling=args.async_scheduling)
    label += " async" if engine.async_stepper is not None else " sync"
    rng = np.random.default_rng(0)
    prompt = lambda: rng.integers(0, shape["vocab_size"], args.input_len).tolist()
    try:
        run_request(engine, prompt(), args.output_len)  # warm-up: compiles kernels, captures graphs
        if device == "cuda":
            torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ends = run_request(engine, prompt(), args.output_len)
            if device == "cuda":
                torch.cuda.synchronize()
    finally:
        close_engine(engine)
    decode_steps = len(ends) - 1
    wall = (ends[-1] - ends[0]) / decode_steps
    kernels = defaultdict(lambda: [0.0, 0])
    total = 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
            kernels[event.name][0] += us
            kernels[event.name][1] += 1
            total += us
    steps = decode_steps + 1  # the prefill step's kernels are in the totals too
    gpu_per_step = total / steps / 1e6
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:20]
    print(f"{label}: wall {wall * 1e3:.3f} ms per decode step, GPU busy {gpu_per_step * 1e3:.3f} ms per step "
          f"(all {steps} steps incl. prefill), gap {max(0.0, wall - gpu_per_step) * 1e3:.3f} ms")
    for name, (us, count) in top:
        print(f"  {us / steps:9.1f} us/step  {count / steps:6.1f} calls/step  {name[:110]}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": label, "wall_ms_per_decode_step": wall * 1e3, "gpu_ms_per_step": gpu_per_step * 1e3,
            "kernels": [{"name": n, "us_per_step": us / steps, "calls_per_step": c / steps} for n, (us, c) in top],
        }, indent=1))


if __name__ == "__main__":
    main()
