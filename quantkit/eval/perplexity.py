"""Perplexity over non-overlapping windows, the protocol of the GPTQ reference evaluation.

The text is tokenized once, the way the tokenizer does by default (so a tokenizer that adds a BOS
token, like Llama's, puts one BOS at the very start of the text and nowhere else; one that adds
none, like quantkit's bundled tokenizer, adds nothing). The ids are cut into windows of `seq_len`
tokens, the ragged tail dropped. Each window's NLL is the mean over predicting its tokens
1..seq_len-1 from the ones before, computed in float32 from the logits; perplexity is
exp(mean of the window NLLs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from quantkit.errors import QuantkitError

# Bounds the float32 copy of the logits to this many positions at a time (vocabularies are large).
_LOGIT_CHUNK_TOKENS = 2048


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    windows: int
    seq_len: int
    dataset: str

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    text: str,
    *,
    seq_len: int = 512,
    batch_size: int = 4,
    max_windows: int | None = None,
    device=None,
    progress: bool = True,
    dataset: str = "",
) -> PerplexityResult:
    """exp(mean window NLL) of `model` on `text`; `tokens` counts the windows' tokens."""
    _check_arguments(model, seq_len, batch_size, max_windows)
    windows = text_windows(tokenizer, text, seq_len, max_windows)
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    try:
        window_nlls = _window_nlls(model, windows, batch_size, device, progress)
    finally:
        model.train(was_training)
    nll = window_nlls.double().mean().item()
    ppl = math.exp(nll) if nll < 700 else math.inf  # exp overflows a float beyond ~709
    return PerplexityResult(
        perplexity=ppl,
        nll=nll,
        tokens=windows.numel(),
        windows=len(windows),
        seq_len=seq_len,
        dataset=dataset,
    )


def text_windows(tokenizer, text: str, seq_len: int, max_windows: int | None) -> torch.Tensor:
    """(windows, seq_len) ids: the text tokenized once, cut into whole windows."""
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    count = len(ids) // seq_len
    if count == 0:
        raise QuantkitError(
            f"the evaluation text has {len(ids):,} tokens, fewer than one window "
            f"of {seq_len}: use a shorter seq_len or a longer text"
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seq_len].view(count, seq_len)


def _check_arguments(model, seq_len: int, batch_size: int, max_windows: int | None) -> None:
    if seq_len < 2:
        raise QuantkitError(f"seq_len must be at least 2 (got {seq_len})")
    if batch_size < 1:
        raise QuantkitError(f"batch_size must be at least 1 (got {batch_size})")
    if max_windows is not None and max_windows < 1:
        raise QuantkitError(f"max_windows must be at least 1 (got {max_windows})")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise QuantkitError(
            f"seq_len {seq_len} is longer than the model's context "
            f"(max_position_embeddings = {limit}): use --seq-len {limit} or less"
        )


def _model_device(model) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _window_nlls(
    model, windows: torch.Tensor, batch_size: int, device, progress: bool
) -> torch.Tensor:
    from rich.console import Console
    from rich.progress import Progress

    console = Console()
    nlls = []
    with Progress(
        console=console, transient=True, disable=not progress or not console.is_terminal
    ) as bar:
        task = bar.add_task("perplexity", total=len(windows))
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            nlls.append(
                torch.stack(
                    [
                        mean_next_token_nll(row_logits, row_ids)
                        for row_logits, row_ids in zip(logits, batch)
                    ]
                ).cpu()
            )
            bar.advance(task, len(batch))
    return torch.cat(nlls)


def mean_next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean float32 NLL of ids[1:] under logits[:-1] for one window ((seq, vocab), (seq,))."""
    predicting, targets = logits[:-1], ids[1:]
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, len(targets), _LOGIT_CHUNK_TOKENS):
        stop = start + _LOGIT_CHUNK_TOKENS
        log_probs = torch.log_softmax(predicting[start:stop].float(), dim=-1)
        total -= log_probs.gather(-1, targets[start:stop].unsqueeze(-1)).sum()
    return total / len(targets)
