"""Distillation on tiny models: the mask stays fixed, a resumed run equals an uninterrupted one,
QAT writes a quantized checkpoint, students of another width train through projections, and
bad inputs are clear errors."""

import json

import pytest
import torch
from quant_helpers import tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.distill.config import DistillConfig
from quantkit.distill.trainer import distill, learning_rate, training_batch
from quantkit.errors import QuantkitError
from quantkit.models.loading import load_model
from quantkit.quant.weights import weight_out_in
from quantkit.sparsity.masks import follows_nm, nm_keep_mask

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def peaked_llama():
    """A random 2-layer Llama whose weights are large enough for confident predictions (with the
    default initialisation every distribution is nearly uniform and pruning hardly changes it)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, initializer_range=0.08)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher, its 2:4 magnitude-pruned copy (config records it), and training text."""
    root = tmp_path_factory.mktemp("distill")
    teacher = peaked_llama()
    teacher.save_pretrained(root / "teacher")
    tiny_tokenizer().save_pretrained(root / "teacher")
    student = peaked_llama()
    with torch.no_grad():
        for layer in student.model.layers:
            for name in LINEARS:
                weight = layer.get_submodule(name).weight
                weight.mul_(nm_keep_mask(weight.abs(), 2, 4))
    student.config.sparsity_config = {"format": "dense", "sparsity_structure": "2:4", "global_sparsity": 0.3,
                                      "targets": ["Linear"], "ignore": ["lm_head"], "registry_requires_subclass": False}
    student.save_pretrained(root / "student")
    tiny_tokenizer().save_pretrained(root / "student")
    words = (torch.randint(0, 40, (8000,), generator=torch.Generator().manual_seed(0)) * 5 + torch.arange(8000) % 5) % 255
    (root / "train.txt").write_text(" ".join(f"t{i}" for i in words[:6000].tolist()))
    (root / "eval.txt").write_text(" ".join(f"t{i}" for i in words[6000:].tolist()))  # 2000 tokens
    return root


def config(root, **changes):
    base = dict(dataset=(str(root / "train.txt"),), seq_len=32, batch_size=2, max_steps=4, lr=1e-3, warmup_steps=1,
                save_every=2, eval_windows=1, eval_datasets=(str(root / "eval.txt"),))
    return DistillConfig(**{**base, **changes})


def kl_to_teacher(student, teacher, ids):
    from quantkit.distill.losses import kl_distillation_loss

    with torch.no_grad():
        return kl_distillation_loss(load_model(str(student)).model(ids).logits,
                                    load_model(str(teacher)).model(ids).logits).item()


def weights(folder):
    model = load_model(str(folder)).model
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_pruned_student_keeps_its_mask_and_moves_toward_the_teacher(models, tmp_path):
    steps = []
    report = distill(str(models / "teacher"), str(models / "student"), tmp_path / "out", config(models, max_steps=6),
                     callback=lambda kind, payload: steps.append(payload) if kind == "step" else None)
    before, after = weights(models / "student"), weights(tmp_path / "out")
    changed = 0
    for index in range(2):
        for name in LINEARS:
            key = f"model.layers.{index}.{name}.weight"
            assert torch.equal(after[key] == 0, before[key] == 0), key  # exactly the same zeros
            assert follows_nm(after[key], 2, 4)
            changed += int((after[key] != before[key]).sum())
    assert changed > 1000  # the surviving weights did train
    assert report["mask"] == {"linears": 14, "sparsity": 0.5, "violations": 0}
    assert [log.step for log in steps] == [1, 2, 3, 4, 5, 6] and report["steps"] == 6
    assert report["tokens"] == 6 * 2 * 32 and steps[-1].tokens == report["tokens"]
    ids = training_batch(torch.tensor([int(w[1:]) for w in (models / "eval.txt").read_text().split()]),
                         DistillConfig(seq_len=64, batch_size=8), 0, 0, 0)
    assert kl_to_teacher(models / "student", models / "teacher", ids) > kl_to_teacher(tmp_path / "out",
                                                                                      models / "teacher", ids)
    assert json.loads((tmp_path / "out" / "distill_report.json").read_text())["steps"] == 6
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["sparsity_config"]["sparsity_structure"] == "2:4"
    row = report["perplexity"][str(models / "eval.txt")]
    assert set(row) == {"teacher", "student_before", "student_after", "recovered_fraction"}


def test_a_resumed_run_ends_where_the_uninterrupted_run_ends(models, tmp_path):
    straight = tmp_path / "straight"
    distill(str(models / "teacher"), str(models / "student"), straight, config(models))

    def crash_after_the_checkpoint(kind, payload):
        if kind == "step" and payload.step == 3:
            raise KeyboardInterrupt  # the checkpoint of step 2 is on disk

    crashed = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        distill(str(models / "teacher"), str(models / "student"), crashed, config(models),
                callback=crash_after_the_checkpoint)
    assert not crashed.exists()  # nothing half-written
    state = json.loads((tmp_path / "crashed.distill" / "latest" / "trainer_state.json").read_text())
    assert state["step"] == 2
    report = distill(str(models / "teacher"), str(models / "student"), crashed, config(models), resume=True)
    assert report["steps"] == 4
    want, got = weights(straight), weights(crashed)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    a = torch.load(tmp_path / "straight.distill" / "latest" / "optimizer.pt", weights_only=True)
    b = torch.load(tmp_path / "crashed.distill" / "latest" / "optimizer.pt", weights_only=True)
    for index, moments in a["state"].items():
        assert torch.equal(moments["exp_avg"], b["state"][index]["exp_avg"])
        assert torch.equal(moments["exp_avg_sq"], b["state"][index]["exp_avg_sq"])
    with pytest.raises(QuantkitError, match="different settings .*lr"):
        distill(str(models / "teacher"), str(models / "student"), tmp_path / "other", config(models, lr=5e-4),
                resume=True, checkpoint_dir=tmp_path / "crashed.distill")


def test_quantization_aware_student_writes_a_gptq_checkpoint(models, tmp_path):
    report = distill(str(models / "teacher"), str(models / "student"), tmp_path / "qat",
                     config(models, max_steps=2, qat_scheme="w4a16", qat_group_size=32))
    assert report["qat_scheme"] == "w4a16-g32-sym" and report["mask"]["violations"] == 0
    saved = json.loads((tmp_path / "qat" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "gptq" and saved["quantization_config"]["bits"] == 4
    loaded = load_model(str(tmp_path / "qat")).model
    for layer in loaded.model.layers:
        for name in LINEARS:
            assert follows_nm(weight_out_in(layer.get_submodule(name)), 2, 4)  # zeros quantize to zero


def test_a_narrower_student_learns_through_hidden_state_projections(models, tmp_path):
    narrow = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=256))
    narrow.save_pretrained(tmp_path / "narrow")
    tiny_tokenizer().save_pretrained(tmp_path / "narrow")
    seen = []
    distill(str(models / "teacher"), str(tmp_path / "narrow"), tmp_path / "out",
            config(models, max_steps=2, hidden_weight=1.0, lm_weight=0.5),
            callback=lambda kind, payload: seen.append(payload.parts) if kind == "step" else None)
    assert all(parts["kl"] > 0 and parts["hidden"] > 0 and parts["lm"] > 0 for parts in seen)
    assert load_model(str(tmp_path / "out")).model.config.hidden_size == 64


def test_bad_inputs_are_clear_errors(models, tmp_path):
    teacher, student = str(models / "teacher"), str(models / "student")
    with pytest.raises(QuantkitError, match="do not share a tokenizer"):
        distill("quantkit-target", student, tmp_path / "a", config(models))
    with pytest.raises(QuantkitError, match="no distillation checkpoint"):
        distill(teacher, student, tmp_path / "b", config(models), resume=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("x")
    with pytest.raises(QuantkitError, match="--overwrite"):
        distill(teacher, student, tmp_path / "c", config(models))
    with pytest.raises(QuantkitError, match="fewer than one window"):
        distill(teacher, student, tmp_path / "d", config(models, seq_len=100000))


def test_schedule_and_batches_depend_only_on_the_step():
    c = DistillConfig(lr=1.0, warmup_steps=2, max_steps=12, min_lr_ratio=0.1)
    assert [learning_rate(s, c, 12) for s in (0, 1)] == [0.5, 1.0]
    assert learning_rate(2, c, 12) == 1.0 and abs(learning_rate(12, c, 12) - 0.1) < 1e-9
    stream = torch.arange(1000)
    small = DistillConfig(seq_len=8, batch_size=3)
    assert torch.equal(training_batch(stream, small, 5, 0, 0), training_batch(stream, small, 5, 0, 0))
    assert not torch.equal(training_batch(stream, small, 5, 0, 0), training_batch(stream, small, 6, 0, 0))
    window = training_batch(stream, small, 5, 0, 0)
    assert ((window[:, 1:] - window[:, :-1]) == 1).all()  # contiguous windows of the text


def test_a_deadline_bounds_the_time_budget(monkeypatch):
    from quantkit.distill import trainer

    monkeypatch.setattr(trainer.time, "monotonic", lambda: 1000.0)
    c = DistillConfig(max_steps=None, max_minutes=10)
    state = trainer._State(step=10, train_seconds=20.0)
    times = [5.0] + [2.0] * 9  # the first step (warm-up) is left out of the estimate
    assert trainer._size_run(state, c, times) == 10 + (600 - 20) // 2
    assert trainer._size_run(state, c, times, deadline=1100.0) == 10 + 100 // 2  # the deadline ends first
    assert trainer._size_run(state, c, times, deadline=990.0) == 10  # already past it: no more steps
    assert not trainer._finished(state, c, deadline=1000.5)
    assert trainer._finished(state, c, deadline=1000.0)


def test_cli_distill_prints_the_report_as_json(models, tmp_path, run_cli):
    done = run_cli("distill", "--teacher", models / "teacher", "--student", models / "student", "-o", tmp_path / "o",
                   "--dataset", models / "train.txt", "--seq-len", "32", "--batch-size", "2", "--max-steps", "1",
                   "--eval-windows", "1", "--eval-dataset", models / "eval.txt", "--json")
    assert done.code == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["steps"] == 1 and list(report["perplexity"]) == [str(models / "eval.txt")]
    done = run_cli("distill", "--student", models / "student", "-o", tmp_path / "p", "--lr", "-1")
    assert done.code == 2 and "lr: must be a number > 0" in " ".join(done.stderr.split())
