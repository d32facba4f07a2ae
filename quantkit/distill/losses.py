"""Distillation losses: the teacher's next-token distributions, matched layers' hidden states, and
the plain language-modelling loss. All are computed in float32, whatever the autocast dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean over positions of ``KL(p_teacher || p_student)`` at ``temperature``, times ``T²``
    (Hinton et al., 2015: the gradient's scale then does not depend on the temperature)."""
    student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_position = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    return per_position.mean() * temperature**2


def language_model_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of predicting ``ids[:, 1:]`` from the positions before them."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def hidden_state_loss(student_states, teacher_states, layer_map, projections=None) -> torch.Tensor:
    """Mean over matched layers of ``||P h_s - h_t||² / ||h_t||²`` (per element means), where
    ``h`` is a layer's output (``hidden_states[layer + 1]``) and ``P`` a learned projection when
    the widths differ (``projections[k]`` for the k-th pair; None keeps the student's states)."""
    total = 0.0
    for k, (student_layer, teacher_layer) in enumerate(layer_map):
        student = student_states[student_layer + 1].float()
        teacher = teacher_states[teacher_layer + 1].float()
        if projections is not None and projections[k] is not None:
            student = projections[k](student)
        total = total + (student - teacher).square().mean() / teacher.square().mean().clamp_min(1e-12)
    return total / len(layer_map)


def default_layer_map(student_layers: int, teacher_layers: int) -> tuple[tuple[int, int], ...]:
    """Student layer ``i`` against teacher layer ``round((i + 1) * T / S) - 1``: evenly spread,
    last against last (identity when the depths agree)."""
    return tuple((i, round((i + 1) * teacher_layers / student_layers) - 1) for i in range(student_layers))
