"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

A few input channels of a linear group carry activations orders of magnitude larger than the
rest; per-token 8-bit activation scales are set by them, so every other channel loses its
precision. Dividing input channel ``j`` by ``s_j`` and multiplying the weights' column ``j`` by
``s_j`` leaves ``X Wᵀ`` unchanged and, with

    s_j = max|X_j|^α / max|W_j|^(1-α)

(``max|X_j|`` over the calibration tokens, ``max|W_j|`` over every output row of every linear of
the group), balances the two ranges: α = 0.5 splits the difficulty evenly, larger α moves more of
it into the weights. The division by ``s`` is folded into the norm that produces the group's
input (``quantkit.models.folding.fold_input_scales``), so the float model computes the same
function and the run-time model pays nothing.

With the α search, each group tries α in ``{0, 1/grid, ..., 1}`` and keeps the one whose W8A8
output (weights and activations quantized exactly as the following step will) is closest to the
float output on up to ``max_tokens`` calibration rows. Under data-parallel calibration the
per-channel maxima are all-reduced with MAX and the candidates' errors with SUM, so every rank
picks the same α.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from quantkit.quant.w8a8 import (
    dequantize,
    quantize,
    quantize_activation,
    scale_from_absmax,
    weight_scale,
)

# Floors of max|X| and max|W| (as the reference implementation): dead channels keep a finite scale.
_FLOOR = 1e-5


class ChannelAbsMax:
    """``max |x|`` per input channel over every token added, and optionally a sample of the rows.

    ``rows_per_batch`` > 0 keeps that many evenly spaced rows of each batch (for the α search).
    """

    def __init__(self, in_features: int, *, device: torch.device | str | None = None, rows_per_batch: int = 0) -> None:
        self.in_features = in_features
        self.absmax = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.rows_per_batch = rows_per_batch
        self._rows: list[torch.Tensor] = []
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        tokens = x.detach().reshape(-1, self.in_features)
        self.tokens += tokens.shape[0]
        self.absmax = torch.maximum(self.absmax, tokens.abs().amax(dim=0).to(torch.float32).to(self.absmax.device))
        if self.rows_per_batch and tokens.shape[0]:
            count = min(self.rows_per_batch, tokens.shape[0])
            index = torch.linspace(0, tokens.shape[0] - 1, count, device=tokens.device).round().long()
            self._rows.append(tokens[index].to(torch.float32))

    @property
    def rows(self) -> torch.Tensor:
        """The kept rows (n, in) float32."""
        if not self._rows:
            return torch.zeros(0, self.in_features, device=self.absmax.device)
        return torch.cat(self._rows)

    def all_reduce(self, group) -> None:
        """Maximum over the ranks of ``group`` (a ``DataParallel``); the kept rows stay local."""
        all_reduce_max(group, self.absmax)


def all_reduce_max(group, tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum of ``tensor`` over the data-parallel ranks, in place."""
    if hasattr(group, "all_reduce_max"):
        return group.all_reduce_max(tensor)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s = max|X|^α / max|W|^(1-α)`` per input channel (in,), float32, positive.

    ``weights`` are the group's weights (out_i, in) as they are before smoothing.
    """
    w_absmax = torch.cat([w.detach().abs().to(torch.float32) for w in weights]).amax(dim=0)
    act = act_absmax.to(torch.float32).to(w_absmax.device).clamp_min(_FLOOR)
    return (act.pow(alpha) / w_absmax.clamp_min(_FLOOR).pow(1.0 - alpha)).clamp_min(_FLOOR)


def w8a8_group_output(x: torch.Tensor, weights: torch.Tensor, kind: str, strategy: str, activations: str,
                      input_absmax: torch.Tensor | None = None) -> torch.Tensor:
    """The output (tokens, out) of a group whose weights (out, in) and inputs (tokens, in) are
    quantized as a W8A8 step does; ``input_absmax`` (per channel) gives the static input scale."""
    w_scale = weight_scale(weights, kind, strategy)
    w_hat = dequantize(quantize(weights, w_scale if strategy == "channel" else w_scale.reshape(1, 1), kind),
                       w_scale.reshape(-1, 1))
    if activations == "none":
        return x @ w_hat.t()
    input_scale = None
    if activations == "static":
        input_scale = scale_from_absmax(input_absmax.amax().reshape(1), kind)
    codes, x_scale = quantize_activation(x, kind, input_scale)
    return dequantize(codes, x_scale) @ w_hat.t()


def search_alpha(stats: ChannelAbsMax, weights: list[torch.Tensor], kind: str, strategy: str, activations: str,
                 grid: int, data_parallel=None) -> tuple[float, torch.Tensor, list[float]]:
    """(best α, its scales, each candidate's summed squared error) for one group.

    ``weights`` (out_i, in) before smoothing; the error of candidate α is
    ``‖X Wᵀ - Q(X / s) Q(W s)ᵀ‖²`` over the kept calibration rows, summed over ranks.
    """
    x = stats.rows
    w = torch.cat([weight.detach().to(torch.float32) for weight in weights]).to(x.device)
    reference = x @ w.t()
    alphas = [i / grid for i in range(grid + 1)]
    errors = torch.zeros(len(alphas), dtype=torch.float64, device=x.device)
    for i, alpha in enumerate(alphas):
        s = smoothing_scales(stats.absmax, weights, alpha).to(x.device)
        out = w8a8_group_output(x / s, w * s, kind, strategy, activations, stats.absmax.to(x.device) / s)
        errors[i] = (out - reference).double().pow(2).sum()
    if data_parallel is not None:
        data_parallel.all_reduce_sum(errors)
    best = int(torch.argmin(errors))
    return alphas[best], smoothing_scales(stats.absmax, weights, alphas[best]), errors.tolist()
