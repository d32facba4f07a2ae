"""Time GPTQ W4 g128 on a randomly initialised Llama-3-70B-shaped model on 1, 2 and 4 GPUs (speed only).

    python scripts/gpu/bench_quantize_multi_gpu.py --gpus 1,2,4 [--layers 80] [--json out.json]

runs, for each GPU count N, ``torchrun --standalone --nproc-per-node N`` on this file (the worker),
then prints the measured seconds and the speed-up over one GPU, measured in the same run. The
workers use quantkit's real multi-GPU path (``pipeline/data_parallel.py``: every rank runs its
contiguous share of the calibration samples through the working layer on ``cuda:LOCAL_RANK``, the
Hessians are all-reduced over NCCL before GPTQ acts on them).

The model is Llama-3-70B's shape (hidden 8192, 80 layers, 64 heads, 8 KV heads, MLP 28672, vocab
128256), bf16, random (std 0.02; speed does not depend on the weights' values), built on the fly:
the decoder layers start on the meta device and each is filled with random values on its GPU when
the pipeline moves it there, and dropped when the pipeline moves it back, so no 140 GB checkpoint
has to exist and host memory holds the embeddings only. The time of filling a layer is measured
and left out (a real run copies the layer from CPU memory instead: about 1.7 GB per layer). The
quantized weights are counted and dropped instead of kept for a checkpoint. Calibration: 128
samples of 2048 random token ids, batch 4 per rank, as the 8B benchmark (``bench_quantize_8b.py``).

``--layers K`` runs the first K layers and adds a figure for 80 layers, **extrapolated** (capture
+ the K layers measured + (80 - K) x the mean of the measured layers after the first, which
carries the warm-up) and labelled as such. ``--check`` fingerprints every quantized linear and
says how many are identical to the one-GPU run (hashing adds time: not for timed runs).

``--tiny`` is a dry run of this script on the CPU: a tiny shape, the gloo backend, N processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = Path(__file__).resolve().parents[2]
LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8,
                  vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
LAYERS_70B = 80
TINY = dict(hidden_size=256, intermediate_size=768, num_attention_heads=8, num_key_value_heads=2,
            vocab_size=1024, max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False)
TINY_LAYERS = 4


# ---------------------------------------------------------------- the model, built layer by layer

class _Builds:
    """Seconds spent filling layers with random values, per layer index (left out of the timings)."""

    seconds: dict[int, float] = {}


def _lazy_to(self: nn.Module, *args, **kwargs):
    device = torch._C._nn._parse_to(*args, **kwargs)[0]
    on_meta = next(self.parameters()).is_meta
    if device is None or device.type == "meta" or not on_meta:
        return nn.Module.to(self, *args, **kwargs)  # to meta: the layer's memory is released
    started = time.perf_counter()
    self.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(1000 + self.lazy_index)
    with torch.no_grad():
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _Builds.seconds[self.lazy_index] = _Builds.seconds.get(self.lazy_index, 0.0) + time.perf_counter() - started
    return self


def lazy_random_model(layers: int, shape: dict, device: torch.device) -> LlamaForCausalLM:
    """A bf16 Llama whose decoder layers are made (random) when moved to a device, dropped when moved back."""
    config = LlamaConfig(num_hidden_layers=layers, **shape)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    gen = torch.Generator(device=device).manual_seed(0)
    embed = torch.randn(model.model.embed_tokens.weight.shape, device=device, dtype=torch.bfloat16, generator=gen)
    model.model.embed_tokens.weight = nn.Parameter((embed * 0.02).cpu(), requires_grad=False)
    model.model.norm.weight = nn.Parameter(torch.ones(shape["hidden_size"], dtype=torch.bfloat16), requires_grad=False)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its tables, on the CPU
    for index, layer in enumerate(model.model.layers):
        assert not list(layer.buffers()), "a decoder layer with buffers cannot be built lazily"
        layer.__class__ = type(f"Lazy{type(layer).__name__}", (type(layer),), {"to": _lazy_to})
        layer.lazy_index = index
    return model.eval().requires_grad_(False)  # lm_head stays on meta: the pipeline never runs it


# ---------------------------------------------------------------- one torchrun job (the worker)

class _Tally(dict):
    """Stands in for the pipeline's dict of quantized weights: counts them (and with ``check``
    fingerprints them) instead of keeping 70 GB of codes in host memory."""

    def __init__(self, check: bool):
        super().__init__()
        self.check, self.count, self.fingerprints = check, 0, {}

    def __setitem__(self, name, qweight):
        self.count += 1
        if self.check and qweight is not None:  # None: a rank that keeps names only
            digest = hashlib.sha1()
            for tensor in (qweight.codes, qweight.scales, qweight.zeros, qweight.g_idx):
                digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
            self.fingerprints[name] = digest.hexdigest()


def worker(args) -> None:
    from quantkit.models.adapters import get_adapter
    from quantkit.pipeline import driver, quantize_model
    from quantkit.pipeline.data_parallel import launch
    from quantkit.recipe import weight_quant_recipe

    shape, layers = (TINY, args.layers or TINY_LAYERS) if args.tiny else (LLAMA3_70B, args.layers or LAYERS_70B)
    ranks = launch("cpu" if args.tiny else "cuda")
    device = torch.device(ranks.device)
    if args.tiny:
        torch.set_num_threads(1)
    tally = _Tally(args.check)
    result_type = driver.PipelineResult
    driver.PipelineResult = lambda quantized, **kw: result_type(quantized=tally, **kw)

    t0 = time.perf_counter()
    model = lazy_random_model(layers, shape, device)
    build_s = time.perf_counter() - t0
    samples = torch.randint(0, shape["vocab_size"], (args.samples, args.seq_len),
                            generator=torch.Generator().manual_seed(0))  # the same list on every rank
    recipe = weight_quant_recipe("w4a16", group_size=128, method="gptq", symmetric=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        ranks.wait_for_main()  # a barrier across ranks (nothing when alone)

    with ranks.running():
        sync()
        start = time.perf_counter()
        result = quantize_model(model, get_adapter(model), recipe, device=device, samples=ranks.shard(samples),
                                batch_size=args.batch_size, data_parallel=ranks.group,
                                keep_quantized=ranks.is_main)  # as ``quantkit quantize``: rank 0 keeps them
        sync()
        seconds = time.perf_counter() - start
    layer_s = [r.seconds - _Builds.seconds.get(r.index, 0.0) for r in result.layers]
    fill_s = sum(_Builds.seconds.values())
    seconds -= fill_s
    peak = result.peak_device_bytes or 0
    if ranks.is_main:
        figures = {
            "gpus": ranks.world_size, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "backend": torch.distributed.get_backend() if ranks.group is not None else None,
            "torch": torch.__version__, "method": "gptq", "scheme": "w4a16 g128 sym",
            "model": (f"{'tiny' if args.tiny else 'Llama-3-70B'} shape (hidden {shape['hidden_size']}, MLP "
                      f"{shape['intermediate_size']}, {shape['num_attention_heads']}/{shape['num_key_value_heads']} heads), "
                      f"{layers} layers run, bf16, random"),
            "calibration": f"{args.samples} x {args.seq_len} tokens, {args.samples // ranks.world_size}+ per rank",
            "batch_size_per_rank": args.batch_size, "layers_run": layers,
            "seconds": round(seconds, 2), "capture_seconds": round(seconds - sum(layer_s), 2),
            "layer_seconds": [round(s, 3) for s in layer_s],
            "layer_fill_seconds_left_out": round(fill_s, 2), "model_build_seconds": round(build_s, 1),
            "peak_gpu_gib": round(peak / 2**30, 2), "quantized_linears": tally.count,
            "mean_layer_output_error": sum(r.output_error for r in result.layers) / len(result.layers),
        }
        full = TINY_LAYERS if args.tiny else LAYERS_70B
        if layers < full:
            later = layer_s[1:] or layer_s
            figures[f"extrapolated_{full}_layers_seconds"] = round(
                seconds + (full - layers) * sum(later) / len(later), 1)
        if args.check:
            figures["fingerprints"] = tally.fingerprints
        Path(args.out).write_text(json.dumps(figures, indent=2))
    ranks.close()


# ---------------------------------------------------------------- the driver: one job per GPU count

def run_all(args) -> None:
    counts = [int(n) for n in args.gpus.split(",")]
    available = os.cpu_count() if args.tiny else torch.cuda.device_count()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-multi-gpu-") as tmp:
        for n in counts:
            if n > available:
                print(f"skipping {n} GPU(s): this host has {available}", file=sys.stderr)
                continue
            out = Path(tmp) / f"gpus{n}.json"
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
                       __file__, "--worker", "--out", str(out), "--samples", str(args.samples), "--seq-len",
                       str(args.seq_len), "--batch-size", str(args.batch_size)]
            command += (["--layers", str(args.layers)] if args.layers else []) + (["--tiny"] if args.tiny else [])
            command += ["--check"] if args.check else []
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
            print(f"running on {n} {'process(es) (CPU, gloo)' if args.tiny else 'GPU(s)'}: {' '.join(command)}",
                  file=sys.stderr, flush=True)
            subprocess.run(command, env=env, check=True)
            results[n] = json.loads(out.read_text())
            print(json.dumps(results[n]), file=sys.stderr, flush=True)  # kept in the log if a later count is cut off
    report(results, args)


def report(results: dict[int, dict], args) -> None:
    if not results:
        raise SystemExit("nothing ran")
    first = results[min(results)]
    extrapolated = next((k for k in first if k.startswith("extrapolated_")), None)
    print(f"\nGPTQ W4 g128 sym, {first['model']}; {first['calibration'].split(',')[0]}; device {first['device']}, "
          f"torch {first['torch']}")
    header = f"| {'ranks (CPU)' if first['device'] == 'cpu' else 'GPUs'} | measured seconds | speed-up (measured) | per layer (after the first) |"
    if extrapolated:
        header += f" {extrapolated.split('_')[1]} layers, EXTRAPOLATED | speed-up (extrapolated) |"
    if args.check:
        header += " linears identical to the fewest-GPU run |"
    print(header)
    print("|" + " --- |" * header.count(" |"))
    base = first
    for n, r in sorted(results.items()):
        later = r["layer_seconds"][1:] or r["layer_seconds"]
        row = (f"| {n} | {r['seconds']:.1f} s | {base['seconds'] / r['seconds']:.2f}x | "
               f"{sum(later) / len(later):.2f} s |")
        if extrapolated:
            row += f" {r[extrapolated]:.0f} s | {base[extrapolated] / r[extrapolated]:.2f}x |"
        if args.check:
            same = sum(r["fingerprints"].get(k) == v for k, v in base["fingerprints"].items())
            row += f" {same} of {len(base['fingerprints'])} |"
        print(row)
    if extrapolated:
        print(f"\n'{extrapolated}' is an extrapolation from the {first['layers_run']} layers run, not a measurement.")
    if args.json:
        Path(args.json).write_text(json.dumps({str(n): r for n, r in results.items()}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", default="1,2,4", help="GPU counts to run, e.g. 1,2,4")
    ap.add_argument("--layers", type=int, default=None, help="run the first K layers only (80: the whole model)")
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4, help="calibration samples per forward pass, per rank")
    ap.add_argument("--check", action="store_true", help="compare every quantized linear with the one-GPU run")
    ap.add_argument("--tiny", action="store_true", help="dry run on the CPU: tiny shape, gloo, N processes")
    ap.add_argument("--json", default=None, help="write every run's figures here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
