"""Fused kernel: rotary embeddings on q and k together, forward and backward, in one launch each way.

llama.apply_rope, x * cos + rotate_half(x) * sin, runs as six kernels for q (split, negate, concatenate, two
products, a sum) and six more for k, each reading and writing whole tensors, and rounds to the compute dtype after
each. Here one program turns a tile of rows (one head at one position each) of q and of k in registers, computing
in float32 and rounding once. With x_1, x_2 the two halves of a head and c, s the cos and sin of its angles:

    forward    y_1 = x_1 c - x_2 s          y_2 = x_2 c + x_1 s
    backward   dx_1 = dy_1 c + dy_2 s       dx_2 = dy_2 c - dy_1 s          (the rotation by minus the angle)

The cos and sin tables are llama.rope_cos_sin's ([seq, head_dim], each half repeated). tests/test_fused.py holds the
results within the unfused ops' own error against float64.
"""

import torch
import triton
import triton.language as tl

from .bf16 import round_to_bf16
from .launch import TRITON_TYPES, compile_for
from .twins import interpreted, twin

__all__ = ["compile_ahead", "rope_qk"]

_round_to_bf16 = triton.jit(round_to_bf16)


@triton.jit
def _rotate(x_ptr, cos_ptr, sin_ptr, out_ptr, program, rows, seq, HALF: tl.constexpr, ROWS: tl.constexpr,
            SIGN: tl.constexpr, SOFT_BF16: tl.constexpr):
    """Tile `program` of [rows, 2 HALF] values (row i at position i % seq), turned by SIGN times their angles."""
    row = program * ROWS + tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, HALF)[None, :]
    mask = row < rows
    position = row % seq
    c = tl.load(cos_ptr + position * 2 * HALF + cols, mask=mask, other=0.0).to(tl.float32)
    s = SIGN * tl.load(sin_ptr + position * 2 * HALF + cols, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + row * 2 * HALF + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + row * 2 * HALF + HALF + cols, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c - x2 * s
    y2 = x2 * c + x1 * s
    if SOFT_BF16:  # only under TRITON_INTERPRET=1, whose float32 -> bfloat16 cast truncates
        y1 = _round_to_bf16(y1)
        y2 = _round_to_bf16(y2)
    tl.store(out_ptr + row * 2 * HALF + cols, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + row * 2 * HALF + HALF + cols, y2.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rope_qk_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, q_rows, k_rows, seq, q_programs,
                   HALF: tl.constexpr, ROWS: tl.constexpr, SIGN: tl.constexpr, SOFT_BF16: tl.constexpr):
    """The first q_programs programs turn q's rows, the others k's: one launch for both."""
    program = tl.program_id(0)
    if program < q_programs:
        _rotate(q_ptr, cos_ptr, sin_ptr, q_out_ptr, program, q_rows, seq, HALF, ROWS, SIGN, SOFT_BF16)
    else:
        _rotate(k_ptr, cos_ptr, sin_ptr, k_out_ptr, program - q_programs, k_rows, seq, HALF, ROWS, SIGN, SOFT_BF16)


INTERPRETED = interpreted(rope_qk_kernel)


def _twin(interpret: bool):
    """This module loaded with TRITON_INTERPRET=1 (interpret=True) or =0: see qlora_ref.kernels.twins."""
    return twin(__name__, __file__, interpret, INTERPRETED)


def _rows_per_program(head_dim: int) -> int:
    """Rows a program turns: about 2,048 values on a GPU; the interpreter (one program at a time) takes 2^20."""
    return max(1, (2**20 if INTERPRETED else 2048) // head_dim)


def _launch(q, k, cos, sin, sign: float):
    """q, k: [..., seq, head_dim], contiguous; both turned by sign times the angles, in one launch."""
    seq, head_dim = q.shape[-2], q.shape[-1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    q_rows, k_rows = q.numel() // head_dim, k.numel() // head_dim
    tile = _rows_per_program(head_dim)
    q_programs = triton.cdiv(q_rows, tile)
    grid = (q_programs + triton.cdiv(k_rows, tile),)
    rope_qk_kernel[grid](q, k, cos, sin, q_out, k_out, q_rows, k_rows, seq, q_programs, HALF=head_dim // 2,
                         ROWS=tile, SIGN=sign, SOFT_BF16=INTERPRETED and q.dtype == torch.bfloat16, num_warps=4)
    return q_out, k_out


class _RopeQK(torch.autograd.Function):
    """Saves cos and sin (shared by every layer); the backward turns the gradients back by minus the angles."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        cos, sin = cos.contiguous(), sin.contiguous()
        ctx.save_for_backward(cos, sin)
        return _twin(interpret=q.device.type == "cpu")._launch(q.contiguous(), k.contiguous(), cos, sin, 1.0)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _twin(interpret=dq.device.type == "cpu")._launch(dq.contiguous(), dk.contiguous(), cos, sin, -1.0)
        return dq, dk, None, None


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """(apply_rope(q, cos, sin), apply_rope(k, cos, sin)) with autograd, in one kernel each way. q: [batch, heads,
    seq, head_dim], k: [batch, kv_heads, seq, head_dim], cos and sin: [seq, head_dim] (llama.rope_cos_sin)."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[2:] != k.shape[2:] or cos.shape != q.shape[2:] or sin.shape != cos.shape:
        raise ValueError(f"rope_qk takes q [batch, heads, seq, head_dim], k [batch, kv_heads, seq, head_dim] and cos, "
                         f"sin [seq, head_dim]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(cos.shape)}, "
                         f"{tuple(sin.shape)}")
    if q.shape[-1] % 2 or q.dtype not in TRITON_TYPES or k.dtype != q.dtype:
        raise ValueError(f"rope_qk needs an even head_dim and q, k of one float dtype; got head_dim {q.shape[-1]}, "
                         f"{q.dtype} and {k.dtype}")
    return _RopeQK.apply(q, k, cos, sin)


def compile_ahead(capability: int, dtype: torch.dtype = torch.float16, head_dim: int = 128):
    """The kernel compiled for compute capability `capability` (75: a T4), no GPU needed."""
    t = "*" + TRITON_TYPES[dtype]
    return compile_for(_twin(interpret=False).rope_qk_kernel, capability,
                       {"q_ptr": t, "k_ptr": t, "cos_ptr": t, "sin_ptr": t, "q_out_ptr": t, "k_out_ptr": t},
                       {"q_rows": "i32", "k_rows": "i32", "seq": "i32", "q_programs": "i32"},
                       {"HALF": head_dim // 2, "ROWS": max(1, 2048 // head_dim), "SIGN": 1.0, "SOFT_BF16": False}, 4)
