"""How AWQ's searches measure the output error of a quantized weight, over every calibration token.

A linear layer's output error on inputs ``X`` (tokens, in) with weight error ``D = W - Ŵ`` (out, in)
is ``||X Dᵀ||² = Σ_rows d H dᵀ`` with ``H = XᵀX``. The searches therefore compute ``H`` once and
score each candidate with one (out × in × in) product, whatever the number of tokens; the error of
one quantization group only needs ``H``'s diagonal block for that group's columns.
"""

from __future__ import annotations

import torch

# Rows of a weight scored at once by the per-group error, bounding temporaries to ~64 MiB.
_CHUNK_ELEMENTS = 1 << 24


def gram(x: torch.Tensor) -> torch.Tensor:
    """``XᵀX`` (in, in) float32 of inputs (tokens, in)."""
    x = x.float()
    return x.t() @ x


def gram_blocks(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Diagonal blocks (n_groups, size, size) of ``XᵀX``, one per group of ``group_size`` columns."""
    tokens, in_features = x.shape
    size = in_features if group_size == -1 else group_size
    grouped = x.float().reshape(tokens, in_features // size, size).transpose(0, 1)
    return grouped.transpose(1, 2) @ grouped


def diagonal_blocks(hessian: torch.Tensor, group_size: int) -> torch.Tensor:
    """The diagonal blocks (n_groups, size, size) of a full ``XᵀX`` (in, in)."""
    in_features = hessian.shape[0]
    size = in_features if group_size == -1 else group_size
    n_groups = in_features // size
    tiles = hessian.reshape(n_groups, size, n_groups, size).transpose(1, 2)
    index = torch.arange(n_groups, device=hessian.device)
    return tiles[index, index]


def scale_blocks(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Blocks of ``(X / s)ᵀ(X / s)`` from blocks of ``XᵀX``: the Gram matrix of folded inputs."""
    inverse = (1.0 / scales).reshape(blocks.shape[0], -1)
    return blocks * inverse.unsqueeze(-1) * inverse.unsqueeze(-2)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``Σ_rows d H dᵀ`` (a 0-d tensor): the squared output error of weight error ``delta``."""
    return ((delta @ hessian) * delta).sum()


def group_output_errors(delta: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Squared output error (out, n_groups) of each row's each group, from ``gram_blocks``."""
    n_groups, size, _ = blocks.shape
    grouped = delta.reshape(delta.shape[0], n_groups, size).transpose(0, 1)  # (groups, out, size)
    return ((grouped @ blocks) * grouped).sum(-1).t()


def row_chunks(rows: int, width: int) -> list[slice]:
    """Slices of ``rows`` so that a chunk holds about ``_CHUNK_ELEMENTS`` values of ``width`` each."""
    step = max(1, _CHUNK_ELEMENTS // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def subsample_rows(x: torch.Tensor, max_tokens: int, seed: int = 0) -> torch.Tensor:
    """At most ``max_tokens`` rows of ``x``, drawn without replacement by a seeded generator."""
    if x.shape[0] <= max_tokens:
        return x
    generator = torch.Generator().manual_seed(seed)
    picked = torch.randperm(x.shape[0], generator=generator)[:max_tokens].sort().values
    return x[picked.to(x.device)]
