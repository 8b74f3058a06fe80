"""Fused kernel: RMSNorm, forward and backward, one pass over each row.

qlora_ref.llama.RMSNorm, written with torch ops, launches a kernel per op (cast to float32, square, mean, add eps,
rsqrt, multiply, cast back, multiply by the weight) and autograd keeps a float32 copy of the input (4 bytes a
value) for the backward. Here one program normalizes a tile of whole rows in registers and keeps only the input,
in its own dtype, and one float32 number per row, r = 1 / sqrt(mean(x^2) + eps):

    forward    x^ = x r                 y = w * round(x^)          (round: to the input's dtype, as llama.RMSNorm)
    backward   g = dy * w               dx = r * (g - x^ * mean(g * x^))        dw = sum over rows of dy * round(x^)

The backward's formula: y_i depends on every x_j of its row through r, d r / d x_j = -r^3 x_j / D, so
dx_j = r g_j - r^3 x_j sum_i(g_i x_i) / D = r (g_j - x^_j mean(g x^)). dw needs a sum over all rows: each
program sums its tile's rows into one float32 row of partial sums, and torch adds the partial rows.

The results equal llama.RMSNorm's to float32 rounding (the sums run in another order); tests/test_fused.py holds
them within the error of the unfused module itself against float64.
"""

import torch
import triton
import triton.language as tl

from .bf16 import round_to_bf16
from .launch import TRITON_TYPES, compile_for
from .twins import interpreted, twin

__all__ = ["compile_ahead", "rms_norm"]

_round_to_bf16 = triton.jit(round_to_bf16)


@triton.jit
def _to_out(value, out_ptr, SOFT_BF16: tl.constexpr):
    """float32 -> the dtype out_ptr points to, rounding to nearest even (SOFT_BF16: by integers, in the interpreter)."""
    if SOFT_BF16:
        return _round_to_bf16(value)
    return value.to(out_ptr.dtype.element_ty)


@triton.jit
def _row_sum(values):
    """tl.sum(values, 1), spelled so that the interpreted twin runs it too (tl.sum is itself a jit function, bound
    when triton was imported, which the twin's kernels cannot call)."""
    return tl.reduce(values, 1, tl.standard._sum_combine)


@triton.jit
def rms_norm_forward_kernel(x_ptr, w_ptr, y_ptr, r_ptr, rows, D, eps,
                            ROWS: tl.constexpr, BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr,
                            SOFT_BF16_Y: tl.constexpr):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]  # a tile of ROWS rows, each whole
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (row < rows) & (cols < D)
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(_row_sum(x * x) / D + eps)  # [ROWS]
    x_hat = _to_out(x * r[:, None], x_ptr, SOFT_BF16)  # round(x^), in the input's dtype
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * D + cols, _to_out(w * x_hat.to(tl.float32), y_ptr, SOFT_BF16_Y), mask=mask)
    tl.store(r_ptr + row, r[:, None], mask=row < rows)


@triton.jit
def rms_norm_backward_kernel(x_ptr, w_ptr, r_ptr, dy_ptr, dx_ptr, dw_partial_ptr, rows, D,
                             ROWS: tl.constexpr, BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr,
                             SOFT_BF16_DX: tl.constexpr):
    program = tl.program_id(0)
    row = program * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (row < rows) & (cols < D)
    x = tl.load(x_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * D + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row, mask=row < rows, other=0.0)  # [ROWS, 1]
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    x_hat = x * r
    g = dy * w
    dx = r * (g - x_hat * (_row_sum(g * x_hat) / D)[:, None])
    tl.store(dx_ptr + row * D + cols, _to_out(dx, dx_ptr, SOFT_BF16_DX), mask=mask)
    # this tile's share of dw = sum over rows of dy * round(x^): one float32 row per program, added up by torch
    dw = tl.reduce(dy * _to_out(x_hat, x_ptr, SOFT_BF16).to(tl.float32), 0, tl.standard._sum_combine)
    tl.store(dw_partial_ptr + program * D + cols, dw[None, :], mask=cols < D)


INTERPRETED = interpreted(rms_norm_forward_kernel)


def _twin(interpret: bool):
    """This module loaded with TRITON_INTERPRET=1 (interpret=True) or =0: see qlora_ref.kernels.twins."""
    return twin(__name__, __file__, interpret, INTERPRETED)


def _soft(dtype) -> bool:
    return INTERPRETED and dtype == torch.bfloat16


def _rows_per_program(D: int) -> int:
    """Rows a program normalizes: on a GPU a tile of about 4,096 values; the interpreter (numpy, one program at a
    time) takes about 2^20 at once."""
    return max(1, (2**20 if INTERPRETED else 4096) // triton.next_power_of_2(D))


def _forward(x2d, weight, eps):
    rows, D = x2d.shape
    out_dtype = torch.promote_types(x2d.dtype, weight.dtype)  # as `weight * x^.to(x.dtype)` in torch
    y = torch.empty((rows, D), dtype=out_dtype, device=x2d.device)
    r = torch.empty(rows, dtype=torch.float32, device=x2d.device)
    tile = _rows_per_program(D)
    rms_norm_forward_kernel[(triton.cdiv(rows, tile),)](x2d, weight, y, r, rows, D, eps, ROWS=tile,
                                                        BLOCK=triton.next_power_of_2(D), SOFT_BF16=_soft(x2d.dtype),
                                                        SOFT_BF16_Y=_soft(out_dtype), num_warps=4)
    return y, r


def _backward(x2d, weight, r, dy2d):
    rows, D = x2d.shape
    dx = torch.empty_like(x2d)
    tile = _rows_per_program(D)
    programs = triton.cdiv(rows, tile)
    dw_partial = torch.empty((programs, D), dtype=torch.float32, device=x2d.device)
    rms_norm_backward_kernel[(programs,)](x2d, weight, r, dy2d.contiguous(), dx, dw_partial, rows, D, ROWS=tile,
                                          BLOCK=triton.next_power_of_2(D), SOFT_BF16=_soft(x2d.dtype),
                                          SOFT_BF16_DX=_soft(dx.dtype), num_warps=4)
    return dx, dw_partial.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    """Saves x (its own dtype) and r (float32 per row) for the backward; `_twin` picks the copy of this module whose
    kernels run on x's device."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        y, r = _twin(interpret=x.device.type == "cpu")._forward(x2d, weight.contiguous(), eps)
        ctx.save_for_backward(x2d, weight, r)
        ctx.shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, r = ctx.saved_tensors
        dx, dw = _twin(interpret=x2d.device.type == "cpu")._backward(x2d, weight.contiguous(), r,
                                                                     dy.reshape(x2d.shape))
        return dx.view(ctx.shape), dw if ctx.needs_input_grad[1] else None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * round(x / sqrt(mean(x^2) + eps)) over the last dimension, with autograd: llama.RMSNorm in one kernel
    each way. x: float32, float16 or bfloat16 on a CUDA GPU (compiled) or a CPU (Triton's interpreter)."""
    if x.dtype not in TRITON_TYPES or weight.dtype not in TRITON_TYPES:
        raise TypeError(f"rms_norm takes float32, float16 or bfloat16 tensors, got x {x.dtype}, weight {weight.dtype}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be 1-D of x's last dimension {x.shape[-1]}, got shape {tuple(weight.shape)}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight on {weight.device}")
    return _RMSNorm.apply(x, weight, float(eps))


def compile_ahead(capability: int, dtype: torch.dtype = torch.float16, hidden_size: int = 4096):
    """The forward and backward kernels compiled for compute capability `capability` (75: a T4), no GPU needed."""
    block = triton.next_power_of_2(hidden_size)
    t = "*" + TRITON_TYPES[dtype]
    kernels = _twin(interpret=False)
    tile = max(1, 4096 // block)  # as _rows_per_program on a GPU
    forward = compile_for(kernels.rms_norm_forward_kernel, capability,
                          {"x_ptr": t, "w_ptr": t, "y_ptr": t, "r_ptr": "*fp32"},
                          {"rows": "i32", "D": "i32", "eps": "fp32"},
                          {"ROWS": tile, "BLOCK": block, "SOFT_BF16": False, "SOFT_BF16_Y": False}, 4,
                          aligned=["x_ptr", "w_ptr", "y_ptr", "r_ptr", "rows", "D"])
    backward = compile_for(kernels.rms_norm_backward_kernel, capability,
                           {"x_ptr": t, "w_ptr": t, "r_ptr": "*fp32", "dy_ptr": t, "dx_ptr": t,
                            "dw_partial_ptr": "*fp32"}, {"rows": "i32", "D": "i32"},
                           {"ROWS": tile, "BLOCK": block, "SOFT_BF16": False, "SOFT_BF16_DX": False}, 4)
    return forward, backward
