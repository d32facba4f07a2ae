"""The adapter contract: where each architecture keeps its decoder layers, norms and linears.

Algorithms (GPTQ, AWQ, SmoothQuant, sparsity, the layer-by-layer pipeline) never name a module of
a particular architecture; they ask the model's adapter. One subclass per family lives beside this
file, and ``registry.get_adapter`` picks it by ``config.model_type``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

PREV_KINDS = ("norm", "linear", "linear_slice", "none")


@dataclass(frozen=True)
class LinearGroup:
    """Linear layers of one decoder layer that read the same input.

    ``prev`` names the module (relative to the decoder layer) whose output can absorb a
    per-input-channel scale of this group exactly: if every linear of the group has its input
    channel ``c`` multiplied by ``s[c] > 0`` and ``prev``'s output channel ``c`` is divided by
    ``s[c]``, the layer computes the same function (up to rounding).

    - ``prev_kind == "norm"``: ``prev`` is a norm whose output *is* the group's input; divide its
      effective weight (``adapter.norm_weight_offset + weight``) and its bias, if any, by ``s``.
    - ``prev_kind == "linear"``: ``prev`` is a linear whose output channels map one-to-one, in
      order, onto the group's input channels, through operations that are linear per channel
      (attention's weighted sum over positions of ``v``; the product ``act(gate) * up``; a ReLU,
      which commutes with positive scales). Divide its output rows (and bias) by ``s``.
    - ``prev_kind == "linear_slice"``: as ``"linear"``, but only output channels
      ``prev_slice[0]:prev_slice[1]`` of a fused ``prev`` feed the group (the value part of a fused
      qkv projection, the ``up`` half of a fused gate/up projection).
    - ``prev_kind == "none"``: no exact fold exists (a non-linear activation, or grouped-query
      attention, where one value channel feeds several output-projection channels).
    """

    name: str
    linears: tuple[str, ...]
    prev: str | None
    prev_kind: str
    prev_slice: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.prev_kind not in PREV_KINDS:
            raise ValueError(f"prev_kind must be one of {PREV_KINDS}, got {self.prev_kind!r}")
        if (self.prev is None) != (self.prev_kind == "none"):
            raise ValueError("prev must be None exactly when prev_kind is 'none'")
        if (self.prev_slice is not None) != (self.prev_kind == "linear_slice"):
            raise ValueError("prev_slice must be given exactly when prev_kind is 'linear_slice'")


def no_fold(name: str, linears: tuple[str, ...]) -> LinearGroup:
    """A group whose input cannot absorb a scale."""
    return LinearGroup(name, linears, None, "none")


class ModelAdapter(ABC):
    """Where one architecture family keeps its parts.

    Methods take the causal-LM model (``*ForCausalLM`` / ``*LMHeadModel``) or one of its decoder
    layers; module names in ``LinearGroup`` are relative to the decoder layer.
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    # RMSNorm of Gemma computes x * (offset + weight); folding divides (offset + weight).
    norm_weight_offset: ClassVar[float] = 0.0

    @abstractmethod
    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def embeddings(self, model: nn.Module) -> list[nn.Module]:
        """Token embedding, plus the learned position embedding where the family has one."""

    @abstractmethod
    def final_norm(self, model: nn.Module) -> nn.Module | None:
        """The norm after the last decoder layer (None where the architecture has none)."""

    @abstractmethod
    def linear_groups(self, layer: nn.Module) -> list[LinearGroup]:
        """Groups in true-sequential order: attention in, attention out, MLP in, MLP out."""

    @abstractmethod
    def attention(self, layer: nn.Module) -> nn.Module:
        """The self-attention module of a decoder layer."""

    @abstractmethod
    def norms(self, layer: nn.Module) -> dict[str, nn.Module]:
        """Every norm of a decoder layer, by name relative to the layer."""

    def rotary_embedding(self, model: nn.Module) -> nn.Module | None:
        """The shared rotary-embedding module (None for learned-position families)."""
        return None

    def lm_head(self, model: nn.Module) -> nn.Module:
        """The output projection to the vocabulary."""
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no language-model head")
        return head

    def layer_prefix(self, model: nn.Module) -> str:
        """Full name of the decoder-layer list, so layer i's linear is f"{prefix}.{i}.{name}"."""
        layers = self.decoder_layers(model)
        for name, module in model.named_modules():
            if module is layers:
                return name
        raise ValueError(f"decoder layers not found inside {type(model).__name__}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self.family!r})"
