"""Time GPTQ / AWQ on a randomly initialised Llama-3-8B-shaped model on one GPU (speed only).

Speed does not depend on the weights' values, so the model is random (std 0.02) and the
calibration tokens are random ids: 128 samples of 2048 tokens, as llm-compressor's published
Llama-3-8B GPTQ figure (745 s, ~5.8 GB peak on one GPU) uses. The model lives in CPU memory in
bfloat16; the pipeline moves one decoder layer at a time to the GPU. Prints wall time of the
quantization (capture + all layers, not model creation) and peak GPU memory allocated.

    python scripts/gpu/bench_quantize_8b.py --method gptq [--layers 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.models.adapters import get_adapter
from quantkit.pipeline import quantize_model
from quantkit.recipe import weight_quant_recipe

TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)


def random_model(layers: int, shape: dict, device: str) -> LlamaForCausalLM:
    config = LlamaConfig(num_hidden_layers=layers, **shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                value = torch.ones(param.shape, device=device, dtype=torch.bfloat16)
            else:
                value = torch.randn(param.shape, device=device, dtype=torch.bfloat16, generator=gen) * 0.02
            param.data = value.cpu()
    # to_empty left the rotary tables uninitialised: build them again on the CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval().requires_grad_(False)


def trace_memory_phases() -> dict[str, float]:
    """Peak GPU memory (GiB) per pipeline phase, by wrapping the functions that run each phase."""
    import quantkit.pipeline.awq_step as awq_step
    import quantkit.pipeline.capture as capture
    import quantkit.pipeline.driver as driver
    import quantkit.pipeline.gptq_step as gptq_step
    import quantkit.pipeline.replay as replay

    peaks: dict[str, float] = {}

    def traced(name, fn):
        def wrapper(*args, **kwargs):
            torch.cuda.synchronize()
            outer = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            try:
                return fn(*args, **kwargs)
            finally:
                peak = torch.cuda.max_memory_allocated()
                peaks[name] = max(peaks.get(name, 0.0), round(peak / 2**30, 2))
                # resetting hid the peak before this phase from the pipeline's own figure
                peaks["_before_phases"] = max(peaks.get("_before_phases", 0.0), round(outer / 2**30, 2))
        return wrapper

    driver.capture_first_layer_inputs = traced("capture", capture.capture_first_layer_inputs)
    gptq_step.gptq_quantize = traced("gptq_solve", gptq_step.gptq_quantize)
    awq_step.awq_search_scales_from_stats = traced("awq_scale_search", awq_step.awq_search_scales_from_stats)
    awq_step.awq_search_clip_from_stats = traced("awq_clip_search", awq_step.awq_search_clip_from_stats)
    run = replay.ReplayCache.run
    replay.ReplayCache.run = lambda self, batches, fn, **kw: traced(
        "forward_pass" if kw.get("record", True) else "output_pass", run)(self, batches, fn, **kw)
    return peaks


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="gptq", choices=["gptq", "awq", "rtn"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--json", default=None)
    ap.add_argument("--offload-activations", action="store_true", help="keep calibration activations in CPU memory")
    ap.add_argument("--tiny", action="store_true", help="a small shape on the CPU (smoke test of this script)")
    ap.add_argument("--memory-phases", action="store_true", help="also report the peak GPU memory of each phase")
    args = ap.parse_args()
    shape, device = (TINY, "cpu") if args.tiny else (LLAMA3_8B, "cuda")

    phases = trace_memory_phases() if args.memory_phases and device == "cuda" else None
    t0 = time.perf_counter()
    model = random_model(args.layers, shape, device)
    build_s = time.perf_counter() - t0
    samples = torch.randint(0, shape["vocab_size"], (args.samples, args.seq_len),
                            generator=torch.Generator().manual_seed(0))
    recipe = weight_quant_recipe("w4a16", group_size=128, method=args.method,
                                 symmetric=args.method != "awq")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    result = quantize_model(model, get_adapter(model), recipe, device=device, samples=samples,
                            batch_size=args.batch_size, offload_activations=args.offload_activations)
    sync()
    seconds = time.perf_counter() - start
    peak = result.peak_device_bytes or 0
    if phases:
        peak = max(peak, int(max(phases.values()) * 2**30))
    figures = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "method": args.method,
        "scheme": "w4a16 g128", "model": f"{'tiny' if args.tiny else 'Llama-3-8B'} shape, {args.layers} layers, bf16, random",
        "calibration": f"{args.samples} x {args.seq_len} tokens", "batch_size": args.batch_size, "offload_activations": args.offload_activations,
        "seconds": round(seconds, 1), "seconds_per_layer": round(seconds / args.layers, 2),
        "peak_gpu_gib": round(peak / 2**30, 2), "model_build_seconds": round(build_s, 1),
        "quantized_linears": len(result.quantized),
        "mean_layer_output_error": sum(r.output_error for r in result.layers) / len(result.layers),
    }
    if phases is not None:
        figures["peak_gpu_gib_by_phase"] = phases
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
