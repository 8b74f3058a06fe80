"""Triton kernel 2: 4-bit quantization (NF4 / FP4) in one launch, double quantization in a second small one.

What you will learn
-------------------
* A block reduction inside a tile: the tile is NB x BLOCKSIZE values, one quantization block per
  row, so `tl.max(|x|, axis=1)` is every block's absmax at once, with no second pass over memory.
  bitsandbytes loads, reduces through shared memory, then quantizes; here it all stays in registers.
* Counting bytes again: quantizing n bf16 values reads 2n bytes and writes n/2 (+ 4 bytes per
  block): the speed limit is the read, and the arithmetic (a 4-level decision tree per value) has
  to stay under it.
* A decision tree without branches: the NF4 tree of bitsandbytes (15 thresholds) is a binary search,
  so four `u > t` tests, each choosing the next threshold with `tl.where`, give the 4-bit code.
* Packing two codes per byte: reshape the row of codes to pairs and `tl.split` them (the inverse of
  the dequantize kernel's `tl.join`): byte = even << 4 | odd.
* Matching another implementation's floating point exactly. bitsandbytes is compiled with
  `--use_fast_math`: every float instruction flushes denormals to zero, and 1/absmax is the GPU's
  approximate reciprocal (MUFU.RCP). The kernel flushes explicitly (`_ftz`) and on the GPU emits the
  same instruction through inline PTX (`rcp.approx.ftz.f32`). An all-zero block has absmax 0 and
  reciprocal inf; 0 * inf is NaN, and the tree sends NaN to code 0, as bitsandbytes' does.
* Double quantization as bitsandbytes does it: offset = absmax.mean() (torch, so that the summation
  order is the same as bitsandbytes'), then the 8-bit blockwise kernel of blockwise_8bit.py on
  absmax - offset (the subtraction done inside that kernel).

The math (cuda_semantics.py is the spec, in PyTorch)
----------------------------------------------------
    absmax_b = max_{i in b} ftz(|x_i|)          inv_b = rcp(absmax_b)         u_i = ftz(ftz(x_i) * inv_b)
    q_i      = #{t in NF4_THRESHOLDS : u_i > t}    (FP4: sign bit u_i < 0, then a tree on |u_i|)
    byte_j   = q_{2j} << 4 | q_{2j+1}              the last block is padded with zeros (odd n: the pad nibble)

The bytes are bitsandbytes' CUDA `quantize_4bit` bytes (not its CPU ones: see cuda_semantics.py).

Measured (H100 80GB HBM3, triton 3.6, bitsandbytes 0.50.2; bench/results/kernels-nvidia-h100-80gb-hbm3.json,
key "quantize"; NF4, blocksize 64; GB/s counts 2n read + n/2 + 4n/64 written)
-----------------------------------------------------------------------------------------------------------
8192 x 28672 bf16: 0.444 ms with check=False (1355 GB/s, 5.4x bitsandbytes' 2.39 ms), 0.532 ms with the
default finiteness check (4.5x); double-quantized 0.484 ms (5.3x) / 0.569 ms (4.5x). 4096 x 4096: 0.041 ms
unchecked (6.2-6.4x), 0.13 ms checked (2x): reading the check's flag back is a host synchronisation, which
exposes the launches' Python time. Nested and checked on small weights is the weak spot (0.74-1.03x at
4096 x 4096). All fields equal bitsandbytes' on every weight. Tiles: 2048 values and 4 warps ran 4% faster
than the default 4096 (426 vs 444 us); 8192 or more, 20% slower. The kernel reaches about 45% of a
device-to-device copy (2986 GB/s): the copy's roofline is not reached yet.
"""


import numpy as np
import torch
import triton
import triton.language as tl

from ..codebooks import codebook_4bit
from ..state import QuantState
from ..validation import FLOAT_DTYPES, check_blocksize, check_float_tensor
from .launch import TRITON_TYPES, compile_for, launch
from .twins import interpreted, twin

__all__ = ["compile_ahead", "hardware_reciprocal", "quantize_4bit_kernel", "quantize_4bit_triton"]

DEFAULT_TILE_VALUES = 4096  # values per program (NB = TILE // BLOCKSIZE blocks, at least one)
DEFAULT_NUM_WARPS = 4
QUANT_TYPES = {"nf4": 0, "fp4": 1}


@triton.jit
def _ftz(v):
    """Denormals to a zero of their sign (what bitsandbytes' .FTZ instructions do); NaN stays NaN."""
    return tl.where(tl.abs(v) < 1.1754943508222875e-38, v * 0.0, v)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _reciprocal(absmax, HW_RCP: tl.constexpr):
    """rcp(absmax) with flush to zero: the GPU's rcp.approx.ftz.f32 (MUFU.RCP, bitsandbytes' 1.0f / absmax
    under --use_fast_math), or the correctly rounded 1/x in the interpreter (numpy has no MUFU)."""
    if HW_RCP:
        bits = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [absmax.to(tl.uint32, bitcast=True)],
                                         dtype=tl.uint32, is_pure=True, pack=1)
        inv = bits.to(tl.float32, bitcast=True)
    else:
        inv = 1.0 / absmax  # IEEE: 1/0 = inf (the interpreter runs it under np.errstate)
    return _ftz(inv)


@triton.jit
def _nf4(u):
    """dQuantizeNF4 as a branch-free binary search: 4 tests, each picking the next threshold."""
    b8 = u > 0.039790149778127670288
    t = tl.where(b8, 0.38931253552436828613, -0.33967941999435424805)
    b4 = u > t
    t = tl.where(b8, tl.where(b4, 0.64278692007064819336, 0.20352125167846679688),
                 tl.where(b4, -0.13791173696517944336, -0.61063289642333984375))
    b2 = u > t
    t = tl.where(b8,
                 tl.where(b4, tl.where(b2, 0.86147838830947875977, 0.50166338682174682617),
                          tl.where(b2, 0.29201376438140869141, 0.12025525420904159546)),
                 tl.where(b4, tl.where(b2, -0.045525018125772476196, -0.23460739850997924805),
                          tl.where(b2, -0.459995269775390625, -0.84809643030166625977)))
    b1 = u > t
    return b8.to(tl.int32) * 8 + b4.to(tl.int32) * 4 + b2.to(tl.int32) * 2 + b1.to(tl.int32)


@triton.jit
def _fp4(u):
    """dQuantizeFP4: rank r of |u| among 7 thresholds (3 tests), bits r ^ ((r & 2) << 1), sign u < 0."""
    a = tl.abs(u)
    b4 = a > 0.2916666567325592041
    t = tl.where(b4, 0.58333301544189453125, 0.0859375)
    b2 = a > t
    t = tl.where(b4, tl.where(b2, 0.8333333134651184082, 0.4166666865348815918),
                 tl.where(b2, 0.20833332836627960205, 0.0026041700039058923721))
    b1 = a > t
    r = b4.to(tl.int32) * 4 + b2.to(tl.int32) * 2 + b1.to(tl.int32)
    return (r ^ ((r & 2) << 1)) + (u < 0).to(tl.int32) * 8


@triton.jit
def _quantize_tile(x_ptr, packed_ptr, absmax_ptr, first_block, n, BLOCKSIZE: tl.constexpr, NB: tl.constexpr,
                   QUANT_TYPE: tl.constexpr, HW_RCP: tl.constexpr, MASKED: tl.constexpr):
    rows = tl.arange(0, NB)
    cols = tl.arange(0, BLOCKSIZE)
    block = first_block + rows  # int64 [NB]
    index = block[:, None] * BLOCKSIZE + cols[None, :]  # [NB, BLOCKSIZE] value offsets
    if MASKED:  # BlockLoad's padding: values past the end read as 0
        x = tl.load(x_ptr + index, mask=index < n, other=0.0).to(tl.float32)
    else:
        x = tl.load(x_ptr + index).to(tl.float32)
    x = _ftz(x)
    absmax = tl.reduce(tl.abs(x), 1, _max_nan)  # [NB]; NaN if the block holds one (the wrapper refuses it)
    u = _ftz(x * _reciprocal(absmax, HW_RCP)[:, None])
    if QUANT_TYPE == 0:
        q = _nf4(u)
    else:
        q = _fp4(u)
    high, low = tl.split(tl.reshape(q, (NB, BLOCKSIZE // 2, 2)))
    packed = ((high << 4) | low).to(tl.uint8)
    byte = block[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    if MASKED:
        blocks = (n + BLOCKSIZE - 1) // BLOCKSIZE
        tl.store(packed_ptr + byte, packed, mask=byte < (n + 1) // 2)
        tl.store(absmax_ptr + block, absmax, mask=block < blocks)
    else:
        tl.store(packed_ptr + byte, packed)
        tl.store(absmax_ptr + block, absmax)


@triton.jit
def quantize_4bit_kernel(
    x_ptr,  # float32 / float16 / bfloat16 [n]: the values
    packed_ptr,  # uint8 [(n + 1) // 2]: out, two codes per byte, the even value in the high nibble
    absmax_ptr,  # float32 [ceil(n / BLOCKSIZE)]: out, max |x| per block
    n,  # number of values (may be odd)
    BLOCKSIZE: tl.constexpr,  # values per absmax: 32 ... 4096
    NB: tl.constexpr,  # blocks per program (a power of two)
    QUANT_TYPE: tl.constexpr,  # 0: NF4, 1: FP4
    HW_RCP: tl.constexpr,  # True on a GPU: the reciprocal is the MUFU.RCP instruction, as in bitsandbytes
):
    pid = tl.program_id(0)
    first_block = pid.to(tl.int64) * NB
    if (first_block + NB) * BLOCKSIZE <= n:  # the whole tile exists: no masks
        _quantize_tile(x_ptr, packed_ptr, absmax_ptr, first_block, n, BLOCKSIZE, NB, QUANT_TYPE, HW_RCP, MASKED=False)
    else:
        _quantize_tile(x_ptr, packed_ptr, absmax_ptr, first_block, n, BLOCKSIZE, NB, QUANT_TYPE, HW_RCP, MASKED=True)


@triton.jit
def reciprocal_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = rcp.approx.ftz(a): the GPU's reciprocal instruction, for cuda_semantics.reciprocal."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i, mask=i < n, other=1.0)
    tl.store(out_ptr + i, _reciprocal(_ftz(a), True), mask=i < n)


INTERPRETED = interpreted(quantize_4bit_kernel)


def _twin(interpret: bool):
    """This module loaded with TRITON_INTERPRET=1 (interpret=True) or =0: see qlora_ref.kernels.twins."""
    return twin(__name__, __file__, interpret, INTERPRETED)


def hardware_reciprocal(a: torch.Tensor) -> torch.Tensor:
    """rcp.approx.ftz.f32 of each float32 value of a CUDA tensor (flushed to zero like MUFU.RCP.FTZ)."""
    if not a.is_cuda:
        raise ValueError("hardware_reciprocal runs the GPU's instruction: it needs a CUDA tensor")
    if INTERPRETED:
        return _twin(interpret=False).hardware_reciprocal(a)
    a = a.float().contiguous()
    out = torch.empty_like(a)
    if a.numel():
        reciprocal_kernel[(triton.cdiv(a.numel(), 1024),)](a, out, a.numel(), BLOCK=1024)
    return out


def launch_config(blocksize: int, tile_values=None, num_warps=None):
    """(NB, num_warps): blocks per program so that a program holds about `tile_values` values."""
    tile = tile_values or DEFAULT_TILE_VALUES
    if tile < 1 or tile & (tile - 1):
        raise ValueError(f"tile_values must be a power of two, got {tile}")
    return max(1, tile // blocksize), num_warps or DEFAULT_NUM_WARPS


def quantize_4bit_triton(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False,
                         *, check: bool = True, tile_values=None, num_warps=None, hw_rcp=None):
    """(packed [(n + 1) // 2, 1] uint8, QuantState): bitsandbytes' CUDA quantize_4bit, byte for byte.

    On a CUDA GPU one launch quantizes and packs (double_quant adds torch's mean and one 8-bit launch).
    CPU tensors run the same kernels in Triton's interpreter (slow; for learning and tests), with the
    correctly rounded reciprocal in place of the GPU's MUFU.RCP (see cuda_semantics.reciprocal).
    Refuses what qlora_ref.quantize_4bit refuses; the finiteness check is fused into the kernel (a block
    holding NaN or Inf gets a non-finite absmax) and read once at the end. check=False skips that read
    (no host synchronisation). tile_values / num_warps are tuning knobs; hw_rcp forces the reciprocal.
    """
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.numel() == 0 or not x.is_cuda:
        check_float_tensor(x)  # the reference's checks and messages (on a GPU: the finiteness part is fused)
    check_blocksize(blocksize)
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4' (bitsandbytes' CUDA kernels), got {quant_type!r}")
    device = x.device
    if (device.type == "cpu") != INTERPRETED:
        return _twin(interpret=device.type == "cpu").quantize_4bit_triton(
            x, blocksize, quant_type, double_quant, check=check, tile_values=tile_values, num_warps=num_warps,
            hw_rcp=hw_rcp)
    flat = x.reshape(-1) if x.is_contiguous() else x.contiguous().reshape(-1)
    n = flat.numel()
    blocks = -(-n // blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=device)
    absmax = torch.empty(blocks, dtype=torch.float32, device=device)
    nb, warps = launch_config(blocksize, tile_values, num_warps)
    hw_rcp = not INTERPRETED if hw_rcp is None else bool(hw_rcp)
    grid = (triton.cdiv(blocks, nb), 1, 1)
    # the interpreter's 1/0 and 0 * inf, as on the GPU; enable_fp_fusion=False: one rounding per operation
    with np.errstate(divide="ignore", invalid="ignore"):
        launch(quantize_4bit_kernel, CONSTEXPRS, grid, (flat, packed, absmax, n),
               (blocksize, nb, QUANT_TYPES[quant_type], hw_rcp), warps, enable_fp_fusion=False)
    state = QuantState(absmax=absmax, shape=x.shape, code=_code(quant_type, device), dtype=x.dtype,
                       blocksize=blocksize, quant_type=quant_type)
    if double_quant:
        from .blockwise_8bit import compress_absmax_triton

        state.absmax, state.offset, state.state2 = compress_absmax_triton(absmax, hw_rcp=hw_rcp)
    if check and not bool(torch.isfinite(absmax).all()):
        check_float_tensor(x)  # raises, naming the first non-finite value
    return packed, state


_CODES = {}


def _code(quant_type, device):
    key = (quant_type, device)
    if key not in _CODES:
        _CODES[key] = codebook_4bit(quant_type).to(device)
    return _CODES[key].clone()


CONSTEXPRS = ("BLOCKSIZE", "NB", "QUANT_TYPE", "HW_RCP")


def compile_ahead(capability: int, dtype: torch.dtype = torch.float16, blocksize: int = 64, quant_type: str = "nf4",
                  *, tile_values: int = DEFAULT_TILE_VALUES, num_warps=None):
    """Compile quantize_4bit_kernel for a GPU that need not be here (75: a Colab T4, 80, 90: H100).

    Returns Triton's CompiledKernel (`.asm["ptx"]`, `.asm["cubin"]`). Pointers are declared 16-byte
    aligned and n a multiple of 16, as the launcher finds them for fresh torch tensors.
    """
    nb, warps = launch_config(blocksize, tile_values, num_warps)
    pointers = {"x_ptr": "*" + TRITON_TYPES[dtype], "packed_ptr": "*u8", "absmax_ptr": "*fp32"}
    constexprs = {"BLOCKSIZE": blocksize, "NB": nb, "QUANT_TYPE": QUANT_TYPES[quant_type], "HW_RCP": True}
    return compile_for(_twin(interpret=False).quantize_4bit_kernel, capability, pointers, {"n": "i32"}, constexprs,
                       warps)
