"""One GPTQModel run: GPTQ on quantkit's calibration tokens, on the CPU, saved in the GPTQ layout.

What is evaluated is the checkpoint reloaded the way GPTQModel serves it, `GPTQModel.load` on the
CPU with its torch kernel (TorchLinear) in float32 (left alone it picks bfloat16 on the CPU). The
in-memory model after `quantize` is compared with it on a few windows, as a consistency check.
"""

from __future__ import annotations

import json
from pathlib import Path

import peer_common as common
from peer_runs import RunSpec

_COMPARE_WINDOWS = 2


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
    windows = common.first_eval_windows(tokenizer, _COMPARE_WINDOWS)
    in_memory_logits = _logits_or_error(model.model, windows)
    with phases.measure("save"):
        model.save(str(out_dir))
    del model
    with phases.measure("reload"):
        reloaded = GPTQModel.load(
            str(out_dir), device="cpu", backend=BACKEND.TORCH, dtype=torch.float32
        )
    reloaded.model.eval()
    perplexities = common.evaluate(reloaded.model, tokenizer, max_windows, phases)
    return {
        "evaluated": "GPTQModel.load(checkpoint, device='cpu', backend=BACKEND.TORCH, "
        "dtype=torch.float32).model",
        "perplexity": perplexities,
        "quantize_config": json.loads(json.dumps(config.to_dict(), default=str)),
        "saved_quantize_config": json.loads((out_dir / "quantize_config.json").read_text()),
        "reload_check": reload_check(reloaded.model, windows, in_memory_logits, out_dir),
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


def _logits_or_error(model, windows):
    try:
        return common.logits_on(model, windows)
    except Exception as error:  # the check reports any failure rather than ending the run
        return f"{type(error).__name__}: {error}"


def reload_check(reloaded, windows, in_memory_logits, out_dir: Path) -> dict:
    first_linear = reloaded.model.layers[0].self_attn.q_proj
    check = {
        "reloaded_linear_type": type(first_linear).__name__,
        "reloaded_dtype": str(next(reloaded.parameters()).dtype),
        "checkpoint_mb": common.directory_mb(out_dir),
        "windows_compared": len(windows),
    }
    if isinstance(in_memory_logits, str):
        return {**check, "in_memory_forward_error": in_memory_logits}
    logits = common.logits_on(reloaded, windows)
    return {**check, "max_abs_logit_diff_vs_in_memory": (logits - in_memory_logits).abs().max().item()}
