"""Distillation settings: a dataclass, read from YAML (``recipes/distill.yaml``) or built from options.

A distillation recipe looks like::

    name: distill
    distill:
      dataset: [wikipedia]        # any text source quantkit.data.load_texts reads, one or several
      seq_len: 512
      batch_size: 8               # sequences per micro-batch
      grad_accum: 1
      max_steps: 400              # or leave out and give max_minutes: the run sizes itself
      lr: 1.0e-4
      temperature: 1.0
      kl_weight: 1.0              # KL(teacher || student) on next-token distributions, times T²
      hidden_weight: 0.0          # MSE between matched layers' hidden states (normalised)
      lm_weight: 0.0              # the plain next-token cross-entropy

Every error names the field (``distill.lr: ...``). No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from quantkit.errors import QuantkitError

MIXED_PRECISION = ("no", "bf16", "fp16")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class DistillConfig:
    dataset: tuple[str, ...] = ("wikipedia",)
    text_field: str = "text"
    seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = 400
    max_minutes: float | None = None  # stop at a step boundary once training has run this long
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr * min_lr_ratio
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    temperature: float = 1.0
    kl_weight: float = 1.0
    hidden_weight: float = 0.0
    lm_weight: float = 0.0
    layer_map: tuple[tuple[int, int], ...] | None = None  # (student layer, teacher layer); None: spread evenly
    mixed_precision: str = "no"
    seed: int = 0
    save_every: int = 100  # steps between resumable checkpoints
    eval_windows: int | None = 64  # perplexity windows of 512 tokens before and after (None: all)
    eval_datasets: tuple[str, ...] = ("wikitext2", "wikipedia-heldout")
    qat_scheme: str | None = None  # train quantization-aware with this weight scheme; write a GPTQ checkpoint
    qat_group_size: int = 128

    def __post_init__(self) -> None:
        check_config(self)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        return out

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint (the length of
        the run, the checkpoint interval and the evaluation may change)."""
        out = self.to_dict()
        for key in ("max_steps", "max_minutes", "save_every", "eval_windows", "eval_datasets"):
            out.pop(key)
        return out


def _positive(value, kind, name: str, allow_zero: bool = False) -> None:
    ok = isinstance(value, kind) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        what = "an integer" if kind is int else "a number"
        raise QuantkitError(f"{name}: must be {what} {'>= 0' if allow_zero else '> 0'} (got {value!r})")


def check_config(config: DistillConfig) -> None:
    if not config.dataset or not all(isinstance(d, str) and d for d in config.dataset):
        raise QuantkitError("dataset: give at least one text source (a bundled name, file or datasets folder)")
    for name in ("seq_len", "batch_size", "grad_accum", "save_every", "warmup_steps", "qat_group_size"):
        _positive(getattr(config, name), int, name, allow_zero=name == "warmup_steps")
    if config.seq_len < 2:
        raise QuantkitError(f"seq_len: must be at least 2 (got {config.seq_len})")
    if config.max_steps is None and config.max_minutes is None:
        raise QuantkitError("max_steps: give max_steps, max_minutes or both")
    if config.max_steps is not None:
        _positive(config.max_steps, int, "max_steps")
    if config.max_minutes is not None:
        _positive(config.max_minutes, (int, float), "max_minutes")
    if config.eval_windows is not None:
        _positive(config.eval_windows, int, "eval_windows")
    for name in ("lr", "temperature"):
        _positive(getattr(config, name), (int, float), name)
    for name in ("weight_decay", "max_grad_norm", "kl_weight", "hidden_weight", "lm_weight"):
        _positive(getattr(config, name), (int, float), name, allow_zero=True)
    if not 0 <= config.min_lr_ratio <= 1:
        raise QuantkitError(f"min_lr_ratio: must be between 0 and 1 (got {config.min_lr_ratio!r})")
    if config.kl_weight + config.hidden_weight + config.lm_weight == 0:
        raise QuantkitError("kl_weight, hidden_weight, lm_weight: at least one loss must have a positive weight")
    if config.mixed_precision not in MIXED_PRECISION:
        raise QuantkitError(f"mixed_precision: must be one of {', '.join(MIXED_PRECISION)} (got {config.mixed_precision!r})")
    if config.schedule not in SCHEDULES:
        raise QuantkitError(f"schedule: must be one of {', '.join(SCHEDULES)} (got {config.schedule!r})")
    if config.layer_map is not None:
        if not config.layer_map or not all(len(pair) == 2 and all(isinstance(i, int) and i >= 0 for i in pair)
                                           for pair in config.layer_map):
            raise QuantkitError("layer_map: must be a list of [student_layer, teacher_layer] pairs of layer indices")
    if config.qat_scheme is not None:
        from quantkit.quant.scheme import parse_scheme

        try:
            parse_scheme(config.qat_scheme, group_size=config.qat_group_size)
        except QuantkitError as error:
            raise QuantkitError(f"qat_scheme: {error}") from None


def distill_config_from_dict(data: Any, base: DistillConfig | None = None) -> DistillConfig:
    """Settings from a mapping (the ``distill:`` section of a recipe), over ``base`` or the defaults."""
    if not isinstance(data, dict):
        raise QuantkitError("distill: must be a mapping of settings")
    names = {f.name: f for f in fields(DistillConfig)}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key not in names:
            raise QuantkitError(f"distill.{key}: unknown field; allowed fields: {', '.join(sorted(names))}")
        if key in ("dataset", "eval_datasets"):
            value = (value,) if isinstance(value, str) else value
            if not isinstance(value, (list, tuple)):
                raise QuantkitError(f"distill.{key}: must be a text source or a list of them")
            value = tuple(value)
        elif key == "layer_map" and value is not None:
            if not isinstance(value, list):
                raise QuantkitError("distill.layer_map: must be a list of [student_layer, teacher_layer] pairs")
            value = tuple(tuple(pair) if isinstance(pair, list) else pair for pair in value)
        elif names[key].type in ("float", "float | None") and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        values[key] = value
    try:
        return replace(base or DistillConfig(), **values)
    except QuantkitError as error:
        raise QuantkitError(f"distill.{error}") from None
    except TypeError as error:  # a wrong type where the check compares numbers
        raise QuantkitError(f"distill: {error}") from None


def load_distill_config(path: str | Path) -> tuple[DistillConfig, dict]:
    """(settings, the whole file) of a distillation recipe; missing files and bad YAML are QuantkitErrors."""
    path = Path(path)
    if not path.is_file():
        raise QuantkitError(f"distillation recipe '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuantkitError(f"distillation recipe '{path}' is not valid YAML: {first}") from None
    if not isinstance(data, dict) or "distill" not in data:
        raise QuantkitError(f"distillation recipe '{path}' needs a 'distill:' section "
                            "(a compression recipe is run by quantkit quantize --recipe)")
    for key in data:
        if key not in ("name", "description", "distill"):
            raise QuantkitError(f"distillation recipe '{path}': {key}: unknown field; allowed: name, description, distill")
    try:
        return distill_config_from_dict(data["distill"]), data
    except QuantkitError as error:
        raise QuantkitError(f"distillation recipe '{path}': {error}") from None


def with_overrides(config: DistillConfig, **overrides: Any) -> DistillConfig:
    """``config`` with the options given on the command line (None: not given)."""
    given = {key: value for key, value in overrides.items() if value is not None}
    return distill_config_from_dict(given, base=config) if given else config
