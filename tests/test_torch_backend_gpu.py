"""The PyTorch path (backend="torch") on CUDA tensors: same code, same bytes as on the CPU.

Only the mean of the absmax (double quantization's offset) may round differently: CUDA sums in
another order than the CPU.
"""

import pytest
import torch

import qlora_ref as Q

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_plain_4bit_on_cuda_equals_cpu(quant_type, dtype):
    x = torch.randn(333, 257, generator=torch.Generator().manual_seed(0)).to(dtype)
    packed, state = Q.quantize_4bit(x, quant_type=quant_type, backend="torch")
    packed_gpu, state_gpu = Q.quantize_4bit(x.cuda(), quant_type=quant_type, backend="torch")
    assert torch.equal(packed_gpu.cpu(), packed) and torch.equal(state_gpu.absmax.cpu(), state.absmax)
    values = Q.dequantize_4bit(packed_gpu, state_gpu, backend="torch")
    assert values.is_cuda and torch.equal(values.cpu(), Q.dequantize_4bit(packed, state))


def test_nested_4bit_and_8bit_on_cuda():
    x = torch.randn(512, 1000, generator=torch.Generator().manual_seed(1))
    packed, state = Q.quantize_4bit(x, double_quant=True, backend="torch")
    packed_gpu, state_gpu = Q.quantize_4bit(x.cuda(), double_quant=True, backend="torch")
    assert torch.equal(packed_gpu.cpu(), packed)
    assert torch.allclose(state_gpu.offset.cpu(), state.offset, rtol=1e-6, atol=0)
    values = Q.dequantize_4bit(packed_gpu, state_gpu, backend="torch").cpu()
    assert torch.allclose(values, Q.dequantize_4bit(packed, state), rtol=1e-5, atol=1e-6)
    q, state8 = Q.quantize_blockwise(x, backend="torch")
    q_gpu, state8_gpu = Q.quantize_blockwise(x.cuda(), backend="torch")
    assert torch.equal(q_gpu.cpu(), q) and torch.equal(Q.dequantize_blockwise(q_gpu, state8_gpu, backend="torch").cpu(),
                                                       Q.dequantize_blockwise(q, state8))
