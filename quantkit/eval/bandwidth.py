"""The memory-bandwidth limit of decoding: bytes that must move per step over measured bandwidth.

A decode step reads every weight once (whatever the batch) and, for each sequence, the K and V of
its whole context; it writes one token's K and V per sequence. With ``B`` sequences of mean
context ``L`` a step moves ``W + B * (L + 1) * kv_bytes_per_token`` bytes (plus ``B`` embedding
rows), so no engine can decode faster than ``B * bandwidth / bytes_per_step`` tokens per second.

Bandwidth is measured on the device: a large device-to-device copy, timed with CUDA events after
a warm-up, counting bytes read plus bytes written. On the CPU there is no such measurement and
every limit is reported as unavailable (None, printed "n/a").
"""

from __future__ import annotations

import torch

COPY_BYTES = 1 << 30  # 1 GiB per buffer (two buffers), less when memory is short
COPY_REPEATS = 20


def measure_copy_bandwidth(device: str, nbytes: int = COPY_BYTES, repeats: int = COPY_REPEATS) -> float | None:
    """Device memory bandwidth in bytes/s from a device-to-device copy (read + write); None off CUDA."""
    target = torch.device(device)
    if target.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(target)
    nbytes = int(min(nbytes, free // 4)) // 256 * 256
    src = torch.empty(nbytes, dtype=torch.uint8, device=target)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(target)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(target)
    seconds = start.elapsed_time(end) / 1e3
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes * repeats / seconds


def weight_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every linear (packed codes, scales and zeros
    for quantized ones), the norms and the output head. ``model`` is a runtime ``PagedLlama``."""
    total = _linear_bytes(model.lm_head) + _module_bytes(model.final_norm)
    for layer in model.layers:
        for linear in [*layer.qkv, layer.o, *layer.gate_up, layer.down]:
            total += _linear_bytes(linear)
        for norm in (layer.input_norm, layer.post_norm, layer.q_norm, layer.k_norm):
            total += _module_bytes(norm)
    return total


def decode_step_bytes(model, batch: int, mean_context: float) -> float:
    """Bytes one decode step of ``batch`` sequences with ``mean_context`` cached tokens moves."""
    kv = model.kv_bytes_per_token()
    embed_row = model.embed.shape[1] * model.embed.element_size()
    return weight_bytes(model) + batch * ((mean_context + 1) * kv + embed_row)


def decode_limit(model, bandwidth: float | None, *, batch: float, mean_context: float) -> dict:
    """The bandwidth-limited tokens/s at this batch and context (None without a bandwidth)."""
    step = decode_step_bytes(model, batch, mean_context)
    return {
        "device_bandwidth_bytes_per_s": bandwidth,
        "weight_bytes": weight_bytes(model),
        "kv_bytes_per_token": model.kv_bytes_per_token(),
        "batch": batch,
        "mean_context": mean_context,
        "bytes_per_step": step,
        "limit_tokens_per_s": None if bandwidth is None else batch * bandwidth / step,
    }


def _linear_bytes(linear) -> int:
    if linear.packed is not None:
        total = linear.packed.nbytes()
    else:
        total = linear.weight.numel() * linear.weight.element_size()
    if linear.bias is not None:
        total += linear.bias.numel() * linear.bias.element_size()
    return total


def _module_bytes(module) -> int:
    if module is None:
        return 0
    return sum(p.numel() * p.element_size() for p in module.parameters())
