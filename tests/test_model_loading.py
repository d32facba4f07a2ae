"""Loading tiny random models saved to disk, and every way a model name or folder can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import quantkit.formats
from quantkit.errors import QuantkitError
from quantkit.models import bundled
from quantkit.models.bundled import resolve_model_path
from quantkit.models.loading import load_config, load_model, load_tokenizer, parse_dtype

SENTENCES = ["the cat sat on the mat", "a dog ran in the park", "the bird sang a song"]
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
SUPPORTED = "gemma, gemma2, gemma3_text, gpt2, llama, mistral, opt, phi3, qwen2, qwen3"


def tiny_tokenizer() -> tf.PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(
        SENTENCES, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[BOS]", "[EOS]", "[UNK]"])
    )
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def tiny_llama() -> tf.PreTrainedModel:
    config = tf.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=32,
        **TOKEN_IDS,
    )
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval()


def tiny_gpt2() -> tf.PreTrainedModel:
    config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=32, n_positions=32, **TOKEN_IDS)
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(config).eval()


def save(model: tf.PreTrainedModel, folder: Path, with_tokenizer: bool = True) -> Path:
    model.save_pretrained(folder)
    if with_tokenizer:
        tiny_tokenizer().save_pretrained(folder)
    return folder


def edit_config(folder: Path, **changes) -> None:
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def logits(model: tf.PreTrainedModel) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 4, 12, 7, 3]], device=model.device)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory) -> Path:
    return save(tiny_llama(), tmp_path_factory.mktemp("llama"))


@pytest.fixture
def offline_hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("make_model, family", [(tiny_llama, "llama"), (tiny_gpt2, "gpt2")])
def test_saved_model_loads_back_with_the_same_outputs(tmp_path, make_model, family):
    original = make_model()
    folder = save(original, tmp_path / family)
    loaded = load_model(str(folder))
    assert loaded.adapter.family == family
    assert loaded.path == str(folder.resolve())
    assert loaded.quantization_config is None
    assert not loaded.model.training
    assert not any(parameter.requires_grad for parameter in loaded.model.parameters())
    assert loaded.model.dtype == torch.float32
    assert torch.equal(logits(loaded.model), logits(original))
    assert loaded.tokenizer("the cat sat")["input_ids"] == tiny_tokenizer()("the cat sat")["input_ids"]


def test_auto_dtype_is_float32_on_cpu_and_explicit_dtypes_are_honoured(tmp_path):
    original = tiny_llama().to(torch.float16)
    folder = save(original, tmp_path / "fp16")
    assert json.loads((folder / "config.json").read_text()).get("dtype") == "float16"
    auto = load_model(str(folder))
    assert auto.model.dtype == torch.float32
    assert torch.equal(auto.model.lm_head.weight, original.lm_head.weight.float())
    assert load_model(str(folder), dtype="bf16").model.dtype == torch.bfloat16
    assert load_model(str(folder), dtype=torch.float16).model.dtype == torch.float16


@pytest.mark.gpu
def test_cuda_loads_keep_the_checkpoint_dtype(tmp_path):
    original = tiny_llama().to(torch.float16)
    folder = save(original, tmp_path / "fp16")
    weights = {name: tensor.to("cuda") for name, tensor in original.state_dict().items()}
    # The original's rotary buffer was cast to fp16 too, so its logits differ by fp16 rounding.
    expected = logits(original.to("cuda"))
    for loaded in (load_model(str(folder), device="cuda"), load_model(str(folder), device_map="auto")):
        assert loaded.model.dtype == torch.float16
        assert {parameter.device.type for parameter in loaded.model.parameters()} == {"cuda"}
        assert all(torch.equal(weights[name], tensor) for name, tensor in loaded.model.state_dict().items())
        torch.testing.assert_close(logits(loaded.model), expected, rtol=0, atol=2e-3)


def test_folder_without_tokenizer_gives_no_tokenizer(tmp_path):
    folder = save(tiny_gpt2(), tmp_path / "bare", with_tokenizer=False)
    assert load_model(str(folder)).tokenizer is None
    with pytest.raises(QuantkitError, match="has no tokenizer"):
        load_tokenizer(str(folder))


@pytest.fixture
def from_pretrained_options(monkeypatch) -> list[dict]:
    """Records the options load_model hands to transformers' from_pretrained."""
    seen: list[dict] = []
    real = tf.AutoModelForCausalLM.from_pretrained

    def spy(path, **options):
        seen.append(options)
        return real(path, **options)

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", spy)
    return seen


def test_device_map_cpu_load(llama_folder, from_pretrained_options):
    loaded = load_model(str(llama_folder), device_map="cpu")
    assert from_pretrained_options[0]["device_map"] == "cpu"
    assert {parameter.device.type for parameter in loaded.model.parameters()} == {"cpu"}
    assert torch.equal(logits(loaded.model), logits(tiny_llama()))


def test_trust_remote_code_is_off_unless_asked(llama_folder, from_pretrained_options):
    load_model(str(llama_folder))
    load_model(str(llama_folder), trust_remote_code=True)
    assert [options["trust_remote_code"] for options in from_pretrained_options] == [False, True]
    assert "device_map" not in from_pretrained_options[0]


def test_folder_without_config_json(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        QuantkitError, match="^'.*empty' has no config.json: not a Hugging Face model folder$"
    ):
        load_model(str(tmp_path / "empty"))


def test_missing_local_folder(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(QuantkitError) as raised:
        load_model(missing)
    assert str(raised.value) == f"model folder '{missing}' does not exist"


def test_unknown_architecture_fails_before_reading_weights(tmp_path):
    folder = tmp_path / "xyz"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "xyz", "hidden_size": 8}))
    with pytest.raises(QuantkitError) as raised:
        load_model(str(folder))
    assert str(raised.value) == f"architecture 'xyz' is not supported; supported: {SUPPORTED}"


def test_architecture_transformers_knows_but_quantkit_does_not(tmp_path):
    folder = tmp_path / "bert"
    tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(folder)
    with pytest.raises(
        QuantkitError, match=f"^architecture 'bert' is not supported; supported: {SUPPORTED}$"
    ):
        load_model(str(folder))


def test_config_that_is_not_json(llama_folder, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(QuantkitError, match="config.json' is not valid JSON"):
        load_model(str(folder))


def test_config_without_model_type(tmp_path):
    folder = tmp_path / "untyped"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(QuantkitError, match="config.json' has no model_type"):
        load_config(str(folder))


def test_config_transformers_cannot_parse(tmp_path):
    folder = save(tiny_llama(), tmp_path / "bad-config")
    edit_config(folder, hidden_size="wide", num_attention_heads="many")
    with pytest.raises(QuantkitError, match="^transformers cannot read the config of '.*bad-config': "):
        load_model(str(folder))


def test_folder_without_weights(tmp_path):
    folder = save(tiny_llama(), tmp_path / "no-weights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(QuantkitError, match="no-weights' has no weights: expected model.safetensors"):
        load_model(str(folder))


def test_checkpoint_missing_a_tensor(tmp_path):
    folder = save(tiny_llama(), tmp_path / "partial")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        QuantkitError, match=r"lacks 1 weight tensor\(s\) the model needs: model.layers.1.mlp.up_proj.weight$"
    ):
        load_model(str(folder))


def test_corrupt_weights_file(tmp_path):
    folder = save(tiny_llama(), tmp_path / "corrupt")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(QuantkitError, match="^could not load the weights in '.*corrupt': "):
        load_model(str(folder))


def test_hub_id_without_network(offline_hub):
    with pytest.raises(QuantkitError) as raised:
        load_model("some-org/some-model")
    assert str(raised.value).startswith(
        "could not load 'some-org/some-model': not a local folder and the Hugging Face hub is not reachable ("
    )


def test_unknown_quantization_method_is_named(tmp_path):
    folder = save(tiny_llama(), tmp_path / "bnb")
    edit_config(folder, quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    with pytest.raises(QuantkitError, match="is quantized with 'bitsandbytes', which quantkit cannot load"):
        load_model(str(folder))


def test_quantkit_checkpoints_are_read_by_quantkit_formats(tmp_path, monkeypatch):
    folder = save(tiny_llama(), tmp_path / "gptq")
    quantization = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False}
    edit_config(folder, quantization_config=quantization)
    calls = []

    def fake_reader(path, *, dtype, device):
        calls.append((path, dtype, device))
        return tiny_llama().train()

    monkeypatch.setattr(quantkit.formats, "load_quantized_model", fake_reader, raising=False)
    loaded = load_model(str(folder))
    assert calls == [(str(folder.resolve()), torch.float32, "cpu")]
    assert loaded.quantization_config == quantization
    assert not loaded.model.training
    assert loaded.tokenizer is not None and loaded.adapter.family == "llama"


def test_offload_folder_needs_a_device_map(llama_folder, tmp_path):
    with pytest.raises(QuantkitError, match="offload_folder needs a device_map"):
        load_model(str(llama_folder), offload_folder=str(tmp_path / "offload"))


def test_bad_devices(llama_folder):
    with pytest.raises(QuantkitError, match="unknown device 'gpu0'"):
        load_model(str(llama_folder), device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(QuantkitError, match="CUDA is not available"):
            load_model(str(llama_folder), device="cuda")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("auto", "auto"),
        ("AUTO", "auto"),
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("float16", torch.float16),
        ("fp16", torch.float16),
        ("half", torch.float16),
        ("bfloat16", torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.bfloat16", torch.bfloat16),
        (torch.float16, torch.float16),
    ],
)
def test_parse_dtype(text, expected):
    assert parse_dtype(text) == expected


@pytest.mark.parametrize("text", ["int8", "float64", "", torch.float64])
def test_parse_dtype_rejects_unknown_names(text):
    with pytest.raises(QuantkitError) as raised:
        parse_dtype(text)
    assert str(raised.value) == (
        f"unknown dtype '{text}'; choose one of: auto, float32, fp32, float16, fp16, half, bfloat16, bf16"
    )


@pytest.fixture
def fake_bundled(tmp_path, monkeypatch) -> dict[str, Path]:
    folders = {"quantkit-target": tmp_path / "target", "quantkit-draft": tmp_path / "draft"}
    for folder in folders.values():
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    monkeypatch.setattr(bundled, "BUNDLED_MODELS", folders)
    return folders


def test_resolve_bundled_names(fake_bundled):
    assert resolve_model_path(None) == str(fake_bundled["quantkit-target"])
    assert resolve_model_path("quantkit-target") == str(fake_bundled["quantkit-target"])
    assert resolve_model_path("quantkit-draft") == str(fake_bundled["quantkit-draft"])


def test_resolve_bundled_model_not_installed(fake_bundled):
    (fake_bundled["quantkit-draft"] / "config.json").unlink()
    with pytest.raises(QuantkitError, match="^bundled model 'quantkit-draft' is not installed"):
        resolve_model_path("quantkit-draft")


def test_resolve_local_folders(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model_path(str(folder)) == str(folder)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("./model") == str(folder)
    assert resolve_model_path("model") == str(folder)
    (tmp_path / "plain").mkdir()
    with pytest.raises(QuantkitError, match="^'plain' has no config.json: not a Hugging Face model folder$"):
        resolve_model_path("plain")
    with pytest.raises(QuantkitError, match="is a file, not a model folder"):
        resolve_model_path("model/config.json")


@pytest.mark.parametrize("text", ["./missing", "/no/such/model", "~/no-such-model-here", "a/b/c", "../up"])
def test_resolve_missing_local_paths(text):
    with pytest.raises(QuantkitError) as raised:
        resolve_model_path(text)
    assert str(raised.value) == f"model folder '{text}' does not exist"


@pytest.mark.parametrize("text", ["meta-llama/Llama-3.1-8B", "gpt2", "Qwen/Qwen2.5-0.5B-Instruct"])
def test_resolve_hub_ids_unchanged(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(text) == text
