"""Run under torchrun by tests/test_data_parallel_cli.py: ``quantkit quantize`` in which rank 1
fails in the middle of layer 1 (while rank 0 waits for it in an all-reduce)."""

import os

from quantkit.cli import main
from quantkit.pipeline import gptq_step

_quantize_layer = gptq_step.quantize_layer_gptq


def _failing(ctx, *args, **kwargs):
    if ctx.index == 1 and os.environ.get("RANK") == "1":
        raise RuntimeError("injected failure on rank 1")
    return _quantize_layer(ctx, *args, **kwargs)


gptq_step.quantize_layer_gptq = _failing
main()
