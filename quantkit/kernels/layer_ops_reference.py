"""Plain-torch references of the decoder layer's small fused operations.

Each matches transformers' Llama arithmetic (``LlamaRMSNorm``, ``apply_rotary_pos_emb``, SiLU
gating) op for op, so on the CPU the runtime equals ``transformers`` exactly; the Triton versions
in ``layer_ops_triton`` do the same work in one kernel each (one rounding instead of several, so
they agree to the dtype's precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); ``residual=None`` normalises ``x`` alone."""
    summed = x if residual is None else x + residual
    hidden = summed.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(summed.dtype), summed


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, H, D) by per-token cos/sin (T, D), rotate-half convention; returns a new tensor."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def silu_and_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
