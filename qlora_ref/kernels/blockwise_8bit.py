"""Triton kernel 3: 8-bit blockwise quantization with the dynamic map, and its dequantization.

What you will learn
-------------------
* A binary search as straight-line code: bitsandbytes' dQuantize<0> walks the sorted 256-level code
  in 7 halving steps (pivot 127, +-64, +-32, ... +-1). Every value of the tile takes its own path,
  so the kernel keeps a vector of pivots and gathers code[pivot] with `tl.load(code_ptr + pivot)` at
  each step (the 1 KB table stays in the L1 cache). `tl.static_range` unrolls the 7 steps.
* The last step does not pick the nearest level by a precomputed midpoint table: it compares with
  (upper + val) * 0.5 of the two levels the search ended between, and the tie rule depends on the
  side (u > val: a tie goes down; u <= val: a tie goes up). Reproducing bitsandbytes' bytes means
  reproducing this path, not "the nearest level".
* Fusing an elementwise prologue: double quantization quantizes absmax - mean(absmax); the kernel
  subtracts the offset itself (an IEEE float32 subtraction, as torch's) instead of materializing it.
* The same CUDA details as the 4-bit kernel: denormals flushed, 1/absmax by MUFU.RCP on the GPU,
  an all-zero block gives 0 * inf = NaN, which the search sends to index 0.

    absmax_b = max ftz(|x_i|)      u_i = ftz(ftz(x_i) * rcp(absmax_b))      q_i = dQuantize<0>(code, u_i)
    dequantize: x^_i = ftz(code[q_i] * absmax_b), cast to fp32 / fp16 / bf16 (bitsandbytes' FMUL.FTZ)

The bytes are bitsandbytes' CUDA `quantize_blockwise` bytes (cuda_semantics.pivot_search is the spec).
bitsandbytes' CUDA path refuses blocksize 32 for 8-bit; these kernels accept it (same recipe).
"""


import numpy as np
import torch
import triton
import triton.language as tl

from ..codebooks import dynamic_map
from ..state import QuantState
from ..validation import check_blocksize, check_code_8bit, check_float_tensor
from .bf16 import round_to_bf16
from .twins import interpreted, twin

__all__ = ["compress_absmax_triton", "dequantize_blockwise_triton", "quantize_blockwise_triton"]

DEFAULT_TILE_VALUES = 2048


@triton.jit
def _ftz(v):
    return tl.where(tl.abs(v) < 1.1754943508222875e-38, v * 0.0, v)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _reciprocal(absmax, HW_RCP: tl.constexpr):
    if HW_RCP:
        bits = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [absmax.to(tl.uint32, bitcast=True)],
                                         dtype=tl.uint32, is_pure=True, pack=1)
        inv = bits.to(tl.float32, bitcast=True)
    else:
        inv = 1.0 / absmax
    return _ftz(inv)


@triton.jit
def _pivot_search(u, code_ptr):
    """dQuantize<0>(code, u): 7 halving steps, then the midpoint test of the last bracket."""
    pivot = tl.full(u.shape, 127, tl.int32)
    lower_pivot = tl.full(u.shape, 0, tl.int32)
    upper_pivot = tl.full(u.shape, 255, tl.int32)
    lower = tl.full(u.shape, -1.0, tl.float32)
    upper = tl.full(u.shape, 1.0, tl.float32)
    val = tl.load(code_ptr + pivot)
    for k in tl.static_range(7):
        step = 64 >> k
        right = u > val
        lower_pivot = tl.where(right, pivot, lower_pivot)
        lower = tl.where(right, val, lower)
        upper_pivot = tl.where(right, upper_pivot, pivot)
        upper = tl.where(right, upper, val)
        pivot = tl.where(right, pivot + step, pivot - step)
        val = tl.load(code_ptr + pivot)
    upper = tl.where(upper_pivot == 255, tl.load(code_ptr + 255), upper)
    lower = tl.where(lower_pivot == 0, tl.load(code_ptr), lower)
    right = u > val
    up = tl.where(u > (upper + val) * 0.5, upper_pivot, pivot)
    down = tl.where(u < (lower + val) * 0.5, lower_pivot, pivot)
    return tl.where(right, up, down)


@triton.jit
def quantize_blockwise_kernel(
    x_ptr,  # float32 / float16 / bfloat16 [n]
    offset_ptr,  # float32 [1]: subtracted from every value first (SUBTRACT only)
    code_ptr,  # float32 [256]: the sorted code (the dynamic map)
    q_ptr,  # uint8 [n]: out
    absmax_ptr,  # float32 [ceil(n / BLOCKSIZE)]: out
    n,
    BLOCKSIZE: tl.constexpr,
    NB: tl.constexpr,  # blocks per program
    SUBTRACT: tl.constexpr,  # x - offset (double quantization's centring), padding stays 0
    HW_RCP: tl.constexpr,
):
    block = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    index = block[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    inside = index < n
    x = tl.load(x_ptr + index, mask=inside, other=0.0).to(tl.float32)
    if SUBTRACT:
        x = tl.where(inside, x - tl.load(offset_ptr), 0.0)
    x = _ftz(x)
    absmax = tl.reduce(tl.abs(x), 1, _max_nan)
    u = _ftz(x * _reciprocal(absmax, HW_RCP)[:, None])
    q = _pivot_search(u, code_ptr)
    tl.store(q_ptr + index, q.to(tl.uint8), mask=inside)
    tl.store(absmax_ptr + block, absmax, mask=block * BLOCKSIZE < n)


_round_to_bf16 = triton.jit(round_to_bf16)


@triton.jit
def dequantize_blockwise_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr,
                                SOFT_BF16: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    inside = index < n
    q = tl.load(q_ptr + index, mask=inside, other=0).to(tl.int32)
    absmax = tl.load(absmax_ptr + index // BLOCKSIZE, mask=inside, other=0.0)
    value = _ftz(tl.load(code_ptr + q) * absmax)
    if SOFT_BF16:
        value = _round_to_bf16(value)
    else:
        value = value.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + index, value, mask=inside)


INTERPRETED = interpreted(quantize_blockwise_kernel)


def _twin(interpret: bool):
    """This module loaded with TRITON_INTERPRET=1 (interpret=True) or =0: see qlora_ref.kernels.twins."""
    return twin(__name__, __file__, interpret, INTERPRETED)


def _quantize(flat, code, blocksize, offset, hw_rcp, tile_values=None, num_warps=4):
    n = flat.numel()
    device = flat.device
    q = torch.empty(n, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    nb = max(1, (tile_values or DEFAULT_TILE_VALUES) // blocksize)
    hw_rcp = not INTERPRETED if hw_rcp is None else bool(hw_rcp)
    grid = (triton.cdiv(absmax.numel(), nb),)
    with np.errstate(divide="ignore", invalid="ignore"):
        quantize_blockwise_kernel[grid](flat, offset if offset is not None else code, code, q, absmax, n,
                                        BLOCKSIZE=blocksize, NB=nb, SUBTRACT=offset is not None, HW_RCP=hw_rcp,
                                        num_warps=num_warps, enable_fp_fusion=False)
    return q, absmax


_DYNAMIC = {}


def _dynamic_map(device):
    if device not in _DYNAMIC:
        _DYNAMIC[device] = dynamic_map().to(device)
    return _DYNAMIC[device]


def quantize_blockwise_triton(x: torch.Tensor, code=None, blocksize: int = 256, *, hw_rcp=None, tile_values=None):
    """(codes uint8 in x's shape, QuantState): bitsandbytes' CUDA quantize_blockwise, byte for byte.

    CPU tensors run in Triton's interpreter, with the correctly rounded reciprocal (cuda_semantics).
    """
    check_float_tensor(x)
    check_blocksize(blocksize)
    if code is not None:
        check_code_8bit(code.cpu() if isinstance(code, torch.Tensor) else code)
    if (x.device.type == "cpu") != INTERPRETED:
        return _twin(interpret=x.device.type == "cpu").quantize_blockwise_triton(
            x, code, blocksize, hw_rcp=hw_rcp, tile_values=tile_values)
    code = _dynamic_map(x.device) if code is None else code.to(x.device, torch.float32).contiguous()
    q, absmax = _quantize(x.contiguous().reshape(-1), code, blocksize, None, hw_rcp, tile_values)
    state = QuantState(absmax=absmax, shape=x.shape, code=code.clone(), dtype=x.dtype, blocksize=blocksize)
    return q.reshape(x.shape), state


def compress_absmax_triton(absmax: torch.Tensor, hw_rcp=None):
    """Double quantization as bitsandbytes does it on a GPU: offset = absmax.mean() (torch), then the 8-bit
    kernel on absmax - offset (subtracted in the kernel), blocks of 256. -> (qabsmax, offset, state2)."""
    if (absmax.device.type == "cpu") != INTERPRETED:
        return _twin(interpret=absmax.device.type == "cpu").compress_absmax_triton(absmax, hw_rcp)
    offset = absmax.mean()
    code = _dynamic_map(absmax.device)
    qabsmax, absmax2 = _quantize(absmax, code, 256, offset.reshape(1), hw_rcp)
    state2 = QuantState(absmax=absmax2, shape=absmax.shape, code=code.clone(), dtype=torch.float32, blocksize=256)
    return qabsmax, offset, state2


def dequantize_blockwise_triton(q: torch.Tensor, state: QuantState, *, tile_values: int = 1024,
                                soft_bf16=None) -> torch.Tensor:
    """x^ = ftz(code[q] * absmax) cast to state.dtype, in q's shape: bitsandbytes' CUDA dequantize_blockwise."""
    if not isinstance(state, QuantState):
        raise TypeError("dequantize_blockwise_triton needs the QuantState returned by quantize_blockwise")
    state.check_codes(q)
    if state.quant_type is not None:
        raise ValueError(f"this is a 4-bit ({state.quant_type}) state: use dequantize_4bit")
    if (q.device.type == "cpu") != INTERPRETED:
        return _twin(interpret=q.device.type == "cpu").dequantize_blockwise_triton(
            q, state, tile_values=tile_values, soft_bf16=soft_bf16)
    device = q.device
    out = torch.empty(q.shape, dtype=state.dtype, device=device)
    n = q.numel()
    soft = (INTERPRETED if soft_bf16 is None else bool(soft_bf16)) and state.dtype == torch.bfloat16
    grid = (triton.cdiv(n, tile_values),)
    dequantize_blockwise_kernel[grid](q.contiguous(), state.absmax.to(device, torch.float32).contiguous(),
                                      state.code.to(device, torch.float32).contiguous(), out, n,
                                      BLOCKSIZE=state.blocksize, TILE=tile_values, SOFT_BF16=soft,
                                      enable_fp_fusion=False)
    return out
