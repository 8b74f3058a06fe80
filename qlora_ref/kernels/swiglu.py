"""Fused kernel: SwiGLU's gate, silu(g) * u, forward and backward in one elementwise pass each.

In llama.MLP, `F.silu(gate) * up` is two kernels, and autograd keeps three [tokens, f] tensors for the backward:
g (silu's input), silu(g) and u (the product's inputs). Here the forward writes only h and the backward recomputes
the sigmoid from g, so two tensors are kept and each pass reads and writes every value once:

    forward    s = sigmoid(g)      h = round(round(g s) u)           (round: to the dtype, as torch's two ops do)
    backward   dg = dh u s (1 + g (1 - s))      du = dh round(g s)

silu'(g) = s + g s (1 - s) = s (1 + g (1 - s)). tests/test_fused.py holds the results within the unfused ops'
own error against float64.
"""

import torch
import triton
import triton.language as tl

from .bf16 import round_to_bf16
from .launch import TRITON_TYPES, compile_for
from .twins import interpreted, twin

__all__ = ["compile_ahead", "swiglu"]

_round_to_bf16 = triton.jit(round_to_bf16)


@triton.jit
def _round(value, like_ptr, SOFT_BF16: tl.constexpr):
    """float32 -> the dtype of like_ptr, then back to float32 (SOFT_BF16: bfloat16 by integers, in the interpreter)."""
    if SOFT_BF16:
        return _round_to_bf16(value).to(tl.float32)
    return value.to(like_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def swiglu_forward_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    silu = _round(g / (1.0 + tl.exp(-g)), h_ptr, SOFT_BF16)
    tl.store(h_ptr + offs, _round(silu * u, h_ptr, SOFT_BF16).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def swiglu_backward_kernel(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    dg = dh * u * s * (1.0 + g * (1.0 - s))
    du = dh * _round(g * s, dg_ptr, SOFT_BF16)
    tl.store(dg_ptr + offs, _round(dg, dg_ptr, SOFT_BF16).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, _round(du, du_ptr, SOFT_BF16).to(du_ptr.dtype.element_ty), mask=mask)


INTERPRETED = interpreted(swiglu_forward_kernel)
# values per program: 1,024 on a GPU; the interpreter (numpy, one program at a time) takes 2^20 at once
BLOCK = 2**20 if INTERPRETED else 1024


def _twin(interpret: bool):
    """This module loaded with TRITON_INTERPRET=1 (interpret=True) or =0: see qlora_ref.kernels.twins."""
    return twin(__name__, __file__, interpret, INTERPRETED)


def _forward(g, u):
    h = torch.empty_like(g)
    swiglu_forward_kernel[(triton.cdiv(g.numel(), BLOCK),)](
        g, u, h, g.numel(), BLOCK=BLOCK, SOFT_BF16=INTERPRETED and g.dtype == torch.bfloat16, num_warps=4)
    return h


def _backward(g, u, dh):
    dg, du = torch.empty_like(g), torch.empty_like(u)
    swiglu_backward_kernel[(triton.cdiv(g.numel(), BLOCK),)](
        g, u, dh, dg, du, g.numel(), BLOCK=BLOCK, SOFT_BF16=INTERPRETED and g.dtype == torch.bfloat16, num_warps=4)
    return dg, du


class _SwiGLU(torch.autograd.Function):
    """Saves g and u; `_twin` picks the copy of this module whose kernels run on their device."""

    @staticmethod
    def forward(ctx, g, u):
        g, u = g.contiguous(), u.contiguous()
        ctx.save_for_backward(g, u)
        return _twin(interpret=g.device.type == "cpu")._forward(g, u)

    @staticmethod
    def backward(ctx, dh):
        g, u = ctx.saved_tensors
        return _twin(interpret=g.device.type == "cpu")._backward(g, u, dh.contiguous())


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up with autograd, one kernel each way. gate and up: the same shape, dtype and device (float32,
    float16 or bfloat16; a CUDA GPU runs the compiled kernels, a CPU Triton's interpreter)."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"gate and up must share shape, dtype and device; got {tuple(gate.shape)} {gate.dtype} "
                         f"{gate.device} and {tuple(up.shape)} {up.dtype} {up.device}")
    if gate.dtype not in TRITON_TYPES:
        raise TypeError(f"swiglu takes float32, float16 or bfloat16 tensors, got {gate.dtype}")
    return _SwiGLU.apply(gate, up)


def compile_ahead(capability: int, dtype: torch.dtype = torch.float16):
    """The forward and backward kernels compiled for compute capability `capability` (75: a T4), no GPU needed."""
    t = "*" + TRITON_TYPES[dtype]
    kernels = _twin(interpret=False)
    forward = compile_for(kernels.swiglu_forward_kernel, capability, {"g_ptr": t, "u_ptr": t, "h_ptr": t},
                          {"n": "i32"}, {"BLOCK": kernels.BLOCK, "SOFT_BF16": False}, 4)
    backward = compile_for(kernels.swiglu_backward_kernel, capability,
                           {"g_ptr": t, "u_ptr": t, "dh_ptr": t, "dg_ptr": t, "du_ptr": t}, {"n": "i32"},
                           {"BLOCK": kernels.BLOCK, "SOFT_BF16": False}, 4)
    return forward, backward
