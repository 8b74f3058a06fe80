"""Triton kernel 3: a fused 4-bit GEMV, y = x @ W^T for one row of x, with W stored as packed NF4 / FP4 (decoding).

What you will learn
-------------------
* Why decoding is memory-bound: for one token every weight is used once, in two multiply-adds. Dequantizing W
  to bf16 first and then calling a dense GEMV would write and read the weight again in 16 bits: 5x the traffic
  of the 4-bit codes. So the weight is dequantized in registers, multiplied with x and summed, and never
  written anywhere.
* Reading W as int32 words (8 codes): 16 bytes of one row per lane, the 32 lanes of a warp along K (512
  contiguous bytes of a row per loop iteration), one row per warp, BLOCK_N rows per program. Rows of
  WIDE_FROM_K values or more take 1024 bytes per iteration, two 16-byte groups a lane (row_defaults).
* Looking codes up in registers with a warp shuffle: lane l holds code[l % 16], and shfl.sync.idx returns
  code[nibble] from lane (l & 16) | nibble: one shift and one shuffle per code, the exact float32 codebook.
* Loading x with one 16-byte load per word (inline PTX, so that its values stay in the word's layout) and
  widening bf16 to float32 with a shift and a mask.
* Scaling sums, not weights: within a block every weight shares one absmax, so absmax * sum(code * x)
  replaces a multiply by the absmax per weight. The weights used are the exact float32 code * absmax, within
  half an ulp (in the state's dtype) of the ones dequantize_4bit writes.
* Software pipelining by hand: the loads of chunk i + 1 are issued before chunk i is computed, so that each
  thread has two chunks' bytes in flight. The loads in flight hold registers, and registers decide how many
  programs share an SM, so what is loaded ahead depends on the weight (row_defaults).
* Double quantization fused in (absmax = code2[q] * absmax2[b // 256] + offset, two float32 roundings,
  compiled with enable_fp_fusion=False as in dequantize_4bit.py).
* Accumulating in float32, one sum per word position of the tile, reduced across threads once at the end.

The math
--------
    w_{n,k} = code[q_{n,k}] * absmax_{(n*K + k) // B}                          (float32, not rounded)
    s_{n,j} = sum_{k = 8j}^{8j+7} code[q_{n,k}] * float32(x_k)                  one multiply, 7 fma, in k order
    y_n     = round_out( sum_j absmax_{(n*K + 8j) // B} * s_{n,j} )            float32 accumulation
A word's 8 values lie in one block (B is a multiple of 32), so one absmax multiplies each word's sum.

Layout (bitsandbytes'): W [N, K] flattened row-major, two codes per byte (the even k in the high nibble),
blocks of B values along the flattened order. K must be a multiple of B (a block lies inside one row; every
Llama weight qualifies); other K are refused with a clear error.

In Triton's interpreter (CPU tensors; no inline PTX) the same kernel looks codes up and loads x with tl.load:
the same codes, multiplied and added in the same order. The kernel's first design (a tile of bytes, also for
several rows of x), the other settings and lookups, and what each measured: bench/experiments/ (README.md,
gemv_variants.py).
"""


import torch
import triton
import triton.language as tl

from ..state import QuantState
from .bf16 import round_to_bf16
from .dequantize_4bit import _on
from .launch import TRITON_TYPES, compile_for, launch
from .twins import interpreted, twin

__all__ = ["compile_ahead", "gemv_4bit_row_kernel", "gemv_4bit_triton", "row_defaults", "row_settings", "MAX_BLOCKS"]


MAX_BLOCKS = 2**31  # block indexes are int32
# The settings (bench.gemv's sweep on the Llama weights chose them: bench/experiments/README.md)
ROW_BLOCK_N = 4  # rows per program, one per warp
ROW_NUM_WARPS = 4
ROW_CHUNK_BYTES = 512  # bytes of a row per loop iteration: 16 per lane
WIDE_CHUNK_BYTES = 1024  # 16 bytes at each of two places in a row per lane, 512 bytes apart
WIDE_FROM_K = 8192  # WIDE_CHUNK_BYTES, without prefetch, from rows of this many values
INTERPRETER_BLOCK_N = 64  # CPU tensors (Triton's interpreter): fewer, larger programs run much faster
PREFETCHES = {False: 0, True: 1, "weights": 2}  # what the kernel loads one chunk ahead: see row_defaults


_round_to_bf16 = triton.jit(round_to_bf16)


@triton.jit
def _block_scales(absmax_ptr, absmax2_ptr, block, ok, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """The stored absmax of these blocks (uint8 codes when NESTED) and the nested scale of each (NESTED only;
    else the stored absmax again): what the kernel loads per block before decoding."""
    stored = tl.load(absmax_ptr + block, mask=ok, other=0)
    if NESTED:
        scale2 = tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=ok, other=0.0)
    else:
        scale2 = stored
    return stored, scale2


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


# The 8 codes of a word by warp shuffles. Lane l holds src = code[l % 16], picked from the 16 codes
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


@triton.jit
def _word_codes(words, table, code_ptr, ASM: tl.constexpr):
    """The 8 codes of each int32 word as float32, in the order of k. ASM: by warp shuffles from `table`, the 16
    codes as int32 bits (the same in every thread); else gathered from code_ptr (the interpreter's way)."""
    if ASM:
        t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15 = table
        c0, c1, c2, c3, c4, c5, c6, c7 = tl.inline_asm_elementwise(
            _SHUFFLE_ASM, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r,r",
            [words, t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15], dtype=(tl.int32,) * 8,
            is_pure=True, pack=1)
        return (c0.to(tl.float32, bitcast=True), c1.to(tl.float32, bitcast=True), c2.to(tl.float32, bitcast=True),
                c3.to(tl.float32, bitcast=True), c4.to(tl.float32, bitcast=True), c5.to(tl.float32, bitcast=True),
                c6.to(tl.float32, bitcast=True), c7.to(tl.float32, bitcast=True))
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
def _word_dot(words, table, code_ptr, x0, x1, x2, x3, x4, x5, x6, x7, ASM: tl.constexpr):
    """sum_k code[q_k] * x_k over the 8 codes of each word: a multiply, then multiply-adds in the order of k."""
    c0, c1, c2, c3, c4, c5, c6, c7 = _word_codes(words, table, code_ptr, ASM)
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
    code_ptr,  # float32 [16]: the 4-bit codebook
    absmax2_ptr,  # float32: scales of the absmax codes, one per NESTED_BLOCKSIZE (NESTED only)
    code2_ptr,  # float32 [256]: the 8-bit map of the absmax codes (NESTED only)
    offset_ptr,  # float32 [1]: mean of absmax (NESTED only)
    y_ptr,  # [N] output, x's dtype
    N, K,  # sizes; K a multiple of 32
    BLOCKSIZE: tl.constexpr,  # values per absmax, a multiple of 32
    NESTED_BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    BLOCK_N: tl.constexpr,  # output rows per program
    SUB: tl.constexpr,  # groups of 4 words (16 bytes) per row and loop iteration
    ASM: tl.constexpr,  # inline PTX: codes by warp shuffles, x by 16-byte loads (False: tl.load, as interpreted)
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
    # Block indexes in int32 (the launcher refuses weights of 2^31 blocks or more): the nested scales' index
    # arithmetic then holds fewer registers a thread, and more programs fit on an SM
    row_blocks = in_range * (K // BLOCKSIZE)
    quad = tl.arange(0, SUB)[:, None] * 4 + tl.arange(0, 4)[None, :]  # [SUB, 4] word within a chunk
    CHUNK: tl.constexpr = SUB * 4
    acc = tl.full((BLOCK_N, SUB, 4), 0.0, tl.float32)  # one float32 sum per word position
    if ASM:  # the 16 codes as int32 bits, the same in every thread (scalars), for the shuffles
        c = code_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
        table = (tl.load(c), tl.load(c + 1), tl.load(c + 2), tl.load(c + 3), tl.load(c + 4), tl.load(c + 5),
                 tl.load(c + 6), tl.load(c + 7), tl.load(c + 8), tl.load(c + 9), tl.load(c + 10), tl.load(c + 11),
                 tl.load(c + 12), tl.load(c + 13), tl.load(c + 14), tl.load(c + 15))
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
                      x7[None], ASM)
        acc = tl.fma(absmax[:, :, None], s, acc)  # each word's sum times its block's absmax
        if PREFETCH == 1:
            words, stored, scale2, xr = words_n, stored_n, scale2_n, xr_n
        elif PREFETCH == 2:
            words, stored, scale2 = words_n, stored_n, scale2_n
    tl.store(y_ptr + rows, _round_out(_sum12(acc), y_ptr, SOFT_BF16), mask=row_ok)


INTERPRETED = interpreted(gemv_4bit_row_kernel)
CONSTEXPRS = ("BLOCKSIZE", "NESTED_BLOCKSIZE", "NESTED", "BLOCK_N", "SUB", "ASM", "X_MODE", "SOFT_BF16", "PREFETCH")
_X_MODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}


def _twin(interpret: bool):
    """This module loaded with TRITON_INTERPRET=1 (interpret=True) or =0: see qlora_ref.kernels.twins."""
    return twin(__name__, __file__, interpret, INTERPRETED)


def row_defaults(K: int, nested: bool):
    """(chunk_bytes, prefetch) for rows of K values: rows of WIDE_FROM_K values or more take 1024-byte chunks
    (two loads of W in flight a lane) and load nothing ahead; shorter rows, 512-byte chunks with W, its scales
    and x a chunk ahead, or for a nested absmax W and its scales only ("weights": x, an L1 hit, in its own
    iteration), which holds fewer registers."""
    if K >= WIDE_FROM_K:
        return WIDE_CHUNK_BYTES, False
    return ROW_CHUNK_BYTES, "weights" if nested else True


def sub_groups(K: int, chunk_bytes: int) -> int:
    """SUB: 16-byte groups of a row per loop iteration, no more than a row holds (rounded up to a power of two)."""
    return max(1, min(chunk_bytes // 16, triton.next_power_of_2(K // 32)))


def row_settings(K: int, nested: bool):
    """(BLOCK_N, SUB, num_warps, PREFETCH): the kernel's settings for rows of K values (row_defaults)."""
    chunk_bytes, prefetch = row_defaults(K, nested)
    return ROW_BLOCK_N, sub_groups(K, chunk_bytes), ROW_NUM_WARPS, PREFETCHES[prefetch]


def _check(x: torch.Tensor, packed: torch.Tensor, state: QuantState):
    """(N, K) of the weight, once x, packed and state are known to fit together."""
    if not isinstance(state, QuantState) or state.quant_type is None or state.bits_per_code != 4:
        raise TypeError("gemv_4bit_triton needs the 4-bit QuantState returned by quantize_4bit "
                        f"(got {type(state).__name__}{'' if not isinstance(state, QuantState) else ' of an 8-bit state'})")
    if not isinstance(x, torch.Tensor) or x.dtype not in _X_MODES:
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
    if packed.device != x.device:
        raise ValueError(f"x is on {x.device} but the packed weight on {packed.device}")
    return N, K


def _absmax_tensors(state: QuantState, device):
    """(absmax, absmax2, code2, offset, nested_blocksize) on `device`, as the kernel reads them; for a plain
    absmax the last three pointers are not read (any will do) and the blocksize is a placeholder."""
    absmax = _on(state.absmax, device)
    if not state.nested:
        return absmax, absmax, absmax, absmax, 256
    offset = state.offset if isinstance(state.offset, torch.Tensor) else torch.tensor(float(state.offset))
    return (absmax, _on(state.state2.absmax, device, torch.float32), _on(state.state2.code, device, torch.float32),
            _on(offset.reshape(1), device, torch.float32), state.state2.blocksize)


def _launch(x: torch.Tensor, packed: torch.Tensor, state: QuantState, y: torch.Tensor, block_n: int, sub: int,
            num_warps: int, prefetch: int, asm: bool = True):
    """Run gemv_4bit_row_kernel on x (K values, last stride 1) into y (N values), at these settings
    (bench/experiments/gemv_variants.py passes others than row_settings')."""
    device = x.device
    N, K = state.shape
    absmax, absmax2, code2, offset, nested_blocksize = _absmax_tensors(state, device)
    soft_bf16 = INTERPRETED and torch.bfloat16 in (state.dtype, x.dtype)  # the interpreter's casts truncate
    x_mode = _X_MODES[x.dtype] if x.data_ptr() % 16 == 0 else 2
    # The interpreter runs no inline assembly: it looks codes up in memory, the same values in the same order.
    constexprs = (state.blocksize, nested_blocksize, state.nested, block_n, sub, asm and not INTERPRETED, x_mode,
                  soft_bf16, prefetch)
    launch(gemv_4bit_row_kernel, CONSTEXPRS, (triton.cdiv(N, block_n), 1, 1),
           (x, _on(packed, device), absmax, _on(state.code, device, torch.float32), absmax2, code2, offset, y, N, K),
           constexprs, num_warps, enable_fp_fusion=False)  # the nested absmax: a product, then a separately rounded sum


def gemv_4bit_triton(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """y = x @ W^T for one row of x ([..., K], every leading size 1) and a 4-bit W ([N, K], `packed` + `state`
    from quantize_4bit), in x's dtype. x: float32 / float16 / bfloat16. W is dequantized in registers; products
    and sums are float32. CPU tensors run in Triton's interpreter. Several rows of x: dequantize_4bit and a
    matmul (QLoRALinear does so), or the tile kernel of bench/experiments/gemv_variants.py."""
    N, K = _check(x, packed, state)
    if x.numel() != K:
        raise ValueError(f"gemv_4bit_triton computes one row of x (decoding), got x of shape {tuple(x.shape)}")
    if (x.device.type == "cpu") != INTERPRETED:  # CPU tensors to the interpreter, CUDA ones to the compiled kernel
        return _twin(interpret=x.device.type == "cpu").gemv_4bit_triton(x, packed, state)
    x1 = x.reshape(1, K)
    if x1.stride(-1) != 1:
        x1 = x1.contiguous()
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    if N:
        block_n, sub, num_warps, prefetch = row_settings(K, state.nested)
        if INTERPRETED:
            block_n = INTERPRETER_BLOCK_N  # the interpreter pays per program, hardly per value
        _launch(x1, packed, state, y, block_n, sub, num_warps, prefetch)
    return y.reshape(*x.shape[:-1], N)


def compile_ahead(capability: int, dtype: torch.dtype = torch.bfloat16, blocksize: int = 64, nested: bool = False,
                  K: int = 4096):
    """Compile the kernel for a GPU that need not be here (x, y and W all `dtype`; the settings of rows of K
    values); returns Triton's CompiledKernel (`.asm["ptx"]`, `.asm["cubin"]`). Pointers are declared 16-byte
    aligned and the sizes int32, as the launcher specializes them for fresh tensors."""
    block_n, sub, num_warps, prefetch = row_settings(K, nested)
    t = "*" + TRITON_TYPES[dtype]
    pointers = {"x_ptr": t, "packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
                "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32", "y_ptr": t}
    constexprs = {"BLOCKSIZE": blocksize, "NESTED_BLOCKSIZE": 256, "NESTED": nested, "BLOCK_N": block_n, "SUB": sub,
                  "ASM": True, "X_MODE": _X_MODES[dtype], "SOFT_BF16": False, "PREFETCH": prefetch}
    return compile_for(_twin(interpret=False).gemv_4bit_row_kernel, capability, pointers, {"N": "i32", "K": "i32"},
                       constexprs, num_warps)
