"""Capture the inputs of a model's first decoder layer for calibration samples, and run one layer.

The layer-by-layer pipeline needs, for each calibration batch, the hidden states entering the
first decoder layer and the keyword arguments the model passes to every layer (attention mask,
position ids, rotary position embeddings, ...). They are captured by running the model on each
batch with a pre-hook on the first layer that records its inputs and stops the forward pass, so
no decoder layer runs and only the embeddings (and rotary tables) need the working device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the capture hook once the first layer's inputs are recorded."""


@dataclass
class LayerBatch:
    """One calibration batch as a decoder layer sees it."""

    hidden: torch.Tensor
    kwargs: dict


def capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, samples: torch.Tensor, *,
                               device: torch.device, batch_size: int, storage: torch.device) -> list[LayerBatch]:
    """Run the model up to its first decoder layer on each batch of ``samples`` (N, L) token ids.

    Hidden states are kept on ``storage`` (the working device, or the CPU when they would not
    fit); the layer keyword arguments stay on the working device.
    """
    captured: list[LayerBatch] = []

    def hook(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "use_cache")}
        captured.append(LayerBatch(to_storage(hidden.detach(), storage), kwargs))
        raise _StopForward

    restore = _move_outside_layers(model, layers, device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in samples.split(batch_size):
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
        restore()
    _wait_for_copies(device)
    return captured


def run_layer(layer: nn.Module, batch: LayerBatch, device: torch.device) -> torch.Tensor:
    """The layer's output hidden states for one batch (on the batch's storage device)."""
    with torch.no_grad():
        out = layer(batch.hidden.to(device, non_blocking=True), **batch.kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return to_storage(out, batch.hidden.device)


def to_storage(tensor: torch.Tensor, storage: torch.device) -> torch.Tensor:
    """``tensor`` on ``storage``. Accelerator activations kept in CPU memory go to pinned pages by
    an asynchronous copy, so moving them back and forth does not stall the accelerator; read them
    on the CPU only after ``_wait_for_copies``."""
    if storage.type != "cpu" or tensor.device.type != "cuda":
        return tensor.to(storage)
    pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return pinned.copy_(tensor, non_blocking=True)


def _wait_for_copies(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _move_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device):
    """Move every tensor outside the decoder layers (embeddings, rotary tables) to ``device``.

    Returns a function that moves them back. The LM head is skipped unless it shares its weight
    with the embeddings: the capture never reaches it.
    """
    inside = {id(t) for t in layers.parameters()} | {id(t) for t in layers.buffers()}
    head = model.get_output_embeddings()
    embeddings = model.get_input_embeddings()
    head_only = set()
    if head is not None:
        shared = {id(p) for p in embeddings.parameters()}
        head_only = {id(p) for p in head.parameters() if id(p) not in shared}
    moved: list[tuple[torch.Tensor, torch.device]] = []
    seen: set[int] = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = id(tensor)
        if key in inside or key in head_only or key in seen:
            continue
        seen.add(key)
        moved.append((tensor, tensor.device))
        tensor.data = tensor.data.to(device)

    def restore() -> None:
        for tensor, home in moved:
            tensor.data = tensor.data.to(home)

    return restore
