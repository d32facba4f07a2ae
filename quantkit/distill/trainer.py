"""Knowledge distillation: train a student to predict like a teacher, then write it as a checkpoint.

The student is a pruned copy of the teacher (its zeros stay zeros: ``distill/masks.py``), a
quantization-aware copy (``qat_scheme``: ``distill/qat.py``), or any smaller model with the same
tokenizer. Each step draws ``batch_size`` windows of ``seq_len`` tokens at random offsets of the
training text (the offsets depend only on the seed, the step and the micro-batch, so a resumed
run sees exactly the batches the uninterrupted run would have seen), runs the teacher without
gradients and the student with them, and minimises

    kl_weight * T² KL(p_teacher/T || p_student/T) + hidden_weight * hidden-state MSE + lm_weight * CE

with AdamW (linear warm-up, then cosine decay to ``lr * min_lr_ratio``). ``accelerate`` places
the models and runs mixed precision (``bf16``/``fp16`` autocast, float32 master weights); under
``accelerate launch`` each process takes its own batches and the gradients are averaged.

Checkpoints (every ``save_every`` steps and at the end) hold the student's weights (safetensors),
the optimizer state (``torch.save``, read back with ``weights_only=True``) and the trainer state
(JSON); ``resume=True`` continues from the latest one and checks that the settings that shape
training are unchanged. With ``max_minutes`` and no ``max_steps`` the run sizes itself: after
the warm-up it measures its step time and fixes the number of steps that fit the budget (stored
in the checkpoint, so a resumed run keeps it). ``deadline`` (a ``time.monotonic()`` moment) also
bounds a run from outside, for a job with a hard wall-clock limit: training stops at the first
step boundary past it, and a run that sizes itself sizes itself to whichever ends first.

The report gives the student's perplexity before and after (the written checkpoint, reloaded),
the teacher's, and the share of the student's perplexity gap to the teacher that was recovered.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.distill.config import DistillConfig
from quantkit.distill.losses import (
    default_layer_map,
    hidden_state_loss,
    kl_distillation_loss,
    language_model_loss,
)
from quantkit.distill.masks import FixedMasks
from quantkit.errors import QuantkitError

CHECKPOINT = "latest"
STATE_FILE, WEIGHTS_FILE, OPTIMIZER_FILE = "trainer_state.json", "student.safetensors", "optimizer.pt"
REPORT_FILE = "distill_report.json"
SIZING_STEPS = 5  # with a time budget and no max_steps: steps timed before the run sizes itself


@dataclass
class StepLog:
    step: int  # steps done
    total_steps: int | None  # None until a time-budgeted run has sized itself
    loss: float
    parts: dict[str, float]
    lr: float
    tokens: int  # tokens trained on so far (all processes)
    tokens_per_second: float  # over the last step
    elapsed: float  # training seconds so far (resumed runs included)


@dataclass
class _State:
    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0
    total_steps: int | None = None
    history: list[dict] = field(default_factory=list)
    before: dict[str, float] = field(default_factory=dict)
    teacher: dict[str, float] = field(default_factory=dict)


class _Student(nn.Module):
    """The student and, for hidden-state matching across widths, its learned projections."""

    def __init__(self, model: nn.Module, projections: nn.ModuleList | None) -> None:
        super().__init__()
        self.model = model
        self.projections = projections

    def forward(self, ids: torch.Tensor, hidden: bool):
        return self.model(input_ids=ids, output_hidden_states=hidden, use_cache=False)


Callback = Callable[[str, Any], None]


def distill(teacher: str | None, student: str, output: str | Path, config: DistillConfig, *, device: str = "cpu",
            overwrite: bool = False, resume: bool = False, checkpoint_dir: str | Path | None = None,
            callback: Callback | None = None, deadline: float | None = None) -> dict:
    """Distill ``teacher`` into ``student`` and write the trained student to ``output``.

    ``callback(kind, payload)`` receives ``("phase", text)``, ``("start", (first_step, total_steps))``,
    ``("sized", total_steps)`` and ``("step", StepLog)``. Returns the report (also written to
    ``output/distill_report.json``).
    """
    from accelerate import Accelerator

    from quantkit.formats.atomic import check_output_dir

    notify = callback or (lambda kind, payload: None)
    output = Path(output)
    check_output_dir(output, overwrite)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else output.with_name(output.name + ".distill")
    latest = checkpoint_dir / CHECKPOINT
    if resume and not (latest / STATE_FILE).is_file():
        raise QuantkitError(f"--resume: no distillation checkpoint in '{checkpoint_dir}'")
    started = time.perf_counter()
    accelerator = Accelerator(cpu=_check_device(device) == "cpu", mixed_precision=config.mixed_precision)
    run_device = accelerator.device

    notify("phase", "loading models")
    teacher_loaded, student_loaded = _load_pair(teacher, student)
    tokenizer = student_loaded.tokenizer
    model = student_loaded.model
    masks, targets = _fixed_masks(student_loaded, config)
    scheme = None
    if config.qat_scheme is not None:
        from quantkit.distill.qat import add_fake_quantization, trained_parameter
        from quantkit.quant.scheme import parse_scheme

        scheme = parse_scheme(config.qat_scheme, group_size=config.qat_group_size)
        add_fake_quantization(model, targets, scheme)
        if masks is not None:  # the masked parameter is now the raw weight under the parametrization
            masks = FixedMasks({name: (trained_parameter(model.get_submodule(name)), mask)
                                for name, (_param, mask) in masks.pairs.items()})
    layer_map, projections = _hidden_matching(teacher_loaded.model, model, config)
    wrapper = _Student(model, projections)
    wrapper.to(run_device)
    teacher_model = teacher_loaded.model.to(run_device).eval()
    stream = _training_stream(tokenizer, config)

    state = _State()
    if resume:
        state = _read_state(latest, teacher_loaded.path, student_loaded.path, config)
        _load_weights(wrapper, latest / WEIGHTS_FILE)
    if masks is not None:
        masks.attach()
        masks.apply()
    optimizer = torch.optim.AdamW([p for p in wrapper.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    if resume:
        optimizer.load_state_dict(torch.load(latest / OPTIMIZER_FILE, map_location=run_device, weights_only=True))
    wrapper, optimizer = accelerator.prepare(wrapper, optimizer)

    eval_options = dict(datasets=config.eval_datasets, windows=config.eval_windows, device=run_device)
    if not resume:
        notify("phase", "evaluating the teacher and the student before training")
        state.teacher = _perplexities(teacher_model, tokenizer, **eval_options)
        state.before = _perplexities(accelerator.unwrap_model(wrapper).model, tokenizer, **eval_options)

    if config.max_steps is not None:
        state.total_steps = config.max_steps
    notify("start", (state.step, state.total_steps))
    need_hidden = config.hidden_weight > 0
    step_times: list[float] = []
    wrapper.train()
    while not _finished(state, config, deadline):
        tick = time.perf_counter()
        lr = learning_rate(state.step, config, state.total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        parts = {"kl": 0.0, "hidden": 0.0, "lm": 0.0}
        total = 0.0
        for micro in range(config.grad_accum):
            ids = training_batch(stream, config, state.step, micro, accelerator.process_index).to(run_device)
            sync = accelerator.no_sync(wrapper) if micro < config.grad_accum - 1 else nullcontext()
            with sync:
                loss, values = _loss(wrapper, teacher_model, ids, config, layer_map, need_hidden, accelerator)
                accelerator.backward(loss / config.grad_accum)
            total += loss.item() / config.grad_accum
            for key, value in values.items():
                parts[key] += value / config.grad_accum
        if config.max_grad_norm > 0:
            accelerator.clip_grad_norm_(wrapper.parameters(), config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if masks is not None:
            masks.apply()
        seconds = time.perf_counter() - tick
        state.step += 1
        step_tokens = config.tokens_per_step * accelerator.num_processes
        state.tokens += step_tokens
        state.train_seconds += seconds
        step_times.append(seconds)
        if state.total_steps is None and state.step >= max(config.warmup_steps, SIZING_STEPS):
            state.total_steps = _size_run(state, config, step_times, deadline)
            notify("sized", state.total_steps)
        log = StepLog(state.step, state.total_steps, total, parts, lr, state.tokens, step_tokens / seconds,
                      state.train_seconds)
        if state.step % max(1, config.save_every // 10) == 0 or state.step == 1:
            state.history.append({"step": state.step, "loss": round(total, 5),
                                  **{k: round(v, 5) for k, v in parts.items()}, "lr": lr})
        notify("step", log)
        if state.step % config.save_every == 0 and not _finished(state, config, deadline):
            _save_checkpoint(accelerator, wrapper, optimizer, state, checkpoint_dir, teacher_loaded.path,
                             student_loaded.path, config)
    _save_checkpoint(accelerator, wrapper, optimizer, state, checkpoint_dir, teacher_loaded.path, student_loaded.path,
                     config)

    notify("phase", "writing the student")
    student_model = accelerator.unwrap_model(wrapper).model
    if masks is not None:
        masks.detach()
        if masks.violations():
            raise RuntimeError(f"{masks.violations()} pruned weights are no longer zero after training")
    report = None
    if accelerator.is_main_process:
        _write_student(student_model, tokenizer, student_loaded.path, output, targets, scheme, overwrite, config)
        notify("phase", "evaluating the student after training")
        after = _perplexities(_reload(output, run_device), tokenizer, **eval_options)
        report = _report(teacher_loaded.path, student_loaded.path, output, config, state, after, masks, scheme,
                         accelerator, run_device, time.perf_counter() - started)
        (output / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return report


# ---------------------------------------------------------------- pieces


def learning_rate(step: int, config: DistillConfig, total_steps: int | None) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine to ``lr * min_lr_ratio`` at ``total_steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.schedule == "constant" or total_steps is None:
        return config.lr
    progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def training_batch(stream: torch.Tensor, config: DistillConfig, step: int, micro: int, rank: int) -> torch.Tensor:
    """(batch_size, seq_len) windows at offsets drawn from (seed, step, micro-batch, process) alone."""
    seed = ((config.seed * 1_000_003 + step) * 1_009 + micro) * 101 + rank
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - config.seq_len + 1, (config.batch_size,), generator=generator)
    return stream[starts.unsqueeze(1) + torch.arange(config.seq_len)]


def _loss(wrapper, teacher, ids, config: DistillConfig, layer_map, need_hidden: bool, accelerator):
    with torch.no_grad(), accelerator.autocast():
        taught = teacher(input_ids=ids, output_hidden_states=need_hidden, use_cache=False)
    with accelerator.autocast():
        out = wrapper(ids, need_hidden)
    loss = torch.zeros((), device=ids.device)
    values = {}
    if config.kl_weight > 0:
        kl = kl_distillation_loss(out.logits, taught.logits, config.temperature)
        loss = loss + config.kl_weight * kl
        values["kl"] = kl.item()
    if config.hidden_weight > 0:
        projections = accelerator.unwrap_model(wrapper).projections
        hidden = hidden_state_loss(out.hidden_states, taught.hidden_states, layer_map, projections)
        loss = loss + config.hidden_weight * hidden
        values["hidden"] = hidden.item()
    if config.lm_weight > 0:
        lm = language_model_loss(out.logits, ids)
        loss = loss + config.lm_weight * lm
        values["lm"] = lm.item()
    return loss, values


def _finished(state: _State, config: DistillConfig, deadline: float | None = None) -> bool:
    if state.total_steps is not None and state.step >= state.total_steps:
        return True
    if deadline is not None and time.monotonic() >= deadline:
        return True
    return config.max_minutes is not None and state.train_seconds >= config.max_minutes * 60


def _size_run(state: _State, config: DistillConfig, step_times: list[float], deadline: float | None = None) -> int:
    timed = step_times[1:] or step_times  # the first step pays for warming up
    per_step = sum(timed) / len(timed)
    remaining = config.max_minutes * 60 - state.train_seconds
    if deadline is not None:
        remaining = min(remaining, deadline - time.monotonic())
    return state.step + max(0, int(remaining / per_step))


def _check_device(device: str) -> str:
    try:
        target = torch.device(device)
    except RuntimeError:
        raise QuantkitError(f"unknown device '{device}': use cpu, cuda or cuda:N") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise QuantkitError(f"device '{device}' was asked for but no CUDA GPU is available")
        if target.index is not None:
            torch.cuda.set_device(target.index)
        return "cuda"
    if target.type != "cpu":
        raise QuantkitError(f"distillation runs on cpu or cuda, not '{device}'")
    return "cpu"


def _load_pair(teacher: str | None, student: str):
    from quantkit.models.loading import load_model

    # float32 like the student: mixed precision comes from autocast, and the report compares the
    # teacher's and the student's perplexity computed alike
    teacher_loaded = load_model(teacher, dtype="float32", device="cpu")
    student_loaded = load_model(student, dtype="float32", device="cpu")
    if student_loaded.quantization_config is not None:
        method = student_loaded.quantization_config.get("quant_method", "?")
        raise QuantkitError(f"the student '{student_loaded.path}' is a quantized ({method}) checkpoint, whose packed "
                            "weights do not train; start from its float source and pass --qat SCHEME to train it "
                            "quantization-aware")
    if student_loaded.tokenizer is None:
        raise QuantkitError(f"the student '{student_loaded.path}' has no tokenizer files")
    _check_same_tokenizer(teacher_loaded, student_loaded)
    student_loaded.model.requires_grad_(True)
    return teacher_loaded, student_loaded


def _check_same_tokenizer(teacher, student) -> None:
    t_vocab, s_vocab = teacher.model.config.vocab_size, student.model.config.vocab_size
    same = t_vocab == s_vocab
    if same and teacher.tokenizer is not None:
        same = teacher.tokenizer.get_vocab() == student.tokenizer.get_vocab()
    if not same:
        raise QuantkitError(f"the teacher '{teacher.path}' and the student '{student.path}' do not share a tokenizer "
                            f"(vocabularies of {t_vocab} and {s_vocab} tokens{' that differ' if t_vocab == s_vocab else ''}); "
                            "distillation compares their next-token distributions token by token")


def _fixed_masks(loaded, config: DistillConfig) -> tuple[FixedMasks | None, list[str]]:
    """Masks of a pruned student (its config records sparsity), and the decoder linears (QAT targets)."""
    from quantkit.quant.scheme import QuantScheme
    from quantkit.sparsity.checkpoint import read_sparsity_config
    from quantkit.sparsity.targets import decoder_linears

    entry = read_sparsity_config(loaded.model.config)
    ignore = tuple(entry.get("ignore") or ()) if entry else ()
    scheme = QuantScheme(ignore=ignore or ("lm_head",))
    names = [name for name, _index, _module in decoder_linears(loaded.model, loaded.adapter, scheme)]
    if entry is None:
        return None, names
    from quantkit.distill.qat import trained_parameter

    return FixedMasks.of(loaded.model, names, trained_parameter), names


def _hidden_matching(teacher: nn.Module, student: nn.Module, config: DistillConfig):
    if config.hidden_weight == 0:
        return (), None
    t_layers, s_layers = teacher.config.num_hidden_layers, student.config.num_hidden_layers
    layer_map = config.layer_map or default_layer_map(s_layers, t_layers)
    for s_index, t_index in layer_map:
        if s_index >= s_layers or t_index >= t_layers:
            raise QuantkitError(f"layer_map: pair ({s_index}, {t_index}) is outside the student's {s_layers} or the "
                                f"teacher's {t_layers} layers")
    t_width, s_width = teacher.config.hidden_size, student.config.hidden_size
    if t_width == s_width:
        return layer_map, None
    torch.manual_seed(config.seed)
    return layer_map, nn.ModuleList([nn.Linear(s_width, t_width, bias=False) for _ in layer_map])


def _training_stream(tokenizer, config: DistillConfig) -> torch.Tensor:
    from quantkit.data import load_texts
    from quantkit.data.samples import token_stream

    texts = [text for source in config.dataset for text in load_texts(source, purpose="calibration",
                                                                     text_field=config.text_field)]
    stream = token_stream(tokenizer, texts)
    if len(stream) < config.seq_len + 1:
        raise QuantkitError(f"the training text has {len(stream):,} tokens, fewer than one window of {config.seq_len}")
    return stream


@torch.no_grad()
def _perplexities(model, tokenizer, *, datasets, windows, device) -> dict[str, float]:
    from quantkit.data import evaluation_text
    from quantkit.eval.perplexity import perplexity

    was_training = model.training
    try:
        return {name: perplexity(model, tokenizer, evaluation_text(name), seq_len=512, max_windows=windows,
                                 device=device, progress=False, dataset=name).perplexity for name in datasets}
    finally:
        model.train(was_training)


def _reload(output: Path, device: torch.device):
    from quantkit.models.loading import load_model

    return load_model(str(output), dtype="float32", device="cpu").model.to(device)


def _write_student(model, tokenizer, source: str, output: Path, targets: list[str], scheme, overwrite: bool,
                   config: DistillConfig) -> None:
    from quantkit.sparsity.checkpoint import save_dense_checkpoint, storage_dtype

    model.eval()
    if scheme is None:
        save_dense_checkpoint(model, tokenizer, output, dtype=storage_dtype(source), overwrite=overwrite)
        return
    from quantkit.distill.qat import quantized_weights, remove_fake_quantization
    from quantkit.formats import save_checkpoint

    remove_fake_quantization(model, targets)
    quantized = quantized_weights(model, targets, scheme)
    save_checkpoint("gptq", model, tokenizer, quantized, scheme, output, overwrite=overwrite,
                    algorithm_config={"method": "rtn", "trained": "quantization-aware distillation",
                                      "qat_scheme": config.qat_scheme})


def _report(teacher, student, output, config, state: _State, after, masks, scheme, accelerator, device, seconds) -> dict:
    perplexity = {}
    for name, value in after.items():
        before, reference = state.before[name], state.teacher[name]
        gap = before - reference
        perplexity[name] = {"teacher": reference, "student_before": before, "student_after": value,
                            "recovered_fraction": (before - value) / gap if gap > 0 else None}
    return {
        "teacher": teacher, "student": student, "output": str(output), "device": str(device),
        "processes": accelerator.num_processes, "mixed_precision": config.mixed_precision,
        "threads": torch.get_num_threads(), "steps": state.step, "tokens": state.tokens,
        "train_seconds": round(state.train_seconds, 2), "total_seconds": round(seconds, 2),
        "tokens_per_second": round(state.tokens / max(state.train_seconds, 1e-9), 1),
        "perplexity": perplexity, "eval_windows_of_512": config.eval_windows,
        "mask": None if masks is None else {"linears": len(masks), "sparsity": masks.sparsity,
                                            "violations": masks.violations()},
        "qat_scheme": None if scheme is None else scheme.name,
        "config": config.to_dict(), "history": state.history,
    }


# ---------------------------------------------------------------- checkpoints


def _save_checkpoint(accelerator, wrapper, optimizer, state: _State, folder: Path, teacher: str, student: str,
                     config: DistillConfig) -> None:
    """Write the checkpoint next to the old one, then swap it in: a crash leaves one whole checkpoint."""
    from safetensors.torch import save_model

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".partial-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        save_model(accelerator.unwrap_model(wrapper), str(staging / WEIGHTS_FILE))
        torch.save(optimizer.state_dict(), staging / OPTIMIZER_FILE)
        payload = {"step": state.step, "tokens": state.tokens, "train_seconds": state.train_seconds,
                   "total_steps": state.total_steps, "history": state.history, "before": state.before,
                   "teacher_perplexity": state.teacher, "teacher": teacher, "student": student,
                   "fingerprint": config.fingerprint()}
        (staging / STATE_FILE).write_text(json.dumps(payload, indent=2) + "\n")
        latest = folder / CHECKPOINT
        retired = folder / f".old-{uuid.uuid4().hex[:8]}"
        if latest.exists():
            os.rename(latest, retired)
        os.rename(staging, latest)
        shutil.rmtree(retired, ignore_errors=True)
    accelerator.wait_for_everyone()


def _read_state(latest: Path, teacher: str, student: str, config: DistillConfig) -> _State:
    data = json.loads((latest / STATE_FILE).read_text())
    saved = data["fingerprint"]
    now = config.fingerprint()
    changed = sorted(key for key in set(saved) | set(now) if saved.get(key) != now.get(key))
    if data["teacher"] != teacher or data["student"] != student:
        changed = ["teacher/student", *changed]
    if changed:
        raise QuantkitError(f"--resume: the checkpoint in '{latest.parent}' was made with different settings "
                            f"({', '.join(changed)}); rerun with the same settings or start afresh without --resume")
    total = data["total_steps"]
    if config.max_steps is not None:
        total = config.max_steps
    return _State(step=data["step"], tokens=data["tokens"], train_seconds=data["train_seconds"], total_steps=total,
                  history=data["history"], before=data["before"], teacher=data["teacher_perplexity"])


def _load_weights(wrapper: nn.Module, path: Path) -> None:
    from safetensors.torch import load_model

    load_model(wrapper, str(path), strict=True)
