"""quantkit.kernels: the runtime's kernels, each a Triton kernel beside a plain-torch reference.

Use the dispatchers (``write_kv``, ``paged_attention``, ``quantized_linear``): they run Triton on
CUDA tensors and the reference elsewhere; ``QUANTKIT_KERNELS=reference`` forces the reference,
``QUANTKIT_KERNELS=triton`` forces Triton (on CPU tensors only under ``TRITON_INTERPRET=1``).
The ``*_reference`` functions are exported here; the ``*_triton`` ones live in the
``*_triton`` modules, which need triton at import time.
"""

from quantkit.kernels.attention_reference import paged_attention_reference
from quantkit.kernels.backend import kernel_mode, triton_available, use_triton
from quantkit.kernels.dispatch import (
    add_rms_norm,
    paged_attention,
    quantized_linear,
    rotary,
    silu_and_mul,
    write_kv,
)
from quantkit.kernels.kv_write import write_kv_reference
from quantkit.kernels.packed_weight import (
    PackedWeight,
    act_order_perm,
    pack_quantized_weight,
    quantized_linear_reference,
)

__all__ = [
    "PackedWeight",
    "add_rms_norm",
    "act_order_perm",
    "kernel_mode",
    "pack_quantized_weight",
    "paged_attention",
    "paged_attention_reference",
    "quantized_linear",
    "quantized_linear_reference",
    "rotary",
    "silu_and_mul",
    "triton_available",
    "use_triton",
    "write_kv",
    "write_kv_reference",
]

_TRITON_FUNCTIONS = {
    "write_kv_triton": "quantkit.kernels.kv_write_triton",
    "paged_attention_triton": "quantkit.kernels.attention_triton",
    "quantized_linear_triton": "quantkit.kernels.w4a16_triton",
    "add_rms_norm_triton": "quantkit.kernels.layer_ops_triton",
    "rotary_triton": "quantkit.kernels.layer_ops_triton",
    "silu_and_mul_triton": "quantkit.kernels.layer_ops_triton",
}


def __getattr__(name: str):
    # the Triton entry points import triton, so they load on first access only
    if name in _TRITON_FUNCTIONS:
        import importlib

        return getattr(importlib.import_module(_TRITON_FUNCTIONS[name]), name)
    raise AttributeError(f"module 'quantkit.kernels' has no attribute {name!r}")
