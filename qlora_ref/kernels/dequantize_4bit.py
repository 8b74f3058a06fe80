"""Triton kernel 1: 4-bit dequantization (NF4 / FP4, plain or double-quantized) in one launch.

What you will learn
-------------------
* How to judge a memory-bound kernel: count the bytes it must move and compare its speed with a
  device-to-device copy of the same size, the practical roofline. Dequantizing n values to bf16 reads
  n/2 packed bytes and writes 2n bytes (plus one absmax per block): 2.5 bytes per value, almost all of
  it the output. Arithmetic is a few operations per value; the kernel can only be as fast as memory.
* Unpacking two 4-bit codes per byte with a shift and a mask, and putting the two halves back in
  order with `tl.join` + `tl.reshape` (the same thing `tl.interleave` does), so that each thread
  writes one contiguous run of values.
* A lookup table as a gather: `tl.load(code_ptr + nibble)` reads a 16-entry float32 table
  that stays in the L1 cache after the first touch.
* Choosing a tile shape for the memory system: the tile is ROWS x COLS packed bytes, and COLS is
  picked so that one row's output is exactly 16 bytes (4 bytes in -> 8 bf16 values out). Triton
  then hands each thread whole rows, neighbouring threads neighbouring rows: loads and 16-byte
  stores are coalesced as they are. With wide rows (a whole quantization block per row) Triton
  must shuffle the output through shared memory before storing it (visible in the PTX as st.shared
  and bar.sync); with two strided stores (even values, odd values) the stores become 2-byte scalars.
  `python -m bench.kernels run` measures all three.
* A row never straddles two quantization blocks (COLS <= blocksize / 2), so the kernel loads one
  absmax per row, broadcast along it, instead of one per value.
* Fusing double dequantization into the same launch: absmax = code2[qabsmax] * absmax2 + offset.
  bitsandbytes computes the product in one kernel and adds the offset in another, so each is
  rounded to float32 on its own. A fused multiply-add (one rounding) would differ in the last bit
  now and then: the kernel is compiled with `enable_fp_fusion=False`, which stops the compiler from
  contracting the two (tests/test_triton_dequantize.py checks that the PTX has no `fma`).
* Masks cost speed: full tiles take an unmasked path (whole-row vector loads and stores); only the
  last tile, which may end in the middle of a byte (odd n), is masked.
* Launch overhead: for a 4096 x 4096 weight the GPU needs about as long as Python needs to launch
  the kernel through `kernel[grid](...)`. `launch` (qlora_ref.kernels.launch) keeps the compiled
  kernel of each specialization and calls its launcher directly.
* Running without a GPU: CPU tensors go through Triton's interpreter (TRITON_INTERPRET=1, see
  `_twin`), and `compile_ahead` compiles for any NVIDIA GPU (a Colab T4 is sm_75) with no GPU here.

The math (lessons 3 and 4)
--------------------------
    byte_j   = q_{2j} << 4 | q_{2j+1}                                   even value in the high nibble
    absmax_b = code2[qabsmax_b] * absmax2[b // 256] + offset            nested (double quant)
    absmax_b = absmax_b                                                 plain
    x^_i     = (code[q_i] * absmax_{i // B}) cast to fp32 / fp16 / bf16  float32 product, one rounding

The result is bit-for-bit bitsandbytes' `dequantize_4bit` (and `qlora_ref.dequantize_4bit`).

Measured (H100 80GB HBM3, triton 3.6, bitsandbytes 0.50.2; bench/results/kernels-nvidia-h100-80gb-hbm3.*)
--------------------------------------------------------------------------------------------------
8192 x 28672 to bf16: 0.214 ms plain (2.8 TB/s, 94% of a device-to-device copy, 1.27x bitsandbytes),
0.209 ms double-quantized (1.40x: bitsandbytes needs three launches there). 4096 x 4096: 0.021 ms,
1.20x plain and 1.55x nested; about 18 us of that is GPU time, the rest the launch from Python.
Two strided stores instead of tl.join: 6x slower. Wide rows with the shared-memory shuffle: the same
speed (the compiler's shuffle is cheap here). Software bf16 rounding: 7% slower.
"""


import torch
import triton
import triton.language as tl

from ..state import QuantState
from .bf16 import round_to_bf16
from .launch import TRITON_TYPES, compile_for, launch
from .twins import interpreted, twin

__all__ = ["compile_ahead", "dequantize_4bit_kernel", "dequantize_4bit_triton", "launch_config"]

# Packed bytes per program (2x as many values). 2048 bytes with 4 warps = 16 bytes per thread, 32
# values out. On an H100 every tile from 512 to 4096 bytes runs within 2% on large weights (512 bytes,
# one warp, is 1-7% faster everywhere); 4 warps per program also suit GPUs that keep fewer programs
# per multiprocessor resident (a T4 keeps 16, so one-warp programs would leave it half empty).
DEFAULT_TILE_BYTES = 2048
BYTES_PER_THREAD = 16  # packed bytes per thread: sets num_warps from the tile
STORE_BYTES = 16  # output bytes per row of the tile: one 16-byte vector store


_round_to_bf16 = triton.jit(round_to_bf16)


@triton.jit
def _dequantize_tile(
    packed_ptr,  # uint8: this tile's first packed byte
    absmax_ptr,  # float32 absmax per block (uint8 codes of it when NESTED), the whole tensor's
    code_ptr,  # float32 [16]: the 4-bit codebook in bit order
    absmax2_ptr,  # float32: absmax of the absmax codes, one per NESTED_BLOCKSIZE of them (NESTED only)
    code2_ptr,  # float32 [256]: the 8-bit map that decodes the absmax codes (NESTED only)
    offset_ptr,  # float32 [1]: the mean subtracted from absmax before quantizing it (NESTED only)
    out_ptr,  # output: this tile's first value
    first_block,  # int64: index of the quantization block that holds this tile's first byte
    bytes_left,  # int64: packed bytes from this tile's start to the end (used when MASKED)
    values_left,  # int64: values from this tile's start to the end (used when MASKED)
    BLOCKSIZE: tl.constexpr,  # values per absmax
    NESTED_BLOCKSIZE: tl.constexpr,  # absmax codes per absmax2 entry
    NESTED: tl.constexpr,  # is absmax double-quantized?
    ROWS: tl.constexpr,  # the tile is ROWS x COLS bytes
    COLS: tl.constexpr,  # bytes per row (<= BLOCKSIZE // 2, so a row lies in one block)
    JOIN: tl.constexpr,  # interleave the two halves with tl.join (else: two stores with stride 2)
    SOFT_BF16: tl.constexpr,  # round to bfloat16 with integer operations (for the interpreter)
    STREAMING: tl.constexpr,  # cache hints: packed bytes evict-first, output stores streaming (.cs)
    MASKED: tl.constexpr,  # does the tile run past the end?
):
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    byte = rows[:, None] * COLS + cols[None, :]  # [ROWS, COLS] byte offsets in the tile

    # One absmax per row: a row holds COLS bytes = 2 * COLS values, never more than one block.
    block = first_block + (rows * COLS) // (BLOCKSIZE // 2)  # [ROWS]
    if MASKED:
        row_ok = rows * COLS < bytes_left
        packed = tl.load(packed_ptr + byte, mask=byte < bytes_left, other=0)
        stored_absmax = tl.load(absmax_ptr + block, mask=row_ok, other=0)
    elif STREAMING:
        packed = tl.load(packed_ptr + byte, eviction_policy="evict_first")
        stored_absmax = tl.load(absmax_ptr + block)
    else:
        packed = tl.load(packed_ptr + byte)
        stored_absmax = tl.load(absmax_ptr + block)
    if NESTED:
        # Double dequantization, as bitsandbytes does it: an 8-bit blockwise dequantize (a product,
        # rounded to float32), then + offset in a separate float32 addition.
        if MASKED:
            scale2 = tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=row_ok, other=0.0)
        else:
            scale2 = tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE)
        product = tl.load(code2_ptr + stored_absmax.to(tl.int32)) * scale2
        absmax = product + tl.load(offset_ptr)  # not contracted to an fma: see enable_fp_fusion below
    else:
        absmax = stored_absmax

    # Unpack: the high nibble is the even value, the low nibble the odd one. Look each up, scale.
    high = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * absmax[:, None]
    low = tl.load(code_ptr + (packed & 0x0F).to(tl.int32)) * absmax[:, None]
    if SOFT_BF16:  # only under TRITON_INTERPRET=1, whose float32 -> bfloat16 cast truncates
        high = _round_to_bf16(high)
        low = _round_to_bf16(low)
    else:  # the one rounding to the output dtype (round to nearest even, as torch and bitsandbytes)
        high = high.to(out_ptr.dtype.element_ty)
        low = low.to(out_ptr.dtype.element_ty)

    if JOIN:
        # [ROWS, COLS] x 2 -> [ROWS, COLS, 2] -> [ROWS, 2 * COLS]: high, low, high, low, ... in memory order.
        values = tl.reshape(tl.join(high, low), (ROWS, 2 * COLS))
        index = rows[:, None] * (2 * COLS) + tl.arange(0, 2 * COLS)[None, :]
        if MASKED:
            tl.store(out_ptr + index, values, mask=index < values_left)
        elif STREAMING:
            tl.store(out_ptr + index, values, cache_modifier=".cs")
        else:
            tl.store(out_ptr + index, values)
    else:
        # Even values at 2j, odd values at 2j + 1: two strided stores.
        if MASKED:
            tl.store(out_ptr + 2 * byte, high, mask=2 * byte < values_left)
            tl.store(out_ptr + 2 * byte + 1, low, mask=2 * byte + 1 < values_left)
        else:
            tl.store(out_ptr + 2 * byte, high)
            tl.store(out_ptr + 2 * byte + 1, low)


@triton.jit
def dequantize_4bit_kernel(
    packed_ptr,  # uint8 [(n + 1) // 2]: two 4-bit codes per byte, the even value in the high nibble
    absmax_ptr,  # float32 [blocks]: absmax per block of BLOCKSIZE values; uint8 codes of it when NESTED
    code_ptr,  # float32 [16]: the codebook (NF4, FP4, ...), indexed by the 4-bit code
    absmax2_ptr,  # float32 [ceil(blocks / NESTED_BLOCKSIZE)]: scales of the absmax codes (NESTED only)
    code2_ptr,  # float32 [256]: the 8-bit dynamic map for the absmax codes (NESTED only)
    offset_ptr,  # float32 [1]: mean of absmax, subtracted before it was quantized (NESTED only)
    out_ptr,  # float32 / float16 / bfloat16 [n]: the result; its element type sets the output dtype
    n,  # number of values (the original tensor's numel); may be odd
    BLOCKSIZE: tl.constexpr,  # values per absmax: 32, 64, ..., 4096
    NESTED_BLOCKSIZE: tl.constexpr,  # absmax codes per absmax2 entry (256 in bitsandbytes)
    NESTED: tl.constexpr,  # True when the state is double-quantized
    ROWS: tl.constexpr,  # tile rows (power of two)
    COLS: tl.constexpr,  # bytes per row, a power of two <= BLOCKSIZE // 2 (see launch_config)
    JOIN: tl.constexpr,  # True: tl.join interleave, one contiguous store; False: two strided stores
    SOFT_BF16: tl.constexpr,  # True: float32 -> bfloat16 by integer rounding (the interpreter's cast truncates)
    STREAMING: tl.constexpr,  # True: cache hints for data used once (evict-first loads, .cs stores)
):
    pid = tl.program_id(0)
    start = pid.to(tl.int64) * (ROWS * COLS)  # this program's first byte (int64: no overflow past 2^31)
    first_block = start // (BLOCKSIZE // 2)
    values_left = n - 2 * start
    bytes_left = (values_left + 1) // 2
    if values_left >= 2 * ROWS * COLS:  # every value of the tile exists: no masks
        _dequantize_tile(packed_ptr + start, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                         out_ptr + 2 * start, first_block, bytes_left, values_left,
                         BLOCKSIZE, NESTED_BLOCKSIZE, NESTED, ROWS, COLS, JOIN, SOFT_BF16, STREAMING,
                         MASKED=False)
    else:  # the last tile: it may stop mid-row, and mid-byte when n is odd
        _dequantize_tile(packed_ptr + start, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                         out_ptr + 2 * start, first_block, bytes_left, values_left,
                         BLOCKSIZE, NESTED_BLOCKSIZE, NESTED, ROWS, COLS, JOIN, SOFT_BF16, STREAMING,
                         MASKED=True)


# True when this module was loaded with TRITON_INTERPRET=1: its kernels then run on the CPU, in numpy.
INTERPRETED = interpreted(dequantize_4bit_kernel)


def _twin(interpret: bool):
    """This module loaded with TRITON_INTERPRET=1 (interpret=True) or =0: see qlora_ref.kernels.twins."""
    return twin(__name__, __file__, interpret, INTERPRETED)


def launch_config(blocksize: int, dtype: torch.dtype, tile_bytes=None, row_bytes=None, num_warps=None):
    """(ROWS, COLS, num_warps, tile bytes): the tile and warps for `blocksize` and output `dtype`.

    COLS, the bytes of one row, is by default what makes a row's output exactly 16 bytes (4 packed
    bytes for fp16/bf16, 2 for fp32): Triton then gives each thread whole rows, with neighbouring
    threads on neighbouring rows, so the loads and the 16-byte stores are coalesced as they are, with
    no shuffle through shared memory. A row never spans two blocks (COLS <= blocksize / 2).
    """
    tile = tile_bytes or DEFAULT_TILE_BYTES
    if tile < 1 or tile & (tile - 1):
        raise ValueError(f"tile_bytes must be a power of two, got {tile}")
    row = row_bytes or STORE_BYTES // (2 * dtype.itemsize)
    cols = min(blocksize // 2, tile, row)
    if num_warps is None:
        num_warps = max(1, min(8, tile // (32 * BYTES_PER_THREAD)))
    return tile // cols, cols, num_warps, tile


def _on(tensor: torch.Tensor, device: torch.device, dtype=None) -> torch.Tensor:
    """`tensor` on `device` (as `dtype`), contiguous, without a call into torch when it already is:
    this runs on every launch, and for a small weight Python's time is the kernel's time."""
    if tensor.device != device or (dtype is not None and tensor.dtype != dtype):
        tensor = tensor.to(device=device, dtype=dtype)
    return tensor if tensor.is_contiguous() else tensor.contiguous()


def dequantize_4bit_triton(packed: torch.Tensor, state: QuantState, *, tile_bytes=None, row_bytes=None,
                           num_warps=None, join: bool = True, streaming: bool = False, soft_bf16=None) -> torch.Tensor:
    """W^ = code[q] * absmax in state.shape and state.dtype: `qlora_ref.dequantize_4bit` in one launch.

    `packed` on a CUDA GPU: the compiled kernel. On the CPU: the same kernel run by Triton's
    interpreter (numpy; slow, for learning and tests). The state's tensors are moved to `packed`'s
    device if they are elsewhere. `tile_bytes`, `row_bytes`, `num_warps`, `join` and `streaming` are
    tuning knobs (bench/kernels.py compares them); the defaults are the measured best. `soft_bf16`
    forces the integer bfloat16 rounding on or off (default: on in the interpreter only).
    """
    if not isinstance(state, QuantState) or state.quant_type is None:
        raise TypeError("dequantize_4bit_triton needs the QuantState returned by quantize_4bit")
    state.check_codes(packed)
    device = packed.device
    if (device.type == "cpu") != INTERPRETED:
        return _twin(interpret=device.type == "cpu").dequantize_4bit_triton(
            packed, state, tile_bytes=tile_bytes, row_bytes=row_bytes, num_warps=num_warps, join=join,
            streaming=streaming, soft_bf16=soft_bf16)
    n = state.numel
    out = torch.empty(state.shape, dtype=state.dtype, device=device)
    rows, cols, num_warps, tile = launch_config(state.blocksize, state.dtype, tile_bytes, row_bytes, num_warps)

    code = _on(state.code, device, torch.float32)
    absmax = _on(state.absmax, device)
    if state.nested:
        absmax2 = _on(state.state2.absmax, device, torch.float32)
        code2 = _on(state.state2.code, device, torch.float32)
        offset = state.offset if isinstance(state.offset, torch.Tensor) else torch.tensor(float(state.offset))
        offset = _on(offset, device, torch.float32)
        nested_blocksize = state.state2.blocksize
    else:
        absmax2, code2, offset = absmax, code, absmax  # not read: any pointer will do
        nested_blocksize = 256
    if soft_bf16 is None:
        soft_bf16 = INTERPRETED

    grid = (triton.cdiv((n + 1) // 2, tile), 1, 1)  # one program per tile of packed bytes: the only launch
    args = (_on(packed, device), absmax, code, absmax2, code2, offset, out, n)
    soft_bf16 = bool(soft_bf16) and state.dtype == torch.bfloat16
    constexprs = (state.blocksize, nested_blocksize, state.nested, rows, cols, join, soft_bf16, streaming)
    # enable_fp_fusion=False: code2 * absmax2 and + offset stay two roundings, as in bitsandbytes
    launch(dequantize_4bit_kernel, CONSTEXPRS, grid, args, constexprs, num_warps, enable_fp_fusion=False)
    return out


CONSTEXPRS = ("BLOCKSIZE", "NESTED_BLOCKSIZE", "NESTED", "ROWS", "COLS", "JOIN", "SOFT_BF16", "STREAMING")


def compile_ahead(capability: int, dtype: torch.dtype = torch.float16, blocksize: int = 64, nested: bool = False,
                  *, tile_bytes: int = DEFAULT_TILE_BYTES, row_bytes=None, num_warps=None, join: bool = True,
                  streaming: bool = False, fp_fusion: bool = False):
    """Compile the kernel for a GPU that need not be here, e.g. capability 75 (a Colab T4) or 90 (H100).

    Returns Triton's CompiledKernel: `.asm["ptx"]` is the PTX, `.asm["cubin"]` the machine code,
    `.metadata` the resources. The pointers are declared 16-byte aligned, as the launcher finds them
    for tensors fresh from torch; `n` is an int32 divisible by 16 (the launcher's specialization for
    n % 16 == 0). Needs only the ptxas that ships in the triton wheel, no GPU and no driver.
    fp_fusion=True compiles as Triton does by default, letting the compiler fuse the nested
    absmax's product and sum into one fma (look for fma.rn.f32 in the PTX): not bit-exact.
    """
    rows, cols, num_warps, _ = launch_config(blocksize, dtype, tile_bytes, row_bytes, num_warps)
    pointers = {
        "packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
        "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": "*" + TRITON_TYPES[dtype],
    }
    constexprs = {
        "BLOCKSIZE": blocksize, "NESTED_BLOCKSIZE": 256, "NESTED": nested, "ROWS": rows, "COLS": cols,
        "JOIN": join, "SOFT_BF16": False, "STREAMING": streaming,
    }
    return compile_for(_twin(interpret=False).dequantize_4bit_kernel, capability, pointers, {"n": "i32"}, constexprs,
                       num_warps, fp_fusion=fp_fusion)
