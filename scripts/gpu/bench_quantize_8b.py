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

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)


def random_model(layers: int) -> LlamaForCausalLM:
    config = LlamaConfig(num_hidden_layers=layers, **LLAMA3_8B)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                value = torch.ones(param.shape, device="cuda", dtype=torch.bfloat16)
            else:
                value = torch.randn(param.shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
            param.data = value.cpu()
        model.model.rotary_emb.inv_freq = model.model.rotary_emb.original_inv_freq = _inv_freq(config)
    return model.eval().requires_grad_(False)


def _inv_freq(config: LlamaConfig) -> torch.Tensor:
    head_dim = config.hidden_size // config.num_attention_heads
    return 1.0 / (config.rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="gptq", choices=["gptq", "awq", "rtn"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    t0 = time.perf_counter()
    model = random_model(args.layers)
    build_s = time.perf_counter() - t0
    samples = torch.randint(0, LLAMA3_8B["vocab_size"], (args.samples, args.seq_len),
                            generator=torch.Generator().manual_seed(0))
    recipe = weight_quant_recipe("w4a16", group_size=128, method=args.method,
                                 symmetric=args.method != "awq")
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = quantize_model(model, get_adapter(model), recipe, device="cuda", samples=samples,
                            batch_size=args.batch_size)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    figures = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "method": args.method,
        "scheme": "w4a16 g128", "model": f"Llama-3-8B shape, {args.layers} layers, bf16, random",
        "calibration": f"{args.samples} x {args.seq_len} tokens", "batch_size": args.batch_size,
        "seconds": round(seconds, 1), "seconds_per_layer": round(seconds / args.layers, 2),
        "peak_gpu_gib": round(result.peak_device_bytes / 2**30, 2), "model_build_seconds": round(build_s, 1),
        "quantized_linears": len(result.quantized),
        "mean_layer_output_error": sum(r.output_error for r in result.layers) / len(result.layers),
    }
    print(json.dumps(figures, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
