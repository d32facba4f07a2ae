"""Evaluate a model, or a model beside its baseline: perplexity, prediction agreement, footprint.

This is what ``quantkit eval`` calls.
"""

from __future__ import annotations

from collections.abc import Sequence

from quantkit.errors import QuantkitError
from quantkit.eval.report import EvalResult


def evaluate_model(model: str | None, *, datasets: Sequence[str] = ("wikitext2",), seq_len: int = 512,
                   batch_size: int = 4, max_windows: int | None = None, device: str = "cpu",
                   dtype: str = "auto", progress: bool = True) -> EvalResult:
    """Perplexity on each dataset (bundled name or local file) plus parameters and sizes."""
    texts = _texts(datasets)  # bad dataset names fail before any model loads
    loaded = _load(model, device, dtype)
    return _evaluate_loaded(model, loaded, texts, seq_len, batch_size, max_windows, device, progress)


def evaluate_pair(model: str | None, baseline: str, *, datasets: Sequence[str] = ("wikitext2",), seq_len: int = 512,
                  batch_size: int = 4, max_windows: int | None = None, device: str = "cpu", dtype: str = "auto",
                  progress: bool = True) -> tuple[EvalResult, EvalResult]:
    """Evaluate ``model`` and ``baseline`` alike, and how closely the model predicts like the baseline.

    The model's result carries ``extra["agreement"][dataset]``: top-1 agreement and mean KL
    against the baseline. Both models stay loaded together for that comparison.
    """
    from quantkit.eval.agreement import paired_evaluation

    texts = _texts(datasets)
    base_loaded = _load(baseline, device, dtype)
    loaded = _load(model, device, dtype)
    if loaded.model.config.vocab_size != base_loaded.model.config.vocab_size:
        raise QuantkitError(f"'{loaded.path}' and the baseline '{base_loaded.path}' have different vocabularies; "
                            "they cannot be compared position by position")
    result, base = _result(model, loaded, {}, device), _result(baseline, base_loaded, {}, device)
    result.extra["agreement"] = {}
    for name, text in texts.items():
        ppl, base_ppl, agreement = paired_evaluation(
            loaded.model, base_loaded.model, loaded.tokenizer, text, seq_len=seq_len, batch_size=batch_size,
            max_windows=max_windows, device=device, progress=progress, dataset=name)
        result.perplexity[name], base.perplexity[name] = ppl, base_ppl
        result.extra["agreement"][name] = agreement.to_dict()
    return result, base


def _texts(datasets: Sequence[str]) -> dict[str, str]:
    from quantkit.data import evaluation_text

    return {name: evaluation_text(name) for name in datasets}


def _load(model: str | None, device: str, dtype: str):
    from quantkit.models.loading import load_model

    loaded = load_model(model, dtype=dtype, device=device)
    if loaded.tokenizer is None:
        raise QuantkitError(f"'{loaded.path}' has no tokenizer files; evaluation needs the model's tokenizer")
    return loaded


def _evaluate_loaded(model, loaded, texts, seq_len, batch_size, max_windows, device, progress) -> EvalResult:
    from quantkit.eval.perplexity import perplexity

    results = {
        name: perplexity(loaded.model, loaded.tokenizer, text, seq_len=seq_len, batch_size=batch_size,
                         max_windows=max_windows, device=device, progress=progress, dataset=name)
        for name, text in texts.items()
    }
    return _result(model, loaded, results, device)


def _result(model, loaded, perplexities: dict, device: str) -> EvalResult:
    from quantkit.eval.footprint import footprint

    method = (loaded.quantization_config or {}).get("quant_method", "float")
    extra = {"dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."), "quantization": method,
             "device": device}
    return EvalResult(model=model if model is not None else "quantkit-target", path=loaded.path,
                      perplexity=perplexities, footprint=footprint(loaded.model, loaded.path), extra=extra)
