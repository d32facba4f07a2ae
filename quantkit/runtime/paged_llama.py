"""The Llama family's forward pass (Llama, Mistral, Qwen2, Qwen3) written against the paged KV cache.

Weights, norms and rotary tables come from the transformers model that quantkit's loader built
(``quantkit.models.loading.load_model``), so every checkpoint layout quantkit reads runs here.
Norms, the rotary-embedding tables and the MLP activation are the model's own modules (exactly
transformers' arithmetic, rope scaling included); the linears become ``RuntimeLinear`` (dense or
packed quantized, q/k/v and gate/up fused where formats agree); attention goes through
``quantkit.kernels`` (K/V written to their slots, then paged attention over the cache). A
checkpoint with a quantized KV cache (``kv_cache_scheme``) gets an int8 or float8_e4m3fn cache
with its per-head scales: half the bytes per token, dequantized inside the attention kernels.
Before a W8A8 linear (fused q/k/v, gate/up, down) the norm or the SiLU-and-mul writes the 8-bit
activations and their scales directly (``kernels/quant_fused.py``): no separate quantization pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.kernels import add_rms_norm, paged_attention, rotary, silu_and_mul, write_kv
from quantkit.kernels.quant_fused import add_rms_norm_quant, silu_and_mul_quant
from quantkit.kernels.w8a8 import W8A8Weight
from quantkit.runtime.forward_batch import ForwardBatch
from quantkit.runtime.runtime_linear import (
    RuntimeLinear,
    runtime_linears,
    split_linears,
)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class _Layer:
    input_norm: nn.Module
    post_norm: nn.Module
    qkv: list[RuntimeLinear]  # one fused linear, or q, k, v
    o: RuntimeLinear
    gate_up: list[RuntimeLinear]  # one fused linear, or gate, up
    down: RuntimeLinear
    act: nn.Module
    silu: bool  # act is SiLU: gate and up go through one fused kernel
    q_norm: nn.Module | None
    k_norm: nn.Module | None


class PagedLlama:
    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
        config = model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise QuantkitError(
                f"the runtime runs the Llama family ({', '.join(SUPPORTED_MODEL_TYPES)}); "
                f"this checkpoint is '{config.model_type}'"
            )
        self.config, self.device, self.dtype = config, device, dtype
        inner = model.model
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.num_layers = len(inner.layers)
        self.scale = inner.layers[0].self_attn.scaling
        self.embed = inner.embed_tokens.weight.detach().to(device, dtype)
        self.rotary = inner.rotary_emb.to(device)
        self.final_norm = inner.norm.to(device, dtype)
        self.layers = [self._layer(layer) for layer in inner.layers]
        self.lm_head = runtime_linears([model.lm_head], dtype, device)
        self.kv_cache_dtype, self.kv_scales = _kv_cache_scales(inner.layers, self.num_kv_heads, device)

    def _layer(self, layer: nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        q_norm = getattr(attn, "q_norm", None)
        k_norm = getattr(attn, "k_norm", None)
        return _Layer(
            input_norm=layer.input_layernorm.to(self.device, self.dtype),
            post_norm=layer.post_attention_layernorm.to(self.device, self.dtype),
            qkv=_fused_or_split([attn.q_proj, attn.k_proj, attn.v_proj], self.dtype, self.device),
            o=runtime_linears([attn.o_proj], self.dtype, self.device),
            gate_up=_fused_or_split([mlp.gate_proj, mlp.up_proj], self.dtype, self.device),
            down=runtime_linears([mlp.down_proj], self.dtype, self.device),
            act=mlp.act_fn,
            silu=_is_silu(mlp.act_fn),
            q_norm=None if q_norm is None else q_norm.to(self.device, self.dtype),
            k_norm=None if k_norm is None else k_norm.to(self.device, self.dtype),
        )

    def new_kv_cache(self, num_blocks: int, block_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        dtype = self.kv_cache_dtype or self.dtype
        return [(torch.zeros(shape, dtype=dtype, device=self.device),
                 torch.zeros(shape, dtype=dtype, device=self.device)) for _ in range(self.num_layers)]

    def kv_bytes_per_token(self) -> int:
        element = torch.empty(0, dtype=self.kv_cache_dtype or self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    @torch.no_grad()
    def forward(self, batch: ForwardBatch, kv_cache: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Logits (N, vocab) float32 of the rows ``batch.logits_indices``."""
        hidden = self.embed[batch.input_ids]
        cos, sin = self.rotary(hidden, batch.positions.unsqueeze(0))
        cos, sin = cos[0].to(self.dtype), sin[0].to(self.dtype)
        residual = None  # the residual stream; each norm adds the sub-layer output to it first
        for index, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_cache)):
            x, residual = _norm(layer.input_norm, hidden, residual, _quantized_input_of(layer.qkv))
            scales = self.kv_scales[index] if self.kv_scales else (None, None)
            x, residual = _norm(layer.post_norm, self._attention(layer, x, cos, sin, batch, k_cache, v_cache, scales),
                                residual, _quantized_input_of(layer.gate_up))
            hidden = self._mlp(layer, x)
        rows = batch.logits_indices
        last, _ = _norm(self.final_norm, hidden[rows], None if residual is None else residual[rows])
        return self.lm_head(last).float()

    def _attention(self, layer: _Layer, x, cos, sin, batch: ForwardBatch, k_cache, v_cache,
                   scales=(None, None)) -> torch.Tensor:
        tokens = x.shape[0]
        q, k, v = _split(_apply(layer.qkv, x), [self.num_heads * self.head_dim,
                                               self.num_kv_heads * self.head_dim,
                                               self.num_kv_heads * self.head_dim])
        q = q.view(tokens, self.num_heads, self.head_dim)
        k = k.view(tokens, self.num_kv_heads, self.head_dim)
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if layer.q_norm is not None:
            q, k = layer.q_norm(q), layer.k_norm(k)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        k_scale, v_scale = scales
        write_kv(k, v, k_cache, v_cache, batch.slot_mapping, k_scale, v_scale)
        out = paged_attention(q, k_cache, v_cache, batch.block_tables, batch.query_start_loc, batch.seq_lens,
                              self.scale, max_seq_len=batch.max_seq_len, k_scale=k_scale, v_scale=v_scale)
        return layer.o(out.reshape(tokens, self.num_heads * self.head_dim))

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = _gate_up(layer, x)
        if not layer.silu:
            return layer.down(layer.act(gate) * up)
        target = _quantized_input_of([layer.down])
        if target is not None:
            return layer.down(silu_and_mul_quant(gate, up, target.type, target.input_scale))
        return layer.down(silu_and_mul(gate, up))


def _gate_up(layer: _Layer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if len(layer.gate_up) == 2:
        return layer.gate_up[0](x), layer.gate_up[1](x)
    fused = layer.gate_up[0](x)
    return fused.chunk(2, dim=-1)


def _fused_or_split(modules: list[nn.Module], dtype: torch.dtype, device: torch.device) -> list[RuntimeLinear]:
    try:
        return [runtime_linears(modules, dtype, device)]
    except ValueError:
        return split_linears(modules, dtype, device)


def _apply(linears: list[RuntimeLinear], x: torch.Tensor) -> torch.Tensor:
    return linears[0](x) if len(linears) == 1 else torch.cat([linear(x) for linear in linears], dim=-1)


def _split(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return list(x.split(sizes, dim=-1))


def _quantized_input_of(linears: list[RuntimeLinear]) -> W8A8Weight | None:
    """The 8-bit weight whose activations the producer should quantize: one linear (fused or not)
    that quantizes its input."""
    if len(linears) == 1 and isinstance(linears[0].packed, W8A8Weight) and linears[0].packed.activations != "none":
        return linears[0].packed
    return None


def _norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None,
          quantize_for: W8A8Weight | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual): one fused kernel for RMSNorm, else the module itself;
    with ``quantize_for`` the normalised rows come out as that W8A8 linear's 8-bit input."""
    eps = getattr(norm, "variance_epsilon", None)
    if eps is not None and "RMSNorm" in type(norm).__name__:
        if quantize_for is not None:
            return add_rms_norm_quant(x, residual, norm.weight, eps, quantize_for.type, quantize_for.input_scale)
        return add_rms_norm(x, residual, norm.weight, eps)
    summed = x if residual is None else x + residual
    return norm(summed), summed


def _kv_cache_scales(layers, num_kv_heads: int, device: torch.device
                     ) -> tuple[torch.dtype | None, list[tuple[torch.Tensor, torch.Tensor]] | None]:
    """(8-bit cache dtype, per-layer (k_scale, v_scale) of shape (Hkv,)) when the checkpoint's
    attention modules carry KV-cache scales (``quant/kv_cache.py``), else (None, None)."""
    from quantkit.kernels.kv_quant import KV_CACHE_DTYPES

    kinds = [getattr(layer.self_attn, "kv_cache_type", None) for layer in layers]
    if all(kind is None for kind in kinds):
        return None, None
    if len(set(kinds)) != 1:
        raise QuantkitError("every attention layer needs KV-cache scales of one type; this checkpoint mixes them")
    scales = []
    for layer in layers:
        attention = layer.self_attn
        scales.append(tuple(getattr(attention, name).detach().to(device, torch.float32).reshape(-1)
                            .expand(num_kv_heads).contiguous() for name in ("k_scale", "v_scale")))
    return KV_CACHE_DTYPES[kinds[0]], scales


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
