"""8-bit blockwise quantization with the dynamic map (lesson 4's double quantization, lesson 7's Adam).

Same recipe as 4-bit (absmax per block, nearest of the code's levels) with a 256-level code and one
byte per value. Two roundings:

- "lut" (default): bitsandbytes 0.50.2's CPU kernel. It does not search the code: it rounds u to a
  grid of 65536 points on [-1, 1],
      i = int((clamp(u, -1, 1) + 1) * 0.5 * 65535 + 0.5),
  and reads the code index from a table built once per code (the level nearest to grid point i).
  Fast, and a value close to a midpoint can land on the farther level; this is how bitsandbytes'
  CPU bytes are made, so it is what bit-exactness on a CPU means.
- "nearest": the true nearest level (ties to the lower one), as in lesson 3.
"""

import functools

import torch

from .backend import resolve_backend
from .blockwise import block_absmax, dequantize_codes, nearest_code, scale_to_unit
from .codebooks import derived_table, dynamic_map
from .state import QuantState
from .validation import check_blocksize, check_code_8bit, check_float_tensor

LUT_SIZE = 65536


def lut_table(code: torch.Tensor, device) -> torch.Tensor:
    """The 65536-entry table: for each grid point -1 + 2i/65535 the index of the nearest level of `code`
    (cached per code tensor and device: an 8-bit optimizer re-encodes with the same two codes every step)."""
    return derived_table(code, device, _build_lut_table)


def _build_lut_table(code: torch.Tensor, device) -> torch.Tensor:
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32, device=device)) / (LUT_SIZE - 1)
    return torch.searchsorted(midpoints.to(device), grid)  # how many midpoints lie strictly below each point


def lut_code_index(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes 0.50.2's CPU rounding through a 65536-entry table (see the module docstring)."""
    table = lut_table(code, flat.device)
    # The C++ kernel multiplies by 1/absmax everywhere (tail included) and writes code 0 for an
    # all-zero block; a zero inverse keeps those blocks' arithmetic finite until they are overwritten.
    inverse = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    n = flat.numel()
    unit = flat * inverse.repeat_interleave(blocksize)[:n]
    # A denormal absmax has 1/absmax = inf: its block's zeros become 0 * inf = NaN, which bitsandbytes'
    # kernel stores as the table's first entry (code 0); its other values become +-inf, clamped to +-1.
    index = torch.nan_to_num((unit.clamp(-1, 1) + 1.0) * 0.5 * (LUT_SIZE - 1) + 0.5, nan=0.0).to(torch.int32)
    codes = table[index]
    return torch.where((absmax == 0).repeat_interleave(blocksize)[:n], 0, codes)


@functools.lru_cache(maxsize=None)
def shared_dynamic_map(signed: bool, device: torch.device) -> torch.Tensor:
    """One dynamic_map(signed) tensor per device, for every caller that does not bring its own code.

    Tables derived from a code are cached per code tensor (codebooks.derived_table), so sharing one
    tensor builds the 65536-entry rounding table once per process instead of once per call.
    """
    return dynamic_map(signed=signed).to(device)


@torch.no_grad()  # the state holds constants: no autograd history of x in absmax, even when x requires grad
def quantize_blockwise(x: torch.Tensor, code=None, blocksize: int = 256, rounding: str = "lut", backend: str = "auto"):
    """8-bit codes of `x` (uint8, x's shape) and their QuantState (absmax per block, code, dtype).

    backend "torch" rounds as `rounding` says (bitsandbytes' CPU bytes with "lut"); "triton" runs
    bitsandbytes' CUDA recipe (binary search) and takes only the default rounding; "auto" is triton
    for a CUDA tensor with the default rounding, torch otherwise.
    """
    if resolve_backend(backend, x if rounding == "lut" else None) == "triton":
        if rounding != "lut":
            raise ValueError("backend='triton' rounds as bitsandbytes' CUDA kernel; rounding applies to backend='torch'")
        from .kernels.blockwise_8bit import quantize_blockwise_triton

        return quantize_blockwise_triton(x, code, blocksize)
    check_float_tensor(x)
    check_blocksize(blocksize)
    code = shared_dynamic_map(True, x.device) if code is None else code
    check_code_8bit(code)
    code = code.to(x.device)
    flat = x.contiguous().reshape(-1).float()
    absmax = block_absmax(flat, blocksize)
    if rounding == "lut":
        codes = lut_code_index(flat, absmax, blocksize, code)
    elif rounding == "nearest":
        codes = nearest_code(scale_to_unit(flat, absmax, blocksize), code)
    else:
        raise ValueError(f"rounding must be 'lut' or 'nearest', got {rounding!r}")
    state = QuantState(absmax=absmax, shape=x.shape, code=code.clone(), dtype=x.dtype, blocksize=blocksize)
    return codes.to(torch.uint8).reshape(x.shape), state


def dequantize_blockwise(q: torch.Tensor, state: QuantState, backend: str = "auto") -> torch.Tensor:
    """x^ = code[q] * absmax in float32, cast to state.dtype, in q's shape (backend: see quantize_blockwise;
    the Triton kernel flushes denormal products to zero, as bitsandbytes' CUDA kernel does)."""
    if resolve_backend(backend, q) == "triton":
        from .kernels.blockwise_8bit import dequantize_blockwise_triton

        return dequantize_blockwise_triton(q, state)
    state.check_codes(q)
    if state.quant_type is not None:
        raise ValueError(f"this is a 4-bit ({state.quant_type}) state: use dequantize_4bit")
    values = dequantize_codes(q, state.code, state.absmax, state.blocksize)
    return values.to(state.dtype).reshape(q.shape)
