"""The public 4-bit API: lesson 3's blockwise quantizer, with lesson 4's double quantization.

    packed, state = quantize_4bit(W, blocksize=64, quant_type="nf4", double_quant=True)
    W_hat = dequantize_4bit(packed, state)      # W's shape and dtype

The bytes (packed codes, absmax, nested absmax, offset) and the dequantized values equal
bitsandbytes 0.50.2's `quantize_4bit(W, blocksize, compress_statistics, quant_type)` on a CPU.
One difference of shape, not of values: bitsandbytes' CPU dequantize returns [1, n] for a 1-D
input (and the transpose when the packed data is one byte); dequantize_4bit returns W's shape.
"""

import torch

from .backend import resolve_backend
from .blockwise import block_absmax, dequantize_codes, nearest_code, pack_4bit, scale_to_unit, unpack_4bit
from .codebooks import codebook_4bit
from .double_quant import compress_absmax, decompress_absmax
from .state import QuantState
from .validation import check_blocksize, check_bool, check_float_tensor


@torch.no_grad()  # the state holds constants: no autograd history of x in absmax, even when x requires grad
def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False,
                  backend: str = "auto"):
    """Packed 4-bit codes ([(n + 1) // 2, 1] uint8) and the QuantState that undoes them.

    backend "torch": this PyTorch code, bitsandbytes' CPU bytes. "triton": qlora_ref.kernels'
    one-launch kernel, bitsandbytes' CUDA bytes (NF4 and FP4; CPU tensors run in Triton's
    interpreter). "auto": triton for a CUDA tensor (NF4/FP4, triton installed), torch otherwise.
    """
    check_bool(double_quant, "double_quant")
    if resolve_backend(backend, x if quant_type in ("nf4", "fp4") else None) == "triton":
        from .kernels.quantize_4bit import quantize_4bit_triton

        return quantize_4bit_triton(x, blocksize, quant_type, double_quant)
    check_float_tensor(x)
    check_blocksize(blocksize)
    code = codebook_4bit(quant_type).to(x.device)
    flat = x.contiguous().reshape(-1).float()
    absmax = block_absmax(flat, blocksize)
    if flat.numel() % blocksize:
        # bitsandbytes stores the short last block's absmax after its clamp to 1e-38 (full blocks: before).
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    unit = scale_to_unit(flat, absmax, blocksize)
    if unit.numel() % 2:
        # An odd count leaves half a byte: bitsandbytes fills it with the code of 0.0 (not code 0).
        unit = torch.cat([unit, unit.new_zeros(1)])
    packed = pack_4bit(nearest_code(unit, code))
    state = QuantState(absmax=absmax, shape=x.shape, code=code, dtype=x.dtype, blocksize=blocksize, quant_type=quant_type)
    if double_quant:
        state.absmax, state.offset, state.state2 = compress_absmax(absmax)
    return packed, state


def dequantize_4bit(packed: torch.Tensor, state: QuantState, backend: str = "auto") -> torch.Tensor:
    """W^ = code[q] * absmax (absmax first rebuilt from its 8-bit codes if nested), in W's shape and dtype.

    backend: "torch", "triton" (qlora_ref.kernels.dequantize_4bit_triton, one launch) or "auto"
    (triton for CUDA tensors). Both give the same values, on packed's device (the state's tensors are
    moved there if they are elsewhere).
    """
    if resolve_backend(backend, packed) == "triton":
        from .kernels.dequantize_4bit import dequantize_4bit_triton

        return dequantize_4bit_triton(packed, state)
    if not isinstance(state, QuantState) or state.quant_type is None:
        raise TypeError("dequantize_4bit needs the QuantState returned by quantize_4bit")
    state.check_codes(packed)
    absmax = decompress_absmax(state.absmax, state.offset, state.state2) if state.nested else state.absmax
    codes = unpack_4bit(packed, state.numel)
    values = dequantize_codes(codes, state.code, absmax, state.blocksize)
    return values.to(state.dtype).reshape(state.shape)
