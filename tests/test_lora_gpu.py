"""QLoRALinear on a CUDA GPU against bitsandbytes' Linear4bit plus a LoRA branch in plain PyTorch.

Tolerances, and why:
- Packed codes, absmax codes, nested absmax and offset: EQUAL. QLoRALinear quantizes with the Triton kernels,
  which reproduce bitsandbytes' CUDA bytes (tests/test_triton_quantize_gpu.py).
- The base product alone, more than 4 tokens (DequantizeMatmul vs bitsandbytes' MatMul4Bit): output and dL/dx
  EQUAL. Both dequantize to the same bf16 values (tests/test_triton_dequantize_gpu.py) and call the same cuBLAS
  GEMM on the same operands. At 1 to 4 tokens bitsandbytes 0.50 runs its fused inference kernel instead (even
  when x needs a gradient), which rounds the absmax and each product to bf16: there our output must be at
  least as close to the float32 reference x W^T as bitsandbytes' (and dL/dx is still EQUAL: its backward
  dequantizes).
- The whole layer: output and dL/dx within 2^-7 of the largest value, dL/dA and dL/dB within 2^-6.
  Ours adds the low-rank product inside the GEMM (addmm into the output: one bf16 rounding); plain PyTorch
  rounds s·B(A(x)) to bf16, then rounds the sum again; bf16 keeps 8 significant bits. The adapter gradients
  sum over every token in a different association (s·(g B) vs (s·g) B), a few bf16 roundings apart.
"""

import pytest
import torch
from torch import nn

import qlora_ref as Q
from bench.layer import linear4bit
from qlora_ref.lora import DequantizeMatmul

pytestmark = pytest.mark.gpu
pytest.importorskip("bitsandbytes")

DTYPE = torch.bfloat16
SHAPES = [(192, 320), (4096, 4096), (1000, 576)]  # (out, in): awkward, Llama-sized, odd out


def layers(out_features, in_features, r=16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, device="cuda", dtype=DTYPE, generator=g) * 0.05)
    ours = Q.QLoRALinear(linear, r=r, alpha=2 * r, compute_dtype=DTYPE, adapter_dtype=DTYPE)
    with torch.no_grad():
        ours.lora_B.weight.copy_(torch.randn(out_features, r, device="cuda", dtype=DTYPE, generator=g) * 0.05)
    return ours, linear4bit(linear.weight, DTYPE)  # as transformers builds it: a bf16 quantization state


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_same_bytes_as_linear4bit(shape):
    ours, base = layers(*shape)
    state = base.weight.quant_state
    assert torch.equal(ours.weight_packed.reshape(-1), base.weight.data.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.absmax2, state.state2.absmax)
    assert torch.equal(ours.absmax_offset.reshape(()), state.offset.reshape(()))


@pytest.mark.parametrize("tokens", [1, 3, 257])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_base_product_equals_matmul4bit(shape, tokens):
    ours, base = layers(*shape)
    x = torch.randn(tokens, shape[1], device="cuda", dtype=DTYPE, requires_grad=True)
    g = torch.randn(tokens, shape[0], device="cuda", dtype=DTYPE)
    y = DequantizeMatmul.apply(x, ours.weight_packed, ours.quant_state(), None)
    (gx,) = torch.autograd.grad(y, x, g)
    y_bnb = base(x)
    (gx_bnb,) = torch.autograd.grad(y_bnb, x, g)
    assert torch.equal(gx, gx_bnb)
    if tokens > 4:
        assert torch.equal(y, y_bnb)
    else:
        reference = x.detach().float() @ ours.base_weight().float().T
        ours_err = (y.float() - reference).abs().max().item()
        bnb_err = (y_bnb.float() - reference).abs().max().item()
        assert ours_err <= bnb_err, (ours_err, bnb_err)


@pytest.mark.parametrize("tokens", [1, 257, 4096])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_agrees_with_linear4bit_plus_plain_lora(shape, tokens):
    ours, base = layers(*shape)
    A = nn.Parameter(ours.lora_A.weight.detach().clone())
    B = nn.Parameter(ours.lora_B.weight.detach().clone())
    x = torch.randn(tokens, shape[1], device="cuda", dtype=DTYPE, requires_grad=True)
    g = torch.randn(tokens, shape[0], device="cuda", dtype=DTYPE)
    y = ours(x)
    gx, ga, gb = torch.autograd.grad(y, (x, ours.lora_A.weight, ours.lora_B.weight), g)
    y_ref = base(x) + (x @ A.T) @ B.T * ours.scaling  # PEFT: lora_B(lora_A(dropout(x))) * scaling
    gx_ref, ga_ref, gb_ref = torch.autograd.grad(y_ref, (x, A, B), g)
    checks = [("grad x", gx, gx_ref, 2**-7), ("grad A", ga, ga_ref, 2**-6), ("grad B", gb, gb_ref, 2**-6)]
    if tokens > 4:  # at 1 to 4 tokens bnb's forward is its less accurate inference kernel: see the docstring
        checks.append(("y", y, y_ref, 2**-7))
    for name, a, b, tol in checks:
        diff = (a.float() - b.float()).abs().max().item()
        scale = b.float().abs().max().item()
        assert diff <= tol * scale, f"{name}: max |diff| {diff:.3g}, largest value {scale:.3g}"


def test_one_token_takes_the_fused_gemv():
    """Decoding: the layer's base product is gemv_4bit_triton's (then the low-rank product is added in place)."""
    from qlora_ref.kernels.gemv_4bit import gemv_4bit_triton

    ours, _ = layers(1000, 576)
    x = torch.randn(1, 576, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        expected = gemv_4bit_triton(x, ours.weight_packed, ours.quant_state())
        expected.addmm_(x @ ours.lora_A.weight.T, ours.lora_B.weight.T, alpha=ours.scaling)
        assert torch.equal(ours(x), expected)


def test_persistent_memory_is_the_codes_constants_and_adapters():
    """Measured: what the GPU holds after the dense weight is gone is the layer's own tensors (each rounded up
    to the caching allocator's 512-byte granule), about 4.1 bits per weight plus the adapters."""
    torch.cuda.empty_cache()
    linear = nn.Linear(4096, 4096, bias=False, device="cuda", dtype=DTYPE)
    before = torch.cuda.memory_allocated() - linear.weight.numel() * linear.weight.element_size()
    ours = Q.QLoRALinear(linear, r=16, alpha=32, compute_dtype=DTYPE, adapter_dtype=DTYPE)
    del linear
    held = torch.cuda.memory_allocated() - before
    parts = ours.memory_breakdown()
    tensors = len(ours.state_dict())
    assert parts["total"] <= held <= parts["total"] + 512 * tensors, (held, parts)
    assert parts["packed_weight"] == 4096 * 4096 // 2
    assert parts["lora_A"] == parts["lora_B"] == 16 * 4096 * 2  # bf16 adapters
    assert held < 0.3 * 4096 * 4096 * 2  # against 32 MiB for the bf16 weight
