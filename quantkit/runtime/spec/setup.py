"""Building the engine's speculator from its constructor options."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.runtime.paged_llama import PagedLlama
from quantkit.runtime.spec.adaptive import AdaptiveK
from quantkit.runtime.spec.draft_model import DraftModelProposer
from quantkit.runtime.spec.ngram import NgramProposer
from quantkit.runtime.spec.speculator import Speculator
from quantkit.runtime.spec.speed_gate import SpeedGate

METHODS = ("draft", "ngram")


@dataclass
class SpecOptions:
    method: str | None = None  # "draft" | "ngram" | None; None with a draft model means "draft"
    draft: str | None = None
    num_speculative_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 3
    max_batch: int = 32  # speculation is off in steps with at least this many decoding sequences
    adaptive: bool = True

    def resolved_method(self) -> str | None:
        method = self.method or ("draft" if self.draft else None)
        if method is not None and method not in METHODS:
            raise QuantkitError(f"speculative_method must be one of {', '.join(METHODS)} or None, got {method!r}")
        if method == "draft" and not self.draft:
            raise QuantkitError("speculative_method='draft' needs a draft model (draft=...)")
        if method is not None and self.num_speculative_tokens < 1:
            raise QuantkitError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        return method


@dataclass
class LoadedDraft:
    model: PagedLlama
    weight_bytes: int
    max_model_len: int


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a model's parameters and buffers (packed quantized weights count as stored)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def load_draft(name: str, *, dtype: str, device: torch.device, target_vocab: int) -> LoadedDraft:
    from quantkit.models.loading import load_model

    loaded = load_model(name, dtype=dtype, device="cpu")
    config = loaded.model.config
    if config.vocab_size != target_vocab:
        raise QuantkitError(f"the draft model's vocabulary ({config.vocab_size}) differs from the target's "
                            f"({target_vocab}); speculation needs the same tokenizer")
    compute_dtype = loaded.model.dtype if device.type == "cuda" else torch.float32
    model = PagedLlama(loaded.model, device, compute_dtype)
    return LoadedDraft(model, weight_bytes(loaded.model), config.max_position_embeddings)


def target_share_of_blocks(num_blocks: int, target: PagedLlama, draft: PagedLlama) -> int:
    """Target blocks when a memory-planned cache must also hold a draft cache of as many blocks."""
    per_target, per_draft = target.kv_bytes_per_token(), draft.kv_bytes_per_token()
    return max(1, num_blocks * per_target // (per_target + per_draft))


def build_speculator(options: SpecOptions, draft: LoadedDraft | None, *, target_bytes: int,
                     num_blocks: int, block_size: int, decode_graphs: bool = False,
                     max_model_len: int | None = None) -> Speculator | None:
    method = options.resolved_method()
    if method is None:
        return None
    if method == "draft":
        ratio = draft.weight_bytes / max(1, target_bytes)
        proposer = DraftModelProposer(draft.model, num_blocks, block_size, cost_ratio=ratio,
                                      decode_graphs=decode_graphs, max_num_seqs=options.max_batch,
                                      max_model_len=max_model_len)
    else:
        proposer = NgramProposer(options.ngram_min, options.ngram_max)
    controller = AdaptiveK(options.num_speculative_tokens, draft_cost=proposer.cost_ratio, adaptive=options.adaptive)
    gate = SpeedGate() if options.adaptive else None
    return Speculator(proposer, controller, options.max_batch, gate)
