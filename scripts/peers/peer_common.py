"""What every peer run shares: the calibration tokens, the evaluation, and the measurements.

Runs in the peers virtualenv (`.venv-peers`, made by setup_peers_env.sh), never in quantkit's own:
llm-compressor and GPTQModel are not quantkit dependencies. quantkit is installed there editable, so
both peers see exactly the tokens and the perplexity protocol that quantkit's own benchmarks use.
"""

from __future__ import annotations

import os
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TARGET = Path(__file__).resolve().parents[2] / "quantkit" / "bundled" / "target"
CALIBRATION = {"source": "wikipedia", "num_samples": 128, "seq_len": 512, "seed": 0}
EVAL_DATASETS = ("wikitext2", "wikipedia-heldout")
EVAL_SEQ_LEN = 512


@dataclass
class Phases:
    """Wall and CPU seconds per named phase of one run, and the process's peak RSS after each."""

    wall_s: dict[str, float] = field(default_factory=dict)
    cpu_s: dict[str, float] = field(default_factory=dict)
    peak_rss_mb_after: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def measure(self, name: str):
        wall, cpu = time.perf_counter(), _cpu_seconds()
        try:
            yield
        finally:
            self.wall_s[name] = round(time.perf_counter() - wall, 3)
            self.cpu_s[name] = round(_cpu_seconds() - cpu, 3)
            self.peak_rss_mb_after[name] = peak_rss_mb()

    def to_dict(self) -> dict:
        return {"wall_s": self.wall_s, "cpu_s": self.cpu_s, "peak_rss_mb_after": self.peak_rss_mb_after}


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> list[float]:
    """1/5/15-minute load average: the machine is shared, so wall times need this beside them."""
    return [round(value, 2) for value in os.getloadavg()]


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TARGET)


def load_float32_model():
    """The bundled target (fp16 on disk) as a float32 transformers model on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TARGET, dtype=torch.float32).eval()


def calibration_ids(tokenizer):
    """The (128, 512) LongTensor of token windows quantkit calibrates on."""
    from quantkit.data import calibration_samples

    source = CALIBRATION["source"]
    options = {k: v for k, v in CALIBRATION.items() if k != "source"}
    return calibration_samples(tokenizer, source, **options)


def evaluate(
    model, tokenizer, max_windows: int | None, phases: Phases, label: str = "eval"
) -> dict:
    """quantkit's perplexity on each evaluation text, seq_len 512, first `max_windows` windows."""
    from quantkit.data import evaluation_text
    from quantkit.eval.perplexity import perplexity

    results = {}
    for name in EVAL_DATASETS:
        with phases.measure(f"{label}_{name}"):
            result = perplexity(
                model,
                tokenizer,
                evaluation_text(name),
                seq_len=EVAL_SEQ_LEN,
                max_windows=max_windows,
                progress=False,
                dataset=name,
            )
        results[name] = result.to_dict()
    return results


def logits_on(model, ids) -> torch.Tensor:
    import torch

    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.float()


def first_eval_windows(tokenizer, count: int):
    """The first `count` WikiText-2 windows: a small fixed input to compare two models' logits on."""
    from quantkit.data import evaluation_text
    from quantkit.eval.perplexity import text_windows

    return text_windows(tokenizer, evaluation_text(EVAL_DATASETS[0]), EVAL_SEQ_LEN, count)


def directory_mb(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20, 2)
