"""Distillation losses against their formulas, and the distillation recipe's validation."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from quantkit.distill.config import (
    DistillConfig,
    distill_config_from_dict,
    load_distill_config,
    with_overrides,
)
from quantkit.distill.losses import (
    default_layer_map,
    hidden_state_loss,
    kl_distillation_loss,
    language_model_loss,
)
from quantkit.errors import QuantkitError

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "distill.yaml"


def logits(seed, shape=(2, 5, 11)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kl_is_the_teachers_kl_to_the_student_at_a_temperature(temperature):
    s, t = logits(0), logits(1)
    p, q = F.softmax(t / temperature, -1), F.softmax(s / temperature, -1)
    want = (p * (p.log() - q.log())).sum(-1).mean() * temperature**2
    torch.testing.assert_close(kl_distillation_loss(s, t, temperature), want)
    assert kl_distillation_loss(t, t, temperature).abs() < 1e-6


def test_kl_gradient_vanishes_at_the_teacher_and_reaches_the_student():
    t = logits(1)
    s = logits(0).requires_grad_(True)
    kl_distillation_loss(s, t).backward()
    assert s.grad.abs().sum() > 0
    same = t.clone().requires_grad_(True)
    kl_distillation_loss(same, t).backward()
    assert same.grad.abs().max() < 1e-6


def test_language_model_loss_is_next_token_cross_entropy():
    x, ids = logits(2), torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(3))
    want = F.cross_entropy(x[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(language_model_loss(x, ids), want)


def test_hidden_state_loss_and_layer_map():
    teacher = [torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    assert hidden_state_loss(teacher, teacher, default_layer_map(4, 4)) == 0
    assert default_layer_map(2, 4) == ((0, 1), (1, 3)) and default_layer_map(3, 8) == ((0, 2), (1, 4), (2, 7))
    student = [h[..., :4] for h in teacher]
    projection = torch.nn.Linear(4, 8, bias=False)
    loss = hidden_state_loss(student, teacher, ((1, 3),), [projection])
    want = (projection(student[2]) - teacher[4]).square().mean() / teacher[4].square().mean()
    torch.testing.assert_close(loss, want)


def test_the_shipped_recipe_loads_and_options_override_it():
    config, data = load_distill_config(RECIPE)
    assert data["name"] == "distill" and config.dataset == ("wikipedia",) and config.temperature == 1.0
    assert config.tokens_per_step == config.batch_size * config.seq_len
    changed = with_overrides(config, lr=1e-3, dataset=["wikitext2", "wikipedia"], max_steps=None)
    assert changed.lr == 1e-3 and changed.dataset == ("wikitext2", "wikipedia") and changed.max_steps == 400


@pytest.mark.parametrize("data, message", [
    ({"lrr": 1}, "distill.lrr: unknown field"),
    ({"lr": 0}, "distill.lr: must be a number > 0"),
    ({"batch_size": 2.5}, "distill.batch_size: must be an integer"),
    ({"mixed_precision": "fp8"}, "distill.mixed_precision: must be one of no, bf16, fp16"),
    ({"kl_weight": 0, "hidden_weight": 0, "lm_weight": 0}, "at least one loss"),
    ({"max_steps": None}, "give max_steps, max_minutes or both"),
    ({"layer_map": [[0]]}, "distill.layer_map"),
    ({"qat_scheme": "w5a16"}, "distill.qat_scheme: unknown scheme"),
    ({"dataset": []}, "distill.dataset: give at least one text source"),
])
def test_bad_settings_name_the_field(data, message):
    with pytest.raises(QuantkitError) as info:
        distill_config_from_dict(data)
    assert message in str(info.value)


def test_recipe_files_are_checked(tmp_path):
    compression = tmp_path / "r.yaml"
    compression.write_text("steps:\n  - method: rtn\n")
    with pytest.raises(QuantkitError, match="needs a 'distill:' section"):
        load_distill_config(compression)
    with pytest.raises(QuantkitError, match="does not exist"):
        load_distill_config(tmp_path / "missing.yaml")
    assert DistillConfig(max_steps=None, max_minutes=5).max_steps is None
