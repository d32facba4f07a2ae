"""KV-cache scales: calibrated on the keys after the rotary embedding, per KV head, never a default
of 1.0; the evaluation attention rounds K/V through the 8-bit cache exactly."""

import pytest
import torch
from test_pipeline import calibration, tiny_llama
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from quantkit.errors import QuantkitError
from quantkit.models.adapters import get_adapter
from quantkit.pipeline import quantize_model
from quantkit.quant.kv_cache import attach_kv_scales, kv_quantized_attention, kv_scale
from quantkit.quant.w8a8 import dequantize, quantize
from quantkit.recipe import recipe_from_dict


def _post_rope_absmax(model, samples):
    """Per-head max |K| after the rotary embedding and max |V| of layer 0, computed by hand."""
    attention = model.model.layers[0].self_attn
    captured = {}
    hook = attention.register_forward_pre_hook(lambda m, a, kw: captured.update(x=a[0] if a else kw["hidden_states"],
                                                                                   pe=kw["position_embeddings"]),
                                               with_kwargs=True)
    with torch.no_grad():
        model(samples)
    hook.remove()
    x, (cos, sin) = captured["x"], captured["pe"]
    shape = (*x.shape[:-1], -1, 32)
    k = attention.k_proj(x).view(shape).transpose(1, 2)
    q = attention.q_proj(x).view(*x.shape[:-1], -1, 32).transpose(1, 2)
    v = attention.v_proj(x).view(shape).transpose(1, 2)
    _, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
    return k_rot.abs().amax(dim=(0, 2, 3)), k.abs().amax(dim=(0, 2, 3)), v.abs().amax(dim=(0, 2, 3))


@pytest.mark.parametrize("kind, strategy", [("float", "attn_head"), ("int", "attn_head"), ("int", "tensor")])
def test_scales_come_from_post_rotary_keys_per_head(kind, strategy):
    model = tiny_llama()
    samples = calibration(4, 32)
    k_rot, k_raw, v = _post_rope_absmax(model, samples)
    assert not torch.allclose(k_rot, k_raw)  # the rotation changes the maxima: this checks which one is used
    recipe = recipe_from_dict({"format": "compressed-tensors", "steps": [{"method": "kv_cache", "type": kind,
                                                                          "strategy": strategy}]})
    quantize_model(model, get_adapter(model), recipe, samples=samples, batch_size=4)
    attention = model.model.layers[0].self_attn
    limit = 448.0 if kind == "float" else 127.0
    want_k, want_v = (k_rot, v) if strategy == "attn_head" else (k_rot.amax().reshape(1), v.amax().reshape(1))
    for got, want in ((attention.k_scale, want_k), (attention.v_scale, want_v)):
        got = got.reshape(-1)
        assert got.shape == want.shape
        assert bool((got * limit >= want * (1 - 1e-6)).all())  # never clips a calibration value
        assert bool((got * limit <= want * (1 + 2**-10) + 1e-9).all())  # rounded up to float16 only
        assert torch.equal(got, got.half().float())
    assert attention.kv_cache_type == kind
    assert model.config._attn_implementation != "quantkit_kv"  # restored after each layer


def test_attention_rounds_keys_and_values_through_the_cache():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = tiny_llama()
    attention = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 10, 32, generator=gen) for h in (4, 2, 2))
    k_scale = kv_scale(k.abs().amax(dim=(0, 2, 3)), "int", "attn_head")
    v_scale = kv_scale(v.abs().amax(dim=(0, 2, 3)), "int", "attn_head")
    attach_kv_scales(attention, k_scale, v_scale, "int")
    got, _ = kv_quantized_attention(attention, q, k, v, None, scaling=32**-0.5, is_causal=True)
    k_hat = dequantize(quantize(k, k_scale, "int"), k_scale)
    v_hat = dequantize(quantize(v, v_scale, "int"), v_scale)
    want, _ = sdpa_attention_forward(attention, q, k_hat, v_hat, None, scaling=32**-0.5, is_causal=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    exact, _ = sdpa_attention_forward(attention, q, k, v, None, scaling=32**-0.5, is_causal=True)
    assert 0 < float((got - exact).abs().max()) < 0.05


def test_no_scale_without_data():
    with pytest.raises(QuantkitError, match="zero on every calibration token"):
        kv_scale(torch.tensor([1.0, 0.0]), "float", "attn_head")
    with pytest.raises(QuantkitError, match="saw no tokens"):
        kv_scale(None, "float", "attn_head")
    model = tiny_llama()
    recipe = recipe_from_dict({"format": "compressed-tensors", "steps": [{"method": "kv_cache"}]})
    with pytest.raises(ValueError, match="kv_cache"):
        quantize_model(model, get_adapter(model), recipe)
