"""How closely a compressed model predicts like its original: top-1 agreement and KL divergence.

Perplexity averages over the text and can hide a model that is right for different reasons.
Comparing the two models' next-token distributions position by position is a second, stricter
line of defence: the share of positions where both pick the same most likely token, and the mean
KL(reference || model) of the full distributions, in nats. Both run over the same
non-overlapping windows as perplexity.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from quantkit.eval.perplexity import PerplexityResult, mean_next_token_nll, text_windows

_CHUNK_POSITIONS = 2048


@dataclass
class AgreementResult:
    top1_agreement: float
    mean_kl: float
    positions: int
    dataset: str

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def paired_evaluation(model, reference, tokenizer, text: str, *, seq_len: int = 512, batch_size: int = 4,
                      max_windows: int | None = None, device=None, progress: bool = True,
                      dataset: str = "") -> tuple[PerplexityResult, PerplexityResult, AgreementResult]:
    """Perplexity of both models and their agreement, from one forward pass of each per window."""
    from rich.console import Console
    from rich.progress import Progress

    windows = text_windows(tokenizer, text, seq_len, max_windows)
    nlls = {"model": [], "reference": []}
    same = kl_sum = 0.0
    count = 0
    console = Console(stderr=True)
    with Progress(console=console, transient=True, disable=not progress or not console.is_terminal) as bar:
        task = bar.add_task(f"evaluating {dataset}", total=len(windows))
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device)
            got = model(input_ids=batch, use_cache=False).logits
            want = reference(input_ids=batch, use_cache=False).logits
            for key, logits in (("model", got), ("reference", want)):
                nlls[key] += [mean_next_token_nll(row, ids).item() for row, ids in zip(logits, batch)]
            got, want = got[:, :-1], want[:, :-1]
            batch_same, batch_kl = _compare(got.reshape(-1, got.shape[-1]), want.reshape(-1, want.shape[-1]))
            same += batch_same
            kl_sum += batch_kl
            count += got.shape[0] * got.shape[1]
            bar.advance(task, len(batch))
    results = [_perplexity_result(nlls[key], windows, seq_len, dataset) for key in ("model", "reference")]
    return results[0], results[1], AgreementResult(same / count, kl_sum / count, count, dataset)


def prediction_agreement(model, reference, tokenizer, text: str, **options) -> AgreementResult:
    """Top-1 agreement and mean KL(reference || model) over every predicting position."""
    return paired_evaluation(model, reference, tokenizer, text, **options)[2]


def _perplexity_result(nlls: list[float], windows: torch.Tensor, seq_len: int, dataset: str) -> PerplexityResult:
    nll = sum(nlls) / len(nlls)
    return PerplexityResult(perplexity=math.exp(nll), nll=nll, tokens=windows.numel(), windows=len(windows),
                            seq_len=seq_len, dataset=dataset)


def _compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(positions with the same argmax, summed KL(want || got)) over rows, in float32 chunks."""
    same = torch.zeros((), dtype=torch.float64, device=got.device)
    kl = torch.zeros((), dtype=torch.float64, device=got.device)
    for start in range(0, got.shape[0], _CHUNK_POSITIONS):
        g = torch.log_softmax(got[start : start + _CHUNK_POSITIONS].float(), dim=-1)
        w = torch.log_softmax(want[start : start + _CHUNK_POSITIONS].float(), dim=-1)
        same += (g.argmax(-1) == w.argmax(-1)).sum()
        kl += (w.exp() * (w - g)).sum(-1).clamp_min(0).sum()
    return same.item(), kl.item()
