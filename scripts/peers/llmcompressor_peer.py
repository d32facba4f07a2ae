"""One llm-compressor run: `oneshot` with GPTQModifier, AWQModifier, SparseGPTModifier or
WandaPruningModifier on quantkit's calibration tokens.

What is evaluated is the model object `oneshot` returns (its linears fake-quantize their weights
through compressed-tensors in every forward). The compressed-tensors checkpoint it then saves is
reloaded through transformers and its logits compared with the in-memory model's, which says
whether the saved layout round-trips on the CPU.

llm-compressor 0.14.0.1's AWQModifier pins its cached activations (`IntermediatesCache.pin_memory`)
unconditionally, which raises "Cannot access accelerator device when none is available" on a
machine without one; pinning only speeds host-to-device copies, so without an accelerator it is
made a no-op here, and the run's record says so.
"""

from __future__ import annotations

import json
from pathlib import Path

import peer_common as common
from peer_runs import RunSpec

_COMPARE_WINDOWS = 2


def run(spec: RunSpec, out_dir: Path, max_windows: int | None, phases: common.Phases) -> dict:
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot

    with phases.measure("load"):
        tokenizer = common.load_tokenizer()
        model = common.load_float32_model()
    with phases.measure("calibration_samples"):
        ids = common.calibration_ids(tokenizer)
        dataset = Dataset.from_dict(
            {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
        )
    recipe = build_recipe(spec)
    workarounds = [] if torch.accelerator.is_available() else [skip_activation_pinning()]
    with phases.measure("quantize"):
        model = oneshot(
            model=model,
            processor=tokenizer,
            dataset=dataset,
            recipe=recipe,
            max_seq_length=ids.shape[1],
            num_calibration_samples=len(ids),
            shuffle_calibration_samples=False,
        )
    perplexities = common.evaluate(model, tokenizer, max_windows, phases)
    windows = common.first_eval_windows(tokenizer, _COMPARE_WINDOWS)
    in_memory_logits = common.logits_on(model, windows)
    with phases.measure("save"):
        model.save_pretrained(out_dir, save_compressed=True)
        tokenizer.save_pretrained(out_dir)
    return {
        "evaluated": "the in-memory model returned by oneshot (compressed-tensors fake-quantized "
        "linears, float32 activations)",
        "perplexity": perplexities,
        "recipe": [describe_modifier(modifier) for modifier in recipe],
        "workarounds": workarounds,
        "saved_quantization_config": saved_quantization_config(out_dir),
        "reload_check": reload_check(out_dir, windows, in_memory_logits, phases),
    }


def build_recipe(spec: RunSpec) -> list:
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier

    if spec.method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return [SparseGPTModifier(ignore=["re:.*lm_head"], **spec.options)]
    if spec.method == "wanda":
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return [WandaPruningModifier(ignore=["re:.*lm_head"], **spec.options)]
    scheme = weight_scheme(spec)
    if spec.method == "gptq":
        return [GPTQModifier(ignore=["lm_head"], **scheme, **spec.options)]
    if spec.method == "awq":
        return [AWQModifier(**spec.options), QuantizationModifier(ignore=["lm_head"], **scheme)]
    raise ValueError(f"llm-compressor run {spec.name!r}: unknown method {spec.method!r}")


def skip_activation_pinning() -> str:
    from llmcompressor.pipelines.cache import IntermediatesCache

    def pin_memory(self, batch_index: int, input_names: list[str] | None = None) -> None:
        return None

    IntermediatesCache.pin_memory = pin_memory
    return "IntermediatesCache.pin_memory made a no-op (no accelerator to pin memory for)"


def weight_scheme(spec: RunSpec) -> dict:
    """Keyword arguments naming the weight scheme: a preset name, or one explicit config group."""
    if spec.preset is not None:
        return {"scheme": spec.preset, "targets": ["Linear"]}
    weights = {
        "num_bits": spec.bits,
        "type": "int",
        "symmetric": spec.symmetric,
        "strategy": "channel" if spec.group_size is None else "group",
    }
    if spec.group_size is not None:
        weights["group_size"] = spec.group_size
    return {"config_groups": {"group_0": {"targets": ["Linear"], "weights": weights}}}


def describe_modifier(modifier) -> dict:
    """The modifier's settings as it resolved them (its defaults included), JSON-safe."""
    fields = modifier.model_dump(exclude_none=False)
    return {"modifier": type(modifier).__name__, **json.loads(json.dumps(fields, default=str))}


def saved_quantization_config(out_dir: Path) -> dict | None:
    config = json.loads((out_dir / "config.json").read_text())
    return config.get("quantization_config")


def reload_check(out_dir: Path, windows, in_memory_logits, phases: common.Phases) -> dict:
    """Reload the compressed checkpoint with transformers on the CPU; compare its logits."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with phases.measure("reload"):
            reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
        logits = common.logits_on(reloaded, windows)
    except Exception as error:  # noqa: BLE001 - the check reports any failure, the run goes on
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}
    first_linear = reloaded.model.layers[0].self_attn.q_proj
    return {
        "ok": True,
        "windows_compared": len(windows),
        "max_abs_logit_diff": (logits - in_memory_logits).abs().max().item(),
        "reloaded_linear_type": type(first_linear).__name__,
        "reloaded_linear_tensors": sorted(name for name, _ in first_linear.named_parameters()),
        "checkpoint_mb": common.directory_mb(out_dir),
    }
