"""One GPTQModel run: GPTQ on quantkit's calibration tokens, on the CPU, saved in the GPTQ layout.

The checkpoint is reloaded the way GPTQModel serves it, `GPTQModel.load` on the CPU with its torch
kernel (TorchLinear): the model object `quantize` leaves behind is not usable, since with GPTQModel's
default offload_to_disk=True its packed weights and the embedding are left on the meta device
(its logits come out as garbage). That kernel accepts only float16 or bfloat16 (it refuses float32), so two
figures are kept:

* `perplexity`: the peer's quantized weights (TorchLinear.dequantize_weight of the reloaded
  checkpoint) copied into a float32 copy of the target and evaluated in float32, exactly like the
  llm-compressor and quantkit figures: this compares the algorithms, not the runtimes;
* `peer_runtime`: the reloaded GPTQModel model itself (float16 activations, TorchLinear) on the
  first few WikiText-2 windows, beside the float32 figure on the same windows. That kernel is
  ~10x slower than a dense float32 forward on this CPU, so it is not run over every window.
"""

from __future__ import annotations

import json
from pathlib import Path

import peer_common as common
from peer_runs import RunSpec

_COMPARE_WINDOWS = 2
_RUNTIME_WINDOWS = 16


def run(spec: RunSpec, out_dir: Path, max_windows: int | None, phases: common.Phases) -> dict:
    import torch
    from gptqmodel import BACKEND, GPTQModel

    config = quantize_config(spec)
    with phases.measure("load"):
        tokenizer = common.load_tokenizer()
        model = GPTQModel.load(str(common.TARGET), config, device="cpu", dtype=torch.float32)
    with phases.measure("calibration_samples"):
        ids = common.calibration_ids(tokenizer)
        calibration = [
            {"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in ids
        ]
    with phases.measure("quantize"):
        model.quantize(calibration, batch_size=1, backend=BACKEND.TORCH)
    in_memory = meta_tensor_count(model.model)
    with phases.measure("save"):
        model.save(str(out_dir))
    del model
    with phases.measure("reload"):
        reloaded = GPTQModel.load(
            str(out_dir), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16
        )
    reloaded.model.eval()
    with phases.measure("dequantize_to_float32"):
        dense, replaced = float32_copy_with_weights_of(reloaded.model)
    return {
        "evaluated": "perplexity: TorchLinear.dequantize_weight() of the checkpoint reloaded by "
        "GPTQModel.load(device='cpu', backend=BACKEND.TORCH), copied into the float32 target "
        f"({replaced} linears); peer_runtime: that GPTQModel model itself "
        "(float16, TorchLinear; the kernel refuses float32) on the first WikiText-2 windows",
        "perplexity": common.evaluate(dense, tokenizer, max_windows, phases),
        "peer_runtime": runtime_comparison(reloaded.model, dense, tokenizer, max_windows, phases),
        "workarounds": [
            (
                "GPTQMODEL_CPU_WORKERS=2: on 2 cores GPTQModel 7.6.0's default CPU pool (1 worker)"
                " is smaller than the 2-worker loader pool it asks for, so quantize() raises"
            )
        ],
        "quantize_config": json.loads(json.dumps(config.to_dict(), default=str)),
        "saved_quantize_config": json.loads((out_dir / "quantize_config.json").read_text()),
        "in_memory_after_quantize": in_memory,
        "reload_check": reload_check(reloaded.model, dense, tokenizer, out_dir),
    }


def quantize_config(spec: RunSpec):
    from gptqmodel import QuantizeConfig

    if spec.method != "gptq":
        raise ValueError(f"GPTQModel run {spec.name!r}: only gptq is wired here, not {spec.method!r}")
    return QuantizeConfig(
        bits=spec.bits,
        group_size=-1 if spec.group_size is None else spec.group_size,
        sym=spec.symmetric,
        **spec.options,
    )


def float32_copy_with_weights_of(quantized) -> tuple[object, int]:
    """The float32 target with every quantized linear's weight replaced by its dequantized value."""
    import torch
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    dense = common.load_float32_model()
    dense_modules = dict(dense.named_modules())
    replaced = 0
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if not isinstance(module, TorchLinear):
                continue
            target = dense_modules[name]
            weight = module.dequantize_weight().T.to(torch.float32)  # (in, out) -> (out, in)
            if weight.shape != target.weight.shape:
                raise ValueError(f"{name}: dequantized {tuple(weight.shape)} "
                                 f"!= linear {tuple(target.weight.shape)}")
            target.weight.copy_(weight)
            replaced += 1
    return dense, replaced


def runtime_comparison(reloaded, dense, tokenizer, max_windows, phases: common.Phases) -> dict:
    """WikiText-2 perplexity of the peer's runtime and of the float32 copy on the same windows."""
    from quantkit.data import evaluation_text
    from quantkit.eval.perplexity import perplexity

    count = _RUNTIME_WINDOWS if max_windows is None else min(max_windows, _RUNTIME_WINDOWS)
    text = evaluation_text("wikitext2")
    results = {}
    for label, model in (("gptqmodel_float16", reloaded), ("dequantized_float32", dense)):
        with phases.measure(f"runtime_check_{label}"):
            result = perplexity(model, tokenizer, text, seq_len=common.EVAL_SEQ_LEN,
                                max_windows=count, progress=False, dataset="wikitext2")
        results[label] = result.to_dict()
    return results


def meta_tensor_count(model) -> dict:
    """How much of the model object left by quantize() has no data (lives on the meta device)."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    on_meta = [name for name, tensor in tensors if tensor.is_meta]
    return {"tensors": len(tensors), "on_meta_device": len(on_meta), "examples": on_meta[:3]}


def reload_check(reloaded, dense, tokenizer, out_dir: Path) -> dict:
    """The reloaded runtime model against its float32 dequantized copy, on a few windows."""
    windows = common.first_eval_windows(tokenizer, _COMPARE_WINDOWS)
    first_linear = reloaded.model.layers[0].self_attn.q_proj
    diff = (common.logits_on(reloaded, windows) - common.logits_on(dense, windows)).abs().max()
    return {
        "ok": True,
        "reloaded_linear_type": type(first_linear).__name__,
        "reloaded_dtype": str(next(reloaded.parameters()).dtype),
        "checkpoint_mb": common.directory_mb(out_dir),
        "windows_compared": len(windows),
        "max_abs_logit_diff_runtime_fp16_vs_dequantized_fp32": diff.item(),
    }
