"""Evaluate one model: load it, measure perplexity on each text, and measure its footprint.

This is what ``quantkit eval`` calls for the model and for its ``--baseline``.
"""

from __future__ import annotations

from collections.abc import Sequence

from quantkit.eval.report import EvalResult


def evaluate_model(model: str | None, *, datasets: Sequence[str] = ("wikitext2",), seq_len: int = 512,
                   batch_size: int = 4, max_windows: int | None = None, device: str = "cpu",
                   dtype: str = "auto", progress: bool = True) -> EvalResult:
    """Perplexity on each dataset (bundled name or local file) plus parameters and sizes."""
    from quantkit.data import evaluation_text
    from quantkit.eval.footprint import footprint
    from quantkit.eval.perplexity import perplexity
    from quantkit.models.loading import load_model

    texts = {name: evaluation_text(name) for name in datasets}  # bad dataset names fail before loading
    loaded = load_model(model, dtype=dtype, device=device)
    if loaded.tokenizer is None:
        from quantkit.errors import QuantkitError

        raise QuantkitError(f"'{loaded.path}' has no tokenizer files; perplexity needs the model's tokenizer")
    results = {
        name: perplexity(loaded.model, loaded.tokenizer, text, seq_len=seq_len, batch_size=batch_size,
                         max_windows=max_windows, device=device, progress=progress, dataset=name)
        for name, text in texts.items()
    }
    label = model if model is not None else "quantkit-target"
    scheme = (loaded.quantization_config or {}).get("quant_method", "float")
    extra = {"dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."), "quantization": scheme,
             "device": device}
    return EvalResult(model=label, path=loaded.path, perplexity=results,
                      footprint=footprint(loaded.model, loaded.path), extra=extra)
