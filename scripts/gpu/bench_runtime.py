"""Runtime speed on a randomly initialised Llama-3-8B-shaped model on one GPU (speed only).

Speed does not depend on the weights' values, so the model is random (std 0.02, bf16), built
directly on the GPU, and every prompt is random token ids. Nothing is written to disk: the engine
takes the model in memory, then the script quantizes its linear layers in place (W4A16 g128,
symmetric RTN, the GPTQ layout's QuantLinear; lm_head kept in bf16) and runs the engine again.
For each it measures:

- batch-1 decode: TTFT, time per output token and tokens/s, beside the memory-bandwidth limit
  (bytes per decode step over the device's measured copy bandwidth);
- offline throughput: 256 requests, prompt and output lengths uniform in [100, 1024], all at once.

transformers' ``generate`` (static batches, left padding, greedy) runs the first
``--baseline-requests`` requests of the same workload on the bf16 model in the same run; the
engine's throughput is compared with it per output token (tokens/s over tokens/s), since the
baseline ran only a subset. Results go to ``--json`` after every phase, so a run cut short
still leaves what it measured.

    python scripts/gpu/bench_runtime.py --json out.json [--models bf16,w4a16] [--no-baseline]
    python scripts/gpu/bench_runtime.py --tiny --json tiny.json   # small shape on the CPU
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.eval.bandwidth import measure_copy_bandwidth
from quantkit.eval.bench_report import to_json
from quantkit.eval.latency import (
    LatencyConfig,
    close_engine,
    engine_setup,
    latency_on_engine,
    open_engine,
)
from quantkit.eval.throughput import BenchConfig, engine_runs, run_hf_baseline

LLAMA3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
             "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 128000,
             "eos_token_id": 128001, "num_hidden_layers": 32}
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 1024, "max_position_embeddings": 512, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "bos_token_id": 0, "eos_token_id": 0, "num_hidden_layers": 2}
FULL_DEFAULTS = {"num_requests": 256, "input_len_range": "100,1024", "output_len_range": "100,1024",
                 "latency_input_len": 128, "latency_output_len": 128, "repetitions": 5,
                 "baseline_requests": 32, "baseline_batch_size": 16}
TINY_DEFAULTS = {"num_requests": 6, "input_len_range": "8,32", "output_len_range": "4,12",
                 "latency_input_len": 16, "latency_output_len": 8, "repetitions": 3,
                 "baseline_requests": 4, "baseline_batch_size": 2}


# ---------------------------------------------------------------------- checkpoints
def random_model(shape: dict, device: str) -> LlamaForCausalLM:
    """A Llama model of ``shape`` with random bf16 weights (norms 1), built on ``device``."""
    config = LlamaConfig(**shape)
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.data = torch.ones(param.shape, device=device, dtype=torch.bfloat16)
            else:
                param.data = torch.randn(param.shape, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(device)  # to_empty left it blank
    return model.eval().requires_grad_(False)


def in_memory(model: LlamaForCausalLM, label: str):
    """The model as the loader would hand it over (no tokenizer: prompts are token ids)."""
    from quantkit.models.adapters.registry import get_adapter
    from quantkit.models.loading import LoadedModel

    return LoadedModel(model, None, label, get_adapter(model.config), None)


def quantize_w4a16_in_place(model: LlamaForCausalLM) -> float:
    """RTN W4A16 g128 (symmetric, GPTQ QuantLinear) of every decoder linear; seconds it took."""
    from quantkit.quant.linear import QuantLinear
    from quantkit.quant.rtn import rtn_quantize
    from quantkit.quant.scheme import QuantScheme

    scheme = QuantScheme(bits=4, group_size=128, symmetric=True)
    started = time.perf_counter()
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    qw = rtn_quantize(child.weight.detach().float(), scheme, module_name=name)
                    setattr(parent, name, QuantLinear._packed(qw, has_bias=child.bias is not None,
                                                              dtype=child.weight.dtype))
                    del child
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return time.perf_counter() - started


# ---------------------------------------------------------------------- measurements
def measure_model(loaded, label: str, args, device: str, bandwidth: float | None, results: dict):
    """Latency, then throughput, on one engine; the throughput workload for the baseline."""
    engine = open_engine(loaded, device=device, dtype="auto", kv_cache_tokens=args.kv_cache_tokens,
                         gpu_memory_utilization=args.gpu_memory_utilization,
                         async_scheduling=args.async_scheduling)
    entry = results["models"].setdefault(label, {})
    try:
        entry["setup"] = {**engine_setup(engine, loaded.path, device), "model": label}
        latency = LatencyConfig(input_len=args.latency_input_len, output_len=args.latency_output_len,
                                repetitions=args.repetitions).check()
        entry["latency"] = latency_on_engine(engine, latency, device, bandwidth, progress=False)
        save(results, args)
        runs, workloads = engine_runs(engine, bench_config(args), device, bandwidth, progress=False)
        entry["throughput"] = runs[0]
        save(results, args)
    finally:
        close_engine(engine)
    return workloads[0]


def bench_config(args) -> BenchConfig:
    from quantkit.eval.throughput import parse_len_range

    return BenchConfig(num_requests=args.num_requests, seed=args.seed,
                       input_len_range=parse_len_range(args.input_len_range, "--input-len-range"),
                       output_len_range=parse_len_range(args.output_len_range, "--output-len-range")).check()


def baseline_ratios(results: dict) -> dict:
    """Engine output tokens/s over the baseline's, per model (the baseline ran a subset)."""
    base = results["baseline"]["output_tokens_per_s"]
    return {label: entry["throughput"]["output_tokens_per_s"] / base
            for label, entry in results["models"].items() if "throughput" in entry}


def summary_lines(results: dict, only: str | None = None) -> list[str]:
    lines = []
    for label, entry in results["models"].items():
        if only is not None and label != only:
            continue
        if "latency" in entry:
            lat = entry["latency"]
            limit = lat["bandwidth"]["limit_tokens_per_s"]
            share = "" if limit is None else f" = {100 * lat['decode_tokens_per_s'] / limit:.0f}% of the limit"
            lines.append(f"{label} ({entry['setup']['compute_dtype']} compute): batch-1 decode "
                         f"{lat['decode_tokens_per_s']:.1f} tokens/s, bandwidth limit "
                         f"{'n/a' if limit is None else f'{limit:.1f}'} tokens/s{share}; "
                         f"TTFT median {1e3 * lat['ttft_s']['median']:.1f} ms")
        if "throughput" in entry:
            run = entry["throughput"]
            lines.append(f"{label}: {run['num_requests']} requests in {run['duration_s']:.1f} s, "
                         f"{run['output_tokens_per_s']:.0f} output tokens/s, {run['total_tokens_per_s']:.0f} total "
                         f"tokens/s, peak memory {run['peak_memory_bytes'] / 2**30:.1f} GiB")
    ratios = (results.get("ratio_vs_baseline") or {}) if only is None else {}
    for label, ratio in ratios.items():
        base = results["baseline"]
        lines.append(f"{label} engine vs transformers generate ({base['dtype']}, batch {base['batch_size']}, first "
                     f"{base['num_requests']} requests): {ratio:.2f}x output tokens/s")
    return lines


def save(results: dict, args) -> None:
    results["summary"] = summary_lines(results)
    if args.json:
        Path(args.json).write_text(to_json(results))


# ---------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="a small shape on the CPU (checks the script)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32, tiny: 2)")
    ap.add_argument("--models", default="bf16,w4a16", help="which of bf16,w4a16 to measure")
    ap.add_argument("--no-baseline", action="store_true", help="skip transformers generate")
    ap.add_argument("--num-requests", type=int)
    ap.add_argument("--input-len-range")
    ap.add_argument("--output-len-range")
    ap.add_argument("--latency-input-len", type=int)
    ap.add_argument("--latency-output-len", type=int)
    ap.add_argument("--repetitions", type=int)
    ap.add_argument("--baseline-requests", type=int)
    ap.add_argument("--baseline-batch-size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-tokens", type=int, default=None)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                    help="launch each decode step before the previous step's tokens reach the host "
                         "(default: the engine's, on for CUDA)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    for key, value in (TINY_DEFAULTS if args.tiny else FULL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    device = "cpu" if args.tiny else "cuda"
    shape = dict(TINY if args.tiny else LLAMA3_8B)
    shape["num_hidden_layers"] = args.layers or shape["num_hidden_layers"]
    labels = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(labels) - {"bf16", "w4a16"}
    if unknown:
        raise SystemExit(f"unknown --models {sorted(unknown)}: choose from bf16, w4a16")
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "model": f"{'tiny' if args.tiny else 'Llama-3-8B'} shape, random weights", "shape": shape,
               "prompts": "random token ids", "sampling": "greedy, end-of-sequence ignored", "models": {},
               "baseline": None}
    results["device_bandwidth_bytes_per_s"] = bandwidth = measure_copy_bandwidth(device)
    started = time.perf_counter()
    model = random_model(shape, device)
    if device == "cpu":
        model = model.float()  # the CPU computes in float32, as load_model(dtype="auto") would
    results["build_seconds"] = {"bf16": time.perf_counter() - started}
    workload = None
    if "bf16" in labels:
        workload = measure_model(in_memory(model, "random Llama bf16"), "bf16", args, device, bandwidth, results)
        print("\n".join(summary_lines(results, only="bf16")), flush=True)
    if not args.no_baseline and workload is not None:
        subset = workload.head(args.baseline_requests)
        results["baseline"] = run_hf_baseline(in_memory(model, "random Llama bf16"), subset,
                                              args.baseline_batch_size, device=device, dtype="auto")
        results["baseline"]["note"] = (f"first {len(subset)} of the {len(workload)} requests; ratios compare "
                                       "output tokens/s")
        results["ratio_vs_baseline"] = baseline_ratios(results)
        save(results, args)
    if "w4a16" in labels:
        results["build_seconds"]["w4a16_rtn_in_place"] = quantize_w4a16_in_place(model)
        measure_model(in_memory(model, "random Llama W4A16 g128 RTN"), "w4a16", args, device, bandwidth, results)
        print("\n".join(summary_lines(results, only="w4a16")), flush=True)
        if results.get("baseline"):
            results["ratio_vs_baseline"] = baseline_ratios(results)
    save(results, args)
    print("\n".join(line for line in results["summary"] if "vs transformers" in line))


if __name__ == "__main__":
    main()
