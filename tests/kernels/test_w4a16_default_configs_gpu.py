"""Every default launch of the W4A16 kernels (each M range, each activation dtype) on CUDA equals
the reference: a tile that does not fit shared memory for one dtype fails here, not in the engine."""

import pytest
import torch

from quantkit.kernels import pack_quantized_weight, quantized_linear_reference

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("k", "n"), [(256, 1536), (768, 256), (4096, 14336), (512, 16384)])
def test_default_configs_match_the_reference(dtype, k, n):
    from quantkit.kernels.w4a16_triton import quantized_linear_triton

    generator = torch.Generator(device="cuda").manual_seed(0)
    codes = torch.randint(0, 16, (n, k), device="cuda", generator=generator)
    scales = (torch.rand(n, k // 64, device="cuda", generator=generator) * 0.01 + 0.001).to(dtype)
    zeros = torch.randint(0, 16, (n, k // 64), device="cuda", generator=generator)
    packed = pack_quantized_weight(codes, scales, zeros, 64, 4)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    for m in (1, 2, 3, 16, 17, 64, 65, 255, 256):
        x = torch.randn(m, k, device="cuda", dtype=dtype, generator=generator)
        got = quantized_linear_triton(x, packed).float()
        want = quantized_linear_reference(x, packed).float()
        assert (got - want).abs().max().item() <= tolerance * want.abs().max().item(), (m, dtype)
