"""Triton kernel 3: a fused 4-bit GEMV, y = x @ W^T with W stored as packed NF4 / FP4 (batch-1 decoding).

What you will learn
-------------------
* Why decoding is memory-bound: for one token (x has 1 row) every weight is used once. A 8192 x 28672
  weight in 4 bits is 117 MB; at the ~3 TB/s an H100 streams, reading it takes ~0.039 ms, and the
  arithmetic (two multiply-adds per weight) is small next to it. Dequantizing W to bf16 first and then
  calling a dense GEMV would write and read the weight again in 16 bits: 5x the traffic. So the weight is
  dequantized in registers, multiplied with x and summed, and never written anywhere.
* Two kernels. gemv_4bit_kernel (several rows of x, and the first design for one row): a [BLOCK_N rows,
  SUB sub-blocks, HALF bytes] tile of bytes, each split into its two codes. gemv_4bit_row_kernel (one row:
  decoding, the default there), designed from what bounded the first one (below).
* A sub-block never spans two quantization blocks, so one absmax per (row, sub-block) is loaded and
  broadcast along its bytes, instead of one per value.
* Splitting a byte into its two codes (high nibble: the even k, low nibble: the odd one) and multiplying
  each with the matching value of x: no interleave of the weights is needed.
* Accumulating in float32 in a register tile across the loop over K, and reducing it to [BLOCK_N] only once
  at the end (one cross-thread reduction per program, not one per chunk).
* Scaling sums, not weights (scale_sums=True, the default): within a block every weight shares one absmax,
  so absmax * sum(code * x) replaces a multiply by the absmax and a rounding of w to bf16 per weight. The
  weights used are then the exact float32 code * absmax, within half a bf16 ulp of the ones dequantize_4bit
  writes; scale_sums=False rounds each w as dequantize_4bit does (the products and sums are float32 either
  way). bitsandbytes' GEMV rounds the absmax and each product to bf16: its error against the float32
  reference is about 1.4x ours (tests/test_triton_gemv_gpu.py).
* Software pipelining by hand (prefetch=True): the loads of chunk i + 1 are issued before chunk i is
  decoded. A GEMV is latency-bound when each thread has only one chunk's bytes in flight. But the loads in
  flight hold registers, and registers decide how many programs share an SM: what pays differs per weight
  (row_defaults: W and its scales only for nested weights, nothing for long rows).
* Double quantization fused in (absmax = code2[q] * absmax2[b // 256] + offset, two float32
  roundings, compiled with enable_fp_fusion=False as in dequantize_4bit.py).
* Several rows of x (M <= 8, a few tokens of speculative decoding or a small batch): each chunk of W is
  dequantized once and used for every row (M_TILE rows per program); their partial sums are reduced per
  chunk into an [M_TILE, BLOCK_N] accumulator.
* Reading the machine code (compile_ahead(90).asm, nvdisasm) to count instructions per byte, and Nsight
  Compute to see which unit is busy: the first kernel's loop spent ~16.5 instructions per byte of W, the
  row kernel's ~11 (8.9 with chunk_bytes=1024).

The math
--------
    w_{n,k} = round_dtype(code[q_{n,k}] * absmax_{(n*K + k) // B})      as dequantize_4bit
    y_{m,n} = round_out( sum_k float32(x_{m,k}) * float32(w_{n,k}) )     float32 accumulation
The kernels use the exact float32 code * absmax for w (scale_sums), with each block's absmax applied to a
float32 sum of code * x (the row kernel: one sum per 8 values, multiply-adds in the order of k).

Layout (bitsandbytes'): W [N, K] flattened row-major, two codes per byte, blocks of B values along the
flattened order. The kernel needs K to be a multiple of B (then a block lies inside one row; every Llama
weight qualifies); other K are refused with a clear error.

The one-row kernel
------------------
gemv_4bit_kernel is bound by instructions, not memory: per byte of W it gathers two codes from memory,
extracts the nibbles and splits x through shared memory. gemv_4bit_row_kernel (one row of x) removes them:
  - W read as int32 words (8 codes), 16 bytes of one row per lane, the 32 lanes of a warp along K, one row per
    warp (ROW_BLOCK_N rows per program); long rows (K >= WIDE_FROM_K) take two 16-byte groups a lane;
  - codes looked up in registers with a warp shuffle (lookup="shuffle"): lane l holds code[l % 16] and
    shfl.sync.idx returns code[nibble] from lane (l & 16) | nibble, the exact float32 codebook;
  - x read with one 16-byte load per word (inline PTX), bf16 widened to float32 with a shift and a mask;
  - per word: one multiply and 7 multiply-adds in the order of k, then one multiply-add by the absmax into
    the word's float32 accumulator.
In Triton's interpreter (no inline PTX) the same kernel looks codes up and loads x with tl.load: the same codes,
multiplied and added in the same order. Why these settings, what else was tried and what it measured:
bench/experiments/README.md.
"""


import torch
import triton
import triton.language as tl

from ..codebooks import derived_table
from ..state import QuantState
from .bf16 import round_to_bf16
from .dequantize_4bit import _on
from .launch import TRITON_TYPES, compile_for, launch
from .twins import twin

__all__ = ["compile_ahead", "gemv_4bit_kernel", "gemv_4bit_row_kernel", "gemv_4bit_triton", "gemv_config",
           "gemv_row_config", "row_defaults", "MAX_BLOCKS", "MAX_ROWS"]

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = ()

MAX_ROWS = 8  # rows of x per program; more rows take more programs (grid axis 1), each reading W again
MAX_BLOCKS = 2**31  # the row kernel's block indexes are int32

# Defaults: the fastest setting of bench.gemv's sweep on every Llama weight (bench/results/gemv-*.json).
DEFAULT_BLOCK_N = 8  # output rows per program
DEFAULT_CHUNK_BYTES = 512  # packed bytes of one row per loop iteration (1024 values)
DEFAULT_NUM_WARPS = 4
INTERPRETER_BLOCK_N = 64  # CPU tensors (Triton's interpreter): fewer, larger programs run much faster
# gemv_4bit_row_kernel's (one row of x): the fastest settings on the Llama weights (bench/results/gemv-*.json),
# chunk_bytes and prefetch by row_defaults.
ROW_BLOCK_N = 4  # rows per program
ROW_NUM_WARPS = 4
ROW_CHUNK_BYTES = 512  # bytes of a row per loop iteration: 16 per lane, one row per warp
WIDE_CHUNK_BYTES = 1024  # 16 bytes at each of two places in a row per lane, 512 bytes apart
WIDE_FROM_K = 8192  # WIDE_CHUNK_BYTES, without prefetch, from rows of this many values
LOOKUPS = {"memory": 0, "shuffle": 1, "prmt": 2}  # how gemv_4bit_row_kernel turns nibbles into codes
PREFETCHES = {False: 0, True: 1, "weights": 2}  # what gemv_4bit_row_kernel loads one chunk ahead: see row_defaults


_round_to_bf16 = triton.jit(round_to_bf16)


@triton.jit
def _block_scales(absmax_ptr, absmax2_ptr, block, ok, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """The stored absmax of these blocks (uint8 codes when NESTED) and the nested scale of each (NESTED only;
    else the stored absmax again): what both kernels load per block before decoding."""
    stored = tl.load(absmax_ptr + block, mask=ok, other=0)
    if NESTED:
        scale2 = tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=ok, other=0.0)
    else:
        scale2 = stored
    return stored, scale2


@triton.jit
def _load_chunk(packed_ptr, absmax_ptr, absmax2_ptr, row_bytes, row_blocks, row_ok, sub_start, sub_ok, byte,
                BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """One chunk's loads from memory: packed bytes [BLOCK_N, SUB, HALF], stored absmax [BLOCK_N, SUB] (codes
    when NESTED) and the nested scale [BLOCK_N, SUB] (NESTED only; else the stored absmax again)."""
    ok2 = row_ok[:, None] & sub_ok[None, :]  # [BLOCK_N, SUB]
    offsets = row_bytes[:, None, None] + sub_start[None, :, None] + byte[None, None, :]
    packed = tl.load(packed_ptr + offsets, mask=ok2[:, :, None], other=0)
    block = row_blocks[:, None] + (2 * sub_start[None, :]) // BLOCKSIZE  # one absmax per (row, sub-block)
    stored, scale2 = _block_scales(absmax_ptr, absmax2_ptr, block, ok2, NESTED_BLOCKSIZE, NESTED)
    return packed, stored, scale2


@triton.jit
def _decode(packed, stored, scale2, code_ptr, code2_ptr, offset_ptr, NESTED: tl.constexpr, PAIRS: tl.constexpr):
    """The codebook values of a chunk, [BLOCK_N, SUB, HALF] x 2 (even k, odd k), and its absmax [BLOCK_N, SUB, 1]."""
    if NESTED:
        product = tl.load(code2_ptr + stored.to(tl.int32)) * scale2
        absmax = product + tl.load(offset_ptr)  # two roundings: enable_fp_fusion=False
    else:
        absmax = stored
    if PAIRS:  # one 8-byte lookup per byte: (code[high nibble], code[low nibble]) as two float32
        pair = tl.load(code_ptr + packed.to(tl.int32))  # int64
        c_hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        c_lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    else:  # two 4-byte lookups in the 16-entry codebook
        c_hi = tl.load(code_ptr + (packed >> 4).to(tl.int32))
        c_lo = tl.load(code_ptr + (packed & 0x0F).to(tl.int32))
    return c_hi, c_lo, absmax[:, :, None]


@triton.jit
def _round_w(w, W_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr):
    """A weight code * absmax (float32) rounded to the state's dtype as dequantize_4bit rounds it, as float32."""
    if W_DTYPE == 2:
        if SOFT_BF16:
            w = _round_to_bf16(w).to(tl.float32)
        else:
            w = w.to(tl.bfloat16).to(tl.float32)
    elif W_DTYPE == 1:
        w = w.to(tl.float16).to(tl.float32)
    return w


@triton.jit
def _accumulate(acc, c_hi, c_lo, absmax, x_even, x_odd, W_DTYPE: tl.constexpr, SOFT_BF16: tl.constexpr,
                SCALE_SUMS: tl.constexpr):
    """acc + w_even * x_even + w_odd * x_odd for each byte of a chunk, [BLOCK_N, SUB, HALF] float32.

    SCALE_SUMS: acc + absmax * (c_even * x_even + c_odd * x_odd): one multiply by the absmax per byte and
    no rounding of w. Else each w = code * absmax is rounded to the state's dtype first, as dequantize_4bit
    rounds it. Explicit fused multiply-adds: the kernel is compiled with enable_fp_fusion=False.
    """
    if SCALE_SUMS:
        return tl.fma(absmax, tl.fma(c_lo, x_odd, c_hi * x_even), acc)
    w_hi = _round_w(c_hi * absmax, W_DTYPE, SOFT_BF16)
    w_lo = _round_w(c_lo * absmax, W_DTYPE, SOFT_BF16)
    return tl.fma(w_lo, x_odd, tl.fma(w_hi, x_even, acc))


@triton.jit
def _x_halves(x_row, sub_start, sub_ok, byte, SUB: tl.constexpr, HALF: tl.constexpr, SPLIT_X: tl.constexpr):
    """x's values of one chunk as float32 [SUB, HALF] x 2: even k (high nibbles), odd k (low nibbles)."""
    if SPLIT_X:  # one contiguous (vector) load of 2 * HALF values per sub-block, split into even / odd
        k = 2 * sub_start[:, None] + tl.arange(0, 2 * HALF)[None, :]
        x_pairs = tl.load(x_row + k, mask=sub_ok[:, None], other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(x_pairs, (SUB, HALF, 2)))
    else:  # two loads with stride 2
        k_even = 2 * (sub_start[:, None] + byte[None, :])
        x_even = tl.load(x_row + k_even, mask=sub_ok[:, None], other=0.0).to(tl.float32)
        x_odd = tl.load(x_row + k_even + 1, mask=sub_ok[:, None], other=0.0).to(tl.float32)
    return x_even, x_odd


@triton.jit
def _sum12(t):
    """tl.sum(tl.sum(t, 2), 1), spelled so that the interpreter twin takes its numpy fast path (tl.sum is a
    @jit helper of the compiled triton.language, which the twin cannot call)."""
    return tl.reduce(tl.reduce(t, 2, tl.standard._sum_combine), 1, tl.standard._sum_combine)


@triton.jit
def _round_out(y, y_ptr, SOFT_BF16: tl.constexpr):
    """The one rounding of y (float32) to the output's dtype, round to nearest even."""
    if SOFT_BF16 and y_ptr.dtype.element_ty == tl.bfloat16:
        return _round_to_bf16(y)
    return y.to(y_ptr.dtype.element_ty)


@triton.jit
def gemv_4bit_kernel(
    x_ptr,  # [M, K] float32 / float16 / bfloat16, rows contiguous (stride_xm between rows)
    packed_ptr,  # uint8 [N * K / 2]: W [N, K] row-major, two codes per byte, the even k in the high nibble
    absmax_ptr,  # float32 [N * K / B] (uint8 codes of it when NESTED)
    code_ptr,  # int64 [256] pair table when PAIRS (see _pair_table), else float32 [16]: the 4-bit codebook
    absmax2_ptr,  # float32: scales of the absmax codes, one per NESTED_BLOCKSIZE (NESTED only)
    code2_ptr,  # float32 [256]: the 8-bit map of the absmax codes (NESTED only)
    offset_ptr,  # float32 [1]: mean of absmax (NESTED only)
    y_ptr,  # [M, N] output, x's dtype
    M, N, K,  # sizes
    stride_xm, stride_ym,  # row strides of x and y, in elements
    BLOCKSIZE: tl.constexpr,  # values per absmax
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK_N: tl.constexpr,  # output rows per program
    SUB: tl.constexpr,  # sub-blocks per chunk
    HALF: tl.constexpr,  # bytes per sub-block (<= BLOCKSIZE // 2: a sub-block lies in one block)
    W_DTYPE: tl.constexpr,  # 0: float32, 1: float16, 2: bfloat16 (the state's dtype: how w is rounded)
    SOFT_BF16: tl.constexpr,  # round w and y to bf16 in integer arithmetic (the interpreter's cast truncates)
    PAIRS: tl.constexpr,  # code_ptr is int64 [256]: both codes of a byte in one lookup (see _pair_table)
    SPLIT_X: tl.constexpr,  # load x contiguously and split it (else two stride-2 loads)
    M_TILE: tl.constexpr,  # rows of x per program (grid axis 1): 1, or up to 8 sharing each dequantized chunk
    SCALE_SUMS: tl.constexpr,  # multiply sums of code * x by the absmax (else round every weight first)
    PREFETCH: tl.constexpr,  # M_TILE == 1: load chunk i + 1 before computing chunk i
):
    pid = tl.program_id(0)
    m0 = tl.program_id(1) * M_TILE
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output rows
    row_ok = rows < N
    rows64 = tl.where(row_ok, rows, 0).to(tl.int64)
    sub = tl.arange(0, SUB)
    byte = tl.arange(0, HALF)
    CHUNK: tl.constexpr = SUB * HALF  # packed bytes of one row per iteration
    half_k = K // 2  # packed bytes per row
    # [BLOCK_N] first byte of each row; K is a multiple of the blocksize >= 32, so 16 | K / 2: 16-byte loads
    row_bytes = tl.multiple_of(rows64 * half_k, 16)
    row_blocks = rows64 * (K // BLOCKSIZE)  # [BLOCK_N] first block of each row
    loop_end = half_k

    if M_TILE == 1:
        # One row of x (decoding): a [BLOCK_N, SUB, HALF] float32 accumulator, reduced once at the end.
        x_row = x_ptr + m0 * stride_xm
        acc = tl.full((BLOCK_N, SUB, HALF), 0.0, tl.float32)  # (tl.zeros: a @jit helper the twin cannot call)
        # Software pipelining: the loads of chunk i + 1 are issued before chunk i is decoded, so that each
        # thread has two chunks' bytes in flight while it computes (the loop is otherwise latency-bound).
        sub_start = sub * HALF
        sub_ok = sub_start < half_k
        packed, stored, scale2 = _load_chunk(packed_ptr, absmax_ptr, absmax2_ptr, row_bytes, row_blocks, row_ok,
                                             sub_start, sub_ok, byte, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED)
        x_even, x_odd = _x_halves(x_row, sub_start, sub_ok, byte, SUB, HALF, SPLIT_X)
        for start in range(0, loop_end, CHUNK):  # start: byte offset inside the row
            if PREFETCH:
                next_start = start + CHUNK + sub * HALF  # [SUB] first byte of each sub-block of the next chunk
                next_ok = next_start < half_k  # K is a multiple of the blocksize: sub-blocks are whole or absent
                packed_n, stored_n, scale2_n = _load_chunk(packed_ptr, absmax_ptr, absmax2_ptr, row_bytes,
                                                           row_blocks, row_ok, next_start, next_ok, byte, BLOCKSIZE,
                                                           NESTED_BLOCKSIZE, NESTED)
                x_even_n, x_odd_n = _x_halves(x_row, next_start, next_ok, byte, SUB, HALF, SPLIT_X)
            else:
                sub_start = start + sub * HALF
                sub_ok = sub_start < half_k
                packed, stored, scale2 = _load_chunk(packed_ptr, absmax_ptr, absmax2_ptr, row_bytes, row_blocks,
                                                     row_ok, sub_start, sub_ok, byte, BLOCKSIZE, NESTED_BLOCKSIZE,
                                                     NESTED)
                x_even, x_odd = _x_halves(x_row, sub_start, sub_ok, byte, SUB, HALF, SPLIT_X)
            c_hi, c_lo, absmax = _decode(packed, stored, scale2, code_ptr, code2_ptr, offset_ptr, NESTED, PAIRS)
            acc = _accumulate(acc, c_hi, c_lo, absmax, x_even[None, :, :], x_odd[None, :, :], W_DTYPE, SOFT_BF16,
                              SCALE_SUMS)
            if PREFETCH:
                packed, stored, scale2, x_even, x_odd = packed_n, stored_n, scale2_n, x_even_n, x_odd_n
        tl.store(y_ptr + m0 * stride_ym + rows, _round_out(_sum12(acc), y_ptr, SOFT_BF16), mask=row_ok)
    else:
        # Several rows of x: each chunk of W is dequantized once and used for all of them; each row's partial
        # dot products are reduced per chunk into a [M_TILE, BLOCK_N] accumulator.
        m_idx = tl.arange(0, M_TILE)
        acc2 = tl.full((M_TILE, BLOCK_N), 0.0, tl.float32)
        for start in range(0, loop_end, CHUNK):
            sub_start = start + sub * HALF
            sub_ok = sub_start < half_k
            packed, stored, scale2 = _load_chunk(packed_ptr, absmax_ptr, absmax2_ptr, row_bytes, row_blocks, row_ok,
                                                 sub_start, sub_ok, byte, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED)
            c_hi, c_lo, absmax = _decode(packed, stored, scale2, code_ptr, code2_ptr, offset_ptr, NESTED, PAIRS)
            if not SCALE_SUMS:  # round each weight once, for all rows of x
                c_hi = _round_w(c_hi * absmax, W_DTYPE, SOFT_BF16)
                c_lo = _round_w(c_lo * absmax, W_DTYPE, SOFT_BF16)
            for i in tl.static_range(M_TILE):
                x_even, x_odd = _x_halves(x_ptr + (m0 + i) * stride_xm, sub_start, sub_ok & (m0 + i + 0 * sub < M), byte,
                                          SUB, HALF, SPLIT_X)
                products = tl.fma(c_lo, x_odd[None, :, :], c_hi * x_even[None, :, :])
                if SCALE_SUMS:
                    products = absmax * products
                part = _sum12(products)  # [BLOCK_N]
                acc2 = tl.where(m_idx[:, None] == i, acc2 + part[None, :], acc2)
        m_rows = m0 + m_idx
        ok = (m_rows < M)[:, None] & row_ok[None, :]
        tl.store(y_ptr + m_rows[:, None] * stride_ym + rows[None, :], _round_out(acc2, y_ptr, SOFT_BF16), mask=ok)



# ---------------------------------------------------------------------------------------------------------------
# The one-row kernel (x has 1 row: decoding). See "Where the time goes" in the module docstring.
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _lane_id(like):
    """This thread's lane in its warp, shaped like `like` (one register: the identical calls are merged)."""
    return tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [tl.full(like.shape, 0, tl.int32)],
                                     dtype=tl.int32, is_pure=True, pack=1)


# LOOKUP == 1: the 8 codes of a word by warp shuffles. Lane l holds src = code[l % 16], picked from the 16 codes
# ($9..$24, the same in every lane) by the bits of the lane id; shfl.idx with c = 0x101f (segments of 16
# lanes) returns src of lane (l & 16) | (index & 15), so the index needs no mask: one shift and one shuffle per
# code. The lane's src is made inside this statement: a tensor holding it could be moved to another lane by
# a layout conversion of Triton's. It does not depend on the word: ptxas computes it once, outside the loop.
# Outputs $0..$7: the codes of k = 0..7 (byte b: k = 2b in bits 4..7, k = 2b + 1 in bits 0..3).
_SHUFFLE_ASM = tl.constexpr(
    "{\n.reg .b32 l, src, i, a<8>, b<4>, c<2>;\n.reg .pred p<4>;\nmov.u32 l, %laneid;\n"
    + "".join(f"and.b32 i, l, {1 << j};\nsetp.ne.u32 p{j}, i, 0;\n" for j in range(4))
    + "".join(f"selp.b32 a{j}, ${10 + 2 * j}, ${9 + 2 * j}, p0;\n" for j in range(8))
    + "".join(f"selp.b32 b{j}, a{2 * j + 1}, a{2 * j}, p1;\n" for j in range(4))
    + "selp.b32 c0, b1, b0, p2;\nselp.b32 c1, b3, b2, p2;\nselp.b32 src, c1, c0, p3;\n"
    + "".join(f"shr.u32 i, $8, {4 * j};\nshfl.sync.idx.b32 ${j ^ 1}, src, i, 0x101f, 0xffffffff;\n" for j in range(8))
    + "}")


@triton.jit
def _nibble_code(words, SHIFT: tl.constexpr, code_ptr):
    """code[(word >> SHIFT) & 15] as float32 for each int32 word: a gather from the 16 floats (through L1)."""
    return tl.load(code_ptr + ((words >> SHIFT) & 15))


# LOOKUP == 2: the 8 codes of a word from a table in registers (PRMT), as fp16. The 16 fp16 codes are two
# byte planes (low bytes: $9..$12, high bytes: $13..$16, entry i in byte i % 4 of word i // 4). prmt picks 4
# bytes out of 2 registers (8 entries) by the 3-bit selectors in c[15:0] (bit 3 of a selector would replicate a
# sign: masked off in s); two picks (entries 0..7, 8..15) and a third prmt on each nibble's bit 3 (t: 0x3210 +
# 4 * bit 3) give a plane's 4 bytes; low and high bytes are interleaved into two f16x2 and widened to float32.
# Outputs $0..$7: the codes of k = 0..7 (byte b: k = 2b in bits 4..7, k = 2b + 1 in bits 0..3).
_PRMT_FOUR = """
prmt.b32 a, $9, $10, s;
prmt.b32 b, $11, $12, s;
prmt.b32 lo, a, b, t;
prmt.b32 a, $13, $14, s;
prmt.b32 b, $15, $16, s;
prmt.b32 hi, a, b, t;
prmt.b32 p, lo, hi, 0x5140;
mov.b32 {h0, h1}, p;
cvt.f32.f16 $K1, h0;
cvt.f32.f16 $K0, h1;
prmt.b32 p, lo, hi, 0x7362;
mov.b32 {h0, h1}, p;
cvt.f32.f16 $K3, h0;
cvt.f32.f16 $K2, h1;
"""
_PRMT_ASM = tl.constexpr(
    "{\n.reg .b32 s, t, a, b, lo, hi, p;\n.reg .b16 h0, h1;\n"
    "and.b32 s, $8, 0x77777777;\nshr.u32 t, $8, 1;\nand.b32 t, t, 0x44444444;\nor.b32 t, t, 0x32103210;\n"
    + _PRMT_FOUR.replace("$K", "$")  # nibbles 0..3: k = 0..3
    + "shr.u32 s, s, 16;\nshr.u32 t, t, 16;\n"
    + _PRMT_FOUR.replace("$K0", "$4").replace("$K1", "$5").replace("$K2", "$6").replace("$K3", "$7") + "}")


@triton.jit
def _word_codes(words, table, code_ptr, LOOKUP: tl.constexpr):
    """The 8 codes of each int32 word as float32, in the order of k. `table`: the 16 codes as int32 bits
    (LOOKUP 1) or the 8 words of the prmt table (LOOKUP 2), each the same in every thread."""
    if LOOKUP == 1:
        t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15 = table
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            _SHUFFLE_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [words, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15], dtype=(tl.int32,) * 8,
            is_pure=True, pack=1)
        return (c0.to(tl.float32, bitcast=True), c1.to(tl.float32, bitcast=True), c2.to(tl.float32, bitcast=True),
                c3.to(tl.float32, bitcast=True), c4.to(tl.float32, bitcast=True), c5.to(tl.float32, bitcast=True),
                c6.to(tl.float32, bitcast=True), c7.to(tl.float32, bitcast=True))
    if LOOKUP == 2:
        l0, l1, l2, l3, h0, h1, h2, h3 = table
        return tl.inline_asm_elementwise(_PRMT_ASM, "=f,=f,=f,=f,=f,=f,=f,=f,r,r,r,r,r,r,r,r,r",
                                         [words, l0, l1, l2, l3, h0, h1, h2, h3], dtype=(tl.float32,) * 8,
                                         is_pure=True, pack=1)
    return (_nibble_code(words, 4, code_ptr), _nibble_code(words, 0, code_ptr), _nibble_code(words, 12, code_ptr),
            _nibble_code(words, 8, code_ptr), _nibble_code(words, 20, code_ptr), _nibble_code(words, 16, code_ptr),
            _nibble_code(words, 28, code_ptr), _nibble_code(words, 24, code_ptr))


@triton.jit
def _x_load(x_row, word, ok, X_MODE: tl.constexpr, ASM: tl.constexpr):
    """x under each word (k = 8 * word + 0..7) as loaded: four int32 pairs of 16-bit values, the even k in the low
    half (X_MODE 0: bf16, 1: fp16); X_MODE 2 (any dtype, any alignment): nothing yet, _x_values loads."""
    if X_MODE == 2:
        return word, word, word, word  # (placeholders)
    pairs = x_row.to(tl.pointer_type(tl.int32), bitcast=True) + 4 * word
    if ASM:  # one 16-byte load per word, in the layout of `word`; tl.load's would go through shared memory
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $5, 0; mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0;\n"
            "@p ld.global.v4.b32 {$0, $1, $2, $3}, [$4]; }",
            "=r,=r,=r,=r,l,r", [pairs, ok.to(tl.int32)], dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    return (tl.load(pairs, mask=ok, other=0), tl.load(pairs + 1, mask=ok, other=0),
            tl.load(pairs + 2, mask=ok, other=0), tl.load(pairs + 3, mask=ok, other=0))


@triton.jit
def _halves(pair, X_MODE: tl.constexpr):
    """An int32 pair of bf16 (X_MODE 0) or fp16 (1) values as two float32: (low half, high half)."""
    if X_MODE == 0:  # a bf16 is the top half of its float32: a shift and a mask
        return (pair << 16).to(tl.float32, bitcast=True), (pair & -65536).to(tl.float32, bitcast=True)
    return ((pair & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32),
            (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32))


@triton.jit
def _x_values(x_row, raw, word, ok, X_MODE: tl.constexpr):
    """The 8 values of x under each word as float32, from _x_load's pairs (X_MODE 2: loaded here)."""
    if X_MODE == 2:
        k = x_row + 8 * word
        return (tl.load(k, mask=ok, other=0.0).to(tl.float32), tl.load(k + 1, mask=ok, other=0.0).to(tl.float32),
                tl.load(k + 2, mask=ok, other=0.0).to(tl.float32), tl.load(k + 3, mask=ok, other=0.0).to(tl.float32),
                tl.load(k + 4, mask=ok, other=0.0).to(tl.float32), tl.load(k + 5, mask=ok, other=0.0).to(tl.float32),
                tl.load(k + 6, mask=ok, other=0.0).to(tl.float32), tl.load(k + 7, mask=ok, other=0.0).to(tl.float32))
    p0, p1, p2, p3 = raw
    x0, x1 = _halves(p0, X_MODE)
    x2, x3 = _halves(p1, X_MODE)
    x4, x5 = _halves(p2, X_MODE)
    x6, x7 = _halves(p3, X_MODE)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _word_dot(words, table, code_ptr, x0, x1, x2, x3, x4, x5, x6, x7, LOOKUP: tl.constexpr):
    """sum_k code[q_k] * x_k over the 8 codes of each word: a multiply, then multiply-adds in the order of k."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _word_codes(words, table, code_ptr, LOOKUP)
    s = c0 * x0
    s = tl.fma(c1, x1, s)
    s = tl.fma(c2, x2, s)
    s = tl.fma(c3, x3, s)
    s = tl.fma(c4, x4, s)
    s = tl.fma(c5, x5, s)
    s = tl.fma(c6, x6, s)
    return tl.fma(c7, x7, s)


@triton.jit
def _row_words(words_ptr, row_start, row_ok, start, row_words, SUB: tl.constexpr):
    """One chunk's int32 words of W, [BLOCK_N, SUB, 4]: SUB groups of 4 words (32 values, inside one block)."""
    group = start + 4 * tl.arange(0, SUB)  # [SUB] first word of each group
    word = group[:, None] + tl.arange(0, 4)[None, :]  # [SUB, 4]
    group_ok = row_ok[:, None] & (group < row_words)[None, :]  # K is a multiple of 32: groups are whole or absent
    return tl.load(words_ptr + row_start[:, None, None] + word[None, :, :], mask=group_ok[:, :, None], other=0)


@triton.jit
def _row_scales(absmax_ptr, absmax2_ptr, row_blocks, row_ok, start, row_words, SUB: tl.constexpr,
                BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """One chunk's stored absmax [BLOCK_N, SUB] (codes when NESTED) and nested scale [BLOCK_N, SUB] (NESTED only;
    else the stored absmax again): one of each per group of 4 words."""
    group = start + 4 * tl.arange(0, SUB)
    group_ok = row_ok[:, None] & (group < row_words)[None, :]
    block = row_blocks[:, None] + (8 * group[None, :]) // BLOCKSIZE
    return _block_scales(absmax_ptr, absmax2_ptr, block, group_ok, NESTED_BLOCKSIZE, NESTED)


@triton.jit
def _row_loads(words_ptr, absmax_ptr, absmax2_ptr, row_start, row_blocks, row_ok, start, row_words,
               SUB: tl.constexpr, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """One chunk's loads of W: its words, stored absmax and nested scales (_row_words, _row_scales)."""
    words = _row_words(words_ptr, row_start, row_ok, start, row_words, SUB)
    stored, scale2 = _row_scales(absmax_ptr, absmax2_ptr, row_blocks, row_ok, start, row_words, SUB, BLOCKSIZE,
                                 NESTED_BLOCKSIZE, NESTED)
    return words, stored, scale2


@triton.jit
def gemv_4bit_row_kernel(
    x_ptr,  # [K] float32 / float16 / bfloat16: the one row of x
    packed_ptr,  # uint8 [N * K / 2], read as int32 words: 8 codes, k = 8 * word + 0..7
    absmax_ptr,  # float32 [N * K / B] (uint8 codes of it when NESTED)
    code_ptr,  # float32 [16]: the 4-bit codebook (rounded to fp16 when LOOKUP == 2)
    lut_ptr,  # int32 [16]: the fp16 codebook as byte planes, twice (LOOKUP == 2 only; see _build_prmt_table)
    absmax2_ptr, code2_ptr, offset_ptr,  # the nested absmax (NESTED only), as in gemv_4bit_kernel
    y_ptr,  # [N] output, x's dtype
    N, K,  # sizes; K a multiple of 32
    BLOCKSIZE: tl.constexpr,  # values per absmax, a multiple of 32
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK_N: tl.constexpr,  # output rows per program
    SUB: tl.constexpr,  # groups of 4 words (16 bytes) per row and loop iteration
    LOOKUP: tl.constexpr,  # codes from 0: memory (tl.load), 1: a warp shuffle, 2: a table in registers (prmt)
    X_MODE: tl.constexpr,  # x as 0: bf16 pairs, 1: fp16 pairs (16-byte aligned), 2: separate values
    SOFT_BF16: tl.constexpr,  # round y to bf16 in integer arithmetic (the interpreter's cast truncates)
    PREFETCH: tl.constexpr,  # load chunk i + 1 before computing chunk i: 0 nothing, 1 W, scales and x, 2 W and scales
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    in_range = tl.where(row_ok, rows, 0)  # rows past N address row 0 (their loads are masked)
    row_words = K // 8
    words_ptr = packed_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    row_start = tl.multiple_of(in_range.to(tl.int64) * row_words, 4)  # [BLOCK_N] each row's first word, 16-byte aligned
    # Block indexes in int32 (the launcher refuses weights of 2^31 blocks or more): in int64 the nested scales'
    # index arithmetic held 76 registers a thread in the 1024-byte loop, in int32 64 (8 programs per SM, not 6)
    row_blocks = in_range * (K // BLOCKSIZE)
    quad = tl.arange(0, SUB)[:, None] * 4 + tl.arange(0, 4)[None, :]  # [SUB, 4] word within a chunk
    CHUNK: tl.constexpr = SUB * 4
    ASM: tl.constexpr = LOOKUP != 0  # LOOKUP 0: pure Triton, as the interpreter runs it
    acc = tl.full((BLOCK_N, SUB, 4), 0.0, tl.float32)  # one float32 sum per word position
    # The lookup's table, the same in every thread (scalars; an empty tuple for LOOKUP 0)
    if LOOKUP == 1:  # the 16 codes, as int32 bits
        c = code_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        table = (tl.load(c), tl.load(c + 1), tl.load(c + 2), tl.load(c + 3), tl.load(c + 4), tl.load(c + 5),
                 tl.load(c + 6), tl.load(c + 7), tl.load(c + 8), tl.load(c + 9), tl.load(c + 10), tl.load(c + 11),
                 tl.load(c + 12), tl.load(c + 13), tl.load(c + 14), tl.load(c + 15))
    elif LOOKUP == 2:  # two copies, read by even and odd lanes: ptxas cannot hold the words in uniform registers,
        t = lut_ptr + 8 * (_lane_id(acc) & 1)  # which prmt cannot read (a move per use)
        table = (tl.load(t), tl.load(t + 1), tl.load(t + 2), tl.load(t + 3), tl.load(t + 4), tl.load(t + 5),
                 tl.load(t + 6), tl.load(t + 7))
    else:
        table = ()
    words, stored, scale2 = _row_loads(words_ptr, absmax_ptr, absmax2_ptr, row_start, row_blocks, row_ok, 0,
                                       row_words, SUB, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED)
    if PREFETCH == 1:
        xr = _x_load(x_ptr, quad, quad < row_words, X_MODE, ASM)
    for start in range(0, row_words, CHUNK):
        word = start + quad  # [SUB, 4]
        # Software pipelining: chunk i + 1's loads are in flight during chunk i's arithmetic
        if PREFETCH == 1:
            words_n, stored_n, scale2_n = _row_loads(words_ptr, absmax_ptr, absmax2_ptr, row_start, row_blocks, row_ok,
                                                     start + CHUNK, row_words, SUB, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED)
            xr_n = _x_load(x_ptr, word + CHUNK, word + CHUNK < row_words, X_MODE, ASM)
        elif PREFETCH == 2:  # W and its scales only: x, from L1, is loaded below, for this chunk
            words_n = _row_words(words_ptr, row_start, row_ok, start + CHUNK, row_words, SUB)
            stored_n, scale2_n = _row_scales(absmax_ptr, absmax2_ptr, row_blocks, row_ok, start + CHUNK, row_words, SUB,
                                             BLOCKSIZE, NESTED_BLOCKSIZE, NESTED)
        elif start > 0:
            words, stored, scale2 = _row_loads(words_ptr, absmax_ptr, absmax2_ptr, row_start, row_blocks, row_ok, start,
                                               row_words, SUB, BLOCKSIZE, NESTED_BLOCKSIZE, NESTED)
        if NESTED:
            absmax = tl.load(code2_ptr + stored.to(tl.int32)) * scale2 + tl.load(offset_ptr)  # two roundings
        else:
            absmax = stored
        if PREFETCH != 1:
            xr = _x_load(x_ptr, word, word < row_words, X_MODE, ASM)
        x0, x1, x2, x3, x4, x5, x6, x7 = _x_values(x_ptr, xr, word, word < row_words, X_MODE)
        s = _word_dot(words, table, code_ptr, x0[None], x1[None], x2[None], x3[None], x4[None], x5[None], x6[None],
                      x7[None], LOOKUP)
        acc = tl.fma(absmax[:, :, None], s, acc)  # each word's sum times its block's absmax
        if PREFETCH == 1:
            words, stored, scale2, xr = words_n, stored_n, scale2_n, xr_n
        elif PREFETCH == 2:
            words, stored, scale2 = words_n, stored_n, scale2_n
    tl.store(y_ptr + rows, _round_out(_sum12(acc), y_ptr, SOFT_BF16), mask=row_ok)


INTERPRETED = isinstance(gemv_4bit_kernel, InterpretedFunction)


def _twin(interpret: bool):
    """This module loaded with TRITON_INTERPRET=1 (interpret=True) or =0: see qlora_ref.kernels.twins."""
    return twin(__name__, __file__, interpret, INTERPRETED)


def _power_of_two(name, value):
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


def gemv_config(K: int, blocksize: int, block_n=None, chunk_bytes=None, num_warps=None, prefetch=None):
    """(BLOCK_N, SUB, HALF, num_warps, PREFETCH): gemv_4bit_kernel's tile for rows of K values in blocks of
    `blocksize`, and whether it loads a chunk ahead (None and "weights" mean yes: it has one prefetch)."""
    block_n = _power_of_two("block_n", block_n or DEFAULT_BLOCK_N)
    chunk = _power_of_two("chunk_bytes", chunk_bytes or DEFAULT_CHUNK_BYTES)
    chunk = min(chunk, triton.next_power_of_2(max(K // 2, 1)))  # no wider than a row (small K)
    half = min(blocksize // 2, chunk)
    return block_n, chunk // half, half, num_warps or DEFAULT_NUM_WARPS, prefetch is None or bool(prefetch)


def row_defaults(K: int, nested: bool):
    """(chunk_bytes, prefetch): gemv_4bit_row_kernel's defaults for rows of K values, the fastest of bench.gemv's
    sweep on the Llama weights (bench/experiments/README.md): rows of WIDE_FROM_K values or more, 1024-byte chunks
    (two loads of W in flight a lane) without prefetch; shorter rows, 512-byte chunks with W, its scales and x a
    chunk ahead, or for nested absmax W and its scales only (x, an L1 hit, in its own iteration).
    """
    if K >= WIDE_FROM_K:
        return WIDE_CHUNK_BYTES, False
    return ROW_CHUNK_BYTES, "weights" if nested else True


def gemv_row_config(K: int, nested: bool, block_n=None, chunk_bytes=None, num_warps=None, prefetch=None):
    """(BLOCK_N, SUB, num_warps, PREFETCH): gemv_4bit_row_kernel's tile, SUB groups of 16 bytes per row and
    iteration, and what it loads a chunk ahead (PREFETCHES); chunk_bytes and prefetch default by row_defaults."""
    default_chunk, default_prefetch = row_defaults(K, nested)
    block_n = _power_of_two("block_n", block_n or ROW_BLOCK_N)
    chunk = _power_of_two("chunk_bytes", chunk_bytes or default_chunk)
    prefetch = PREFETCHES[default_prefetch if prefetch is None else prefetch]
    return block_n, max(1, min(chunk // 16, triton.next_power_of_2(K // 32))), num_warps or ROW_NUM_WARPS, prefetch


def _takes_row_kernel(M: int, row_kernel: bool, scale_sums: bool) -> bool:
    """gemv_4bit_row_kernel: one row of x, sums scaled by the absmax (scale_sums). Its 4-word groups (32 values)
    never span two blocks: every blocksize is a multiple of 32 (qlora_ref.validation.BLOCKSIZES)."""
    return row_kernel and M == 1 and scale_sums


_W_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_X_MODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _pair_table(code: torch.Tensor, device) -> torch.Tensor:
    """int64 [256]: entry b holds the float32 pair (code[b >> 4], code[b & 15]), the first in the low word.

    Cached per codebook tensor (qlora_ref.codebooks.derived_table): building it costs a few torch calls,
    as long as the whole GEMV of a small weight."""
    return derived_table(code, device, _build_pair_table)


def _build_pair_table(code: torch.Tensor, device) -> torch.Tensor:
    c = code.to(device=device, dtype=torch.float32).reshape(16)
    b = torch.arange(256, device=device)
    return torch.stack([c[b >> 4], c[b & 15]], dim=1).contiguous().view(torch.int64).reshape(256)


def _build_half_codes(code: torch.Tensor, device) -> torch.Tensor:
    """float32 [16]: the codebook rounded to fp16, the values lookup="prmt" uses (and its interpreter twin)."""
    return code.to(device=device, dtype=torch.float16).to(torch.float32).reshape(16).contiguous()


def _build_prmt_table(code: torch.Tensor, device) -> torch.Tensor:
    """int32 [16]: the fp16 codes' low bytes (4 words, entry i in byte i % 4 of word i // 4), then their high
    bytes; twice (see gemv_4bit_row_kernel)."""
    half = code.to(device=device, dtype=torch.float16).reshape(16).view(torch.uint8).reshape(16, 2)
    return torch.cat([half[:, 0], half[:, 1]] * 2).contiguous().view(torch.int32)


def gemv_4bit_triton(x: torch.Tensor, packed: torch.Tensor, state: QuantState, *, block_n=None, chunk_bytes=None,
                     num_warps=None, soft_bf16=None, pairs: bool = False, split_x: bool = True,
                     scale_sums: bool = True, prefetch=None, row_kernel: bool = True,
                     lookup: str = "shuffle") -> torch.Tensor:
    """y = x @ W^T for a 4-bit W ([N, K], `packed` + `state` from quantize_4bit), in x's dtype.

    x: [..., K] float32 / float16 / bfloat16 (meant for 1 to MAX_ROWS rows in all). W is dequantized in
    registers; products and sums are float32. CPU tensors run in Triton's interpreter. One row of x takes
    gemv_4bit_row_kernel (unless row_kernel=False or scale_sums=False), more rows gemv_4bit_kernel.
    Tuning knobs (bench.gemv compares them): `block_n`, `chunk_bytes`, `num_warps`, `prefetch` for
    either kernel; `lookup` ("shuffle", "prmt" or "memory") for the row kernel; `pairs`, `split_x`,
    `scale_sums` for gemv_4bit_kernel. `prefetch`: True (W, its scales and x a chunk ahead), False, "weights"
    (W and its scales only; the row kernel: gemv_4bit_kernel takes it as True) or None: the row kernel's
    choice by row_defaults, True for gemv_4bit_kernel.
    """
    if not isinstance(state, QuantState) or state.quant_type is None or state.bits_per_code != 4:
        raise TypeError("gemv_4bit_triton needs the 4-bit QuantState returned by quantize_4bit "
                        f"(got {type(state).__name__}{'' if not isinstance(state, QuantState) else ' of an 8-bit state'})")
    if not isinstance(x, torch.Tensor) or x.dtype not in _W_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"x must be a float32, float16 or bfloat16 tensor, got {got}")
    state.check_codes(packed)
    if len(state.shape) != 2:
        raise ValueError(f"the quantized weight must be 2-D [N, K], got shape {tuple(state.shape)}")
    N, K = state.shape
    if x.dim() == 0 or x.shape[-1] != K:
        raise ValueError(f"x's last dimension must be the weight's K = {K} (W is {N} x {K}), "
                         f"got x of shape {tuple(x.shape)}")
    if K % state.blocksize:
        raise ValueError(f"gemv_4bit_triton needs K to be a multiple of the blocksize (a block inside one row): "
                         f"K = {K}, blocksize = {state.blocksize}")
    blocks = N * (K // state.blocksize)
    if blocks >= MAX_BLOCKS:
        raise ValueError(f"gemv_4bit_triton indexes blocks in int32: a {N} x {K} weight in blocks of {state.blocksize} "
                         f"has {blocks:,}, at most {MAX_BLOCKS - 1:,} are supported")
    if prefetch is not None and prefetch not in PREFETCHES:
        raise ValueError(f"prefetch must be True, False, 'weights' or None, got {prefetch!r}")
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup must be one of {', '.join(LOOKUPS)}, got {lookup!r}")
    if lookup == "prmt" and state.dtype == torch.float32:
        raise ValueError("lookup='prmt' rounds the codes to fp16, too coarse for float32 weights")
    device = x.device
    if packed.device != device:
        raise ValueError(f"x is on {device} but the packed weight on {packed.device}")
    if device.type == "cpu" and not INTERPRETED:
        return _twin(interpret=True).gemv_4bit_triton(x, packed, state, block_n=block_n, chunk_bytes=chunk_bytes,
                                                      num_warps=num_warps, soft_bf16=soft_bf16, pairs=pairs,
                                                      split_x=split_x, scale_sums=scale_sums, prefetch=prefetch,
                                                      row_kernel=row_kernel, lookup=lookup)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=device)
    if M == 0 or N == 0:
        return y.reshape(*lead, N)
    if block_n is None and INTERPRETED:
        block_n = INTERPRETER_BLOCK_N  # the interpreter pays per program, hardly per value

    absmax = _on(state.absmax, device)
    if state.nested:
        absmax2 = _on(state.state2.absmax, device, torch.float32)
        code2 = _on(state.state2.code, device, torch.float32)
        offset = state.offset if isinstance(state.offset, torch.Tensor) else torch.tensor(float(state.offset))
        offset = _on(offset.reshape(1), device, torch.float32)
        nested_blocksize = state.state2.blocksize
    else:
        absmax2, code2, offset = absmax, absmax, absmax  # not read
        nested_blocksize = 256
    if soft_bf16 is None:
        soft_bf16 = INTERPRETED
    soft_bf16 = bool(soft_bf16) and torch.bfloat16 in (state.dtype, x.dtype)

    if _takes_row_kernel(M, row_kernel, scale_sums):
        block_n, sub, num_warps, prefetch = gemv_row_config(K, state.nested, block_n, chunk_bytes, num_warps, prefetch)
        if lookup == "prmt":  # fp16 codes, in byte planes for prmt and as float32 for the interpreter
            code, lut = derived_table(state.code, device, _build_half_codes), derived_table(state.code, device,
                                                                                             _build_prmt_table)
        else:
            code = lut = _on(state.code, device, torch.float32)
        x_mode = _X_MODES[x.dtype] if x2.data_ptr() % 16 == 0 else 2
        # The interpreter runs no inline assembly: it looks codes up in memory, the same values in the same order.
        constexprs = (state.blocksize, nested_blocksize, state.nested, block_n, sub, 0 if INTERPRETED else LOOKUPS[lookup],
                      x_mode, soft_bf16, prefetch)
        launch(gemv_4bit_row_kernel, ROW_CONSTEXPRS, (triton.cdiv(N, block_n), 1, 1),
               (x2, _on(packed, device), absmax, code, lut, absmax2, code2, offset, y, N, K), constexprs, num_warps,
               enable_fp_fusion=False)  # the nested absmax: a product, then a separately rounded sum
        return y.reshape(*lead, N)

    block_n, sub, half, num_warps, prefetch = gemv_config(K, state.blocksize, block_n, chunk_bytes, num_warps, prefetch)
    code = _pair_table(state.code, device) if pairs else _on(state.code, device, torch.float32)
    m_tile = 1 if M == 1 else min(MAX_ROWS, triton.next_power_of_2(M))
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, m_tile), 1)
    args = (x2, _on(packed, device), absmax, code, absmax2, code2, offset, y, M, N, K, x2.stride(0), y.stride(0))
    constexprs = (state.blocksize, nested_blocksize, state.nested, block_n, sub, half, _W_DTYPES[state.dtype],
                  soft_bf16, bool(pairs), bool(split_x), m_tile, bool(scale_sums), prefetch)
    launch(gemv_4bit_kernel, CONSTEXPRS, grid, args, constexprs, num_warps, enable_fp_fusion=False)
    return y.reshape(*lead, N)


CONSTEXPRS = ("BLOCKSIZE", "NESTED_BLOCKSIZE", "NESTED", "BLOCK_N", "SUB", "HALF", "W_DTYPE", "SOFT_BF16", "PAIRS",
              "SPLIT_X", "M_TILE", "SCALE_SUMS", "PREFETCH")
ROW_CONSTEXPRS = ("BLOCKSIZE", "NESTED_BLOCKSIZE", "NESTED", "BLOCK_N", "SUB", "LOOKUP", "X_MODE", "SOFT_BF16",
                  "PREFETCH")


def compile_ahead(capability: int, dtype: torch.dtype = torch.bfloat16, blocksize: int = 64, nested: bool = False,
                  K: int = 4096, *, block_n=None, chunk_bytes=None, num_warps=None, pairs=False, split_x=True,
                  m_tile: int = 1, scale_sums: bool = True, prefetch=None, row_kernel: bool = True,
                  lookup: str = "shuffle"):
    """Compile the kernel for a GPU that need not be here (x, y and W all `dtype`); returns Triton's
    CompiledKernel (`.asm["ptx"]`, `.asm["cubin"]`). Pointers are declared 16-byte aligned and the sizes
    int32, as the launcher specializes them for fresh tensors. m_tile = 1 compiles gemv_4bit_row_kernel where
    gemv_4bit_triton would take it (row_kernel and scale_sums)."""
    t = "*" + TRITON_TYPES[dtype]
    absmax_type = "*u8" if nested else "*fp32"
    if _takes_row_kernel(m_tile, row_kernel, scale_sums):
        block_n, sub, num_warps, prefetch = gemv_row_config(K, nested, block_n, chunk_bytes, num_warps, prefetch)
        kernel = _twin(interpret=False).gemv_4bit_row_kernel
        pointers = {"x_ptr": t, "packed_ptr": "*u8", "absmax_ptr": absmax_type, "code_ptr": "*fp32", "lut_ptr": "*i32",
                    "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32", "y_ptr": t}
        ints = {"N": "i32", "K": "i32"}
        constexprs = {"BLOCKSIZE": blocksize, "NESTED_BLOCKSIZE": 256, "NESTED": nested, "BLOCK_N": block_n,
                      "SUB": sub, "LOOKUP": LOOKUPS[lookup], "X_MODE": _X_MODES[dtype], "SOFT_BF16": False,
                      "PREFETCH": prefetch}
    else:
        block_n, sub, half, num_warps, prefetch = gemv_config(K, blocksize, block_n, chunk_bytes, num_warps, prefetch)
        kernel = _twin(interpret=False).gemv_4bit_kernel
        pointers = {"x_ptr": t, "packed_ptr": "*u8", "absmax_ptr": absmax_type, "code_ptr": "*i64" if pairs else "*fp32",
                    "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32", "y_ptr": t}
        ints = {"M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32"}
        constexprs = {"BLOCKSIZE": blocksize, "NESTED_BLOCKSIZE": 256, "NESTED": nested, "BLOCK_N": block_n,
                      "SUB": sub, "HALF": half, "W_DTYPE": _W_DTYPES[dtype], "SOFT_BF16": False, "PAIRS": pairs,
                      "SPLIT_X": split_x, "M_TILE": m_tile, "SCALE_SUMS": scale_sums, "PREFETCH": prefetch}
    aligned = [*pointers, *(name for name in ints if name != "M")]
    return compile_for(kernel, capability, pointers, ints, constexprs, num_warps, aligned=aligned)
