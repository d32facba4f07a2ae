"""What FP8 fast accumulation (``torch._scaled_mm(..., use_fast_accum=True)``) costs in accuracy.

On the GPU (default), two measurements, each with fast accumulation on and off:

* the GEMM error at the Llama-3-8B linear shapes (K = 4,096 and 14,336; 2,048 rows of random
  activations with an outlier channel, bf16): relative error (Frobenius norm) of quantkit's FP8
  linear against its exact reference (the same e4m3 codes, products summed in float32), the mean
  signed change of the output magnitudes (negative: outputs shrink), and the error against the
  unquantized float product, next to what e4m3 rounding alone costs;
* the perplexity of the bundled target quantized with ``recipes/fp8-dynamic.yaml``, evaluated on
  the GPU in bf16 (WikiText-2 test and held-out Wikipedia, windows of 512), with top-1 agreement and
  KL against the float model. (Its linears have K <= 768, far shorter than an 8B model's, so the
  GEMM error above is the figure that speaks for large models.)

With ``--emulate`` (CPU, no GPU needed): the same GEMM error with Hopper's FP8 accumulator emulated
— float32 sums of each 32-deep MMA step added into an accumulator that keeps 13 mantissa bits
(FP22), truncated or rounded to nearest — against float32 promotion.

    python scripts/gpu/check_fp8_fast_accum.py --out fp8_fast_accum.json [--max-windows N]
    python scripts/gpu/check_fp8_fast_accum.py --emulate --out scripts/results/fp8_fast_accum_emulation.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from quantkit.kernels.w8a8 import pack_w8a8_weights
from quantkit.quant.w8a8 import quantize_activation, quantize_weight

SHAPES = {"q/o_proj 4096x4096": (4096, 4096), "down_proj 14336x4096": (14336, 4096)}
DATASETS = ("wikitext2", "wikipedia-heldout")
RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "fp8-dynamic.yaml"


def operands(m: int, k: int, n: int, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen)
    x[:, 3] *= 20  # an outlier channel
    w = torch.randn(n, k, generator=gen) / k**0.5
    record = quantize_weight(w, "float", "channel", "dynamic")
    packed = pack_w8a8_weights([record.weight], [record.weight_scale], [None], "float", "dynamic", device)
    return x.to(device, dtype), w.to(device), packed


def errors(got: torch.Tensor, exact: torch.Tensor, unquantized: torch.Tensor) -> dict:
    got, exact, unquantized = got.double(), exact.double(), unquantized.double()
    return {
        "relative_error_vs_exact_fp8": float((got - exact).norm() / exact.norm()),
        "mean_signed_magnitude_change": float(((got - exact) * exact.sign()).mean() / exact.abs().mean()),
        "relative_error_vs_unquantized": float((got - unquantized).norm() / unquantized.norm()),
    }


def gemm_errors_gpu(m: int = 2048) -> list[dict]:
    from quantkit.kernels.fp8_linear import fp8_linear_reference, fp8_linear_scaled_mm

    rows = []
    for name, (k, n) in SHAPES.items():
        x, w, packed = operands(m, k, n, "cuda", torch.bfloat16)
        exact = fp8_linear_reference(x.float(), packed)  # float32 sums of the exact e4m3 products
        unquantized = x.float() @ w.t()
        row = {"shape": name, "M": m, "K": k, "N": n,
               "exact_fp8_vs_unquantized": float((exact - unquantized).norm() / unquantized.norm())}
        for fast in (False, True):
            got = fp8_linear_scaled_mm(x, packed, use_fast_accum=fast)
            row["fast_accum" if fast else "fp32_promotion"] = errors(got.float(), exact, unquantized)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _keep_mantissa(t: torch.Tensor, bits: int, mode: str) -> torch.Tensor:
    mantissa, exponent = torch.frexp(t)  # t = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    scale = 2.0 ** (bits + 1)
    mantissa = (torch.trunc if mode == "truncate" else torch.round)(mantissa * scale) / scale
    return torch.ldexp(mantissa, exponent)


def emulated_sums(xq: torch.Tensor, wq: torch.Tensor, mode: str, step: int = 32, bits: int = 13) -> torch.Tensor:
    """(M, N) sums with each ``step``-deep partial product added into a ``bits``-mantissa accumulator."""
    a, b = xq.to(torch.float64), wq.to(torch.float64)
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for k0 in range(0, a.shape[1], step):
        acc = _keep_mantissa(acc + a[:, k0:k0 + step] @ b[:, k0:k0 + step].t(), bits, mode)
    return acc


def gemm_errors_emulated(m: int = 64, n: int = 256) -> list[dict]:
    rows = []
    for name, (k, _) in SHAPES.items():
        x, w, packed = operands(m, k, n, "cpu", torch.float32)
        xq, x_scale = quantize_activation(x, "float")
        scales = x_scale.double() * packed.weight_scale.double().reshape(1, -1)
        exact = (xq.double() @ packed.weight.double().t()) * scales
        unquantized = x.double() @ w.double().t()
        row = {"shape": name, "M": m, "K": k, "N": n, "accumulator": "13 mantissa bits after each 32-deep step",
               "exact_fp8_vs_unquantized": float((exact - unquantized).norm() / unquantized.norm())}
        promoted = (xq.float() @ packed.weight.float().t()).double() * scales
        row["fp32_promotion"] = errors(promoted, exact, unquantized)
        for mode in ("truncate", "nearest"):
            row[f"fast_accum_{mode}"] = errors(emulated_sums(xq, packed.weight, mode) * scales, exact, unquantized)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def perplexities_gpu(max_windows: int | None) -> dict:
    from quantkit.compress import compress
    from quantkit.eval.evaluate import evaluate_pair
    from quantkit.recipe import load_recipe

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fp8-dynamic"
        compress(None, load_recipe(RECIPE), out, overwrite=True)
        for fast in ("0", "1"):
            os.environ["QUANTKIT_FP8_FAST_ACCUM"] = fast  # read at every FP8 GEMM
            result, base = evaluate_pair(str(out), "quantkit-target", datasets=DATASETS, max_windows=max_windows,
                                         device="cuda", dtype="bfloat16", progress=False)
            label = "fast_accum" if fast == "1" else "fp32_promotion"
            results["float_bf16"] = {name: base.perplexity[name].perplexity for name in DATASETS}
            results[label] = {name: {"ppl": result.perplexity[name].perplexity,
                                     "top1_agreement": result.extra["agreement"][name]["top1_agreement"],
                                     "mean_kl": result.extra["agreement"][name]["mean_kl"]} for name in DATASETS}
            print(label, json.dumps(results[label]), flush=True)
    os.environ.pop("QUANTKIT_FP8_FAST_ACCUM", None)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--emulate", action="store_true", help="CPU emulation of the FP22 accumulator instead")
    ap.add_argument("--max-windows", type=int, default=None, help="windows of 512 tokens per text (default: all)")
    args = ap.parse_args()
    if args.emulate:
        payload = {"device": "cpu (emulation)", "gemm": gemm_errors_emulated()}
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: use --emulate for the CPU emulation")
        payload = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gemm": gemm_errors_gpu(),
                   "perplexity_bundled_target_fp8_dynamic": perplexities_gpu(args.max_windows)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
