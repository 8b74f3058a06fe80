"""Triton kernel 3: a fused 4-bit GEMV, y = x @ W^T with W stored as packed NF4 / FP4 (batch-1 decoding).

What you will learn
-------------------
* Why decoding is memory-bound: for one token (x has 1 row) every weight is used once. A 8192 x 28672
  weight in 4 bits is 117 MB; at the ~3 TB/s an H100 streams, reading it takes ~0.039 ms, and the
  arithmetic (two multiply-adds per weight) is small next to it. Dequantizing W to bf16 first and then
  calling a dense GEMV would write and read the weight again in 16 bits: 5x the traffic. So the weight is
  dequantized in registers, multiplied with x and summed, and never written anywhere.
* The tile as three dimensions: [BLOCK_N output rows, SUB sub-blocks, HALF bytes]. A sub-block of HALF
  bytes (2 * HALF values) never spans two quantization blocks, so one absmax per (row, sub-block) is
  loaded and broadcast along its bytes, instead of one per value.
* Splitting a byte into its two codes (high nibble: the even value, low nibble: the odd one) and
  multiplying each half with the matching half of x (x loaded contiguously, then `tl.split` into even
  and odd values): no interleave of the weights is needed, because a dot product does not care in which
  order it adds.
* Accumulating in float32 in a [BLOCK_N, SUB, HALF] register tile across the loop over K, and reducing it
  to [BLOCK_N] only once at the end (one cross-thread reduction per program, not one per chunk).
* Scaling sums, not weights (scale_sums=True, the default): within a block every weight shares one absmax,
  so absmax * (c_even * x_even + c_odd * x_odd) per byte replaces two multiplies by the absmax and two
  roundings of w to bf16. The weights used are then the exact float32 code * absmax, within half a bf16 ulp
  of the ones dequantize_4bit writes; scale_sums=False rounds each w as dequantize_4bit does (the products
  and sums are float32 either way). bitsandbytes' GEMV rounds the absmax and each product to bf16: its
  error against the float32 reference is about 1.5x ours (tests/test_triton_gemv_gpu.py).
* Software pipelining by hand (prefetch=True): the loads of chunk i + 1 are issued before chunk i is
  decoded. A GEMV is latency-bound when each thread has only one chunk's bytes in flight.
* Double quantization fused in (absmax = code2[q] * absmax2[b // 256] + offset, two float32
  roundings, compiled with enable_fp_fusion=False as in dequantize_4bit.py).
* Several rows of x (M <= 8, a few tokens of speculative decoding or a small batch): each chunk of W is
  dequantized once and used for every row (M_TILE rows per program); their partial sums are reduced per
  chunk into an [M_TILE, BLOCK_N] accumulator.

The math
--------
    w_{n,k} = round_dtype(code[q_{n,k}] * absmax_{(n*K + k) // B})      as dequantize_4bit
    y_{m,n} = round_out( sum_k float32(x_{m,k}) * float32(w_{n,k}) )     float32 accumulation

Layout (bitsandbytes'): W [N, K] flattened row-major, two codes per byte, blocks of B values along the
flattened order. The kernel needs K to be a multiple of B (then a block lies inside one row; every Llama
weight qualifies); other K are refused with a clear error.

Measured (H100 80GB HBM3, triton 3.6, bitsandbytes 0.50.2; bench/results/gemv-nvidia-h100-80gb-hbm3.*)
------------------------------------------------------------------------------------------------------
Accurate, not faster than bitsandbytes. On 8192x28672, one bf16 row: 0.131 ms (896 GB/s of packed weight)
against 0.123 ms for bitsandbytes' matmul_4bit and 0.176 ms for a dense bf16 GEMV; 0.82-1.02x bitsandbytes
over the four Llama weights, plain and nested, far from the ~0.039 ms floor; max error 2.1 against
bitsandbytes' 2.8-3.1.
Scaled sums and prefetching took it from 0.178 ms. What is left is instructions per byte: two codebook
lookups (index arithmetic and a load each), the nibble split and three multiply-adds. Ways on (not done):
look codes up in registers (PTX prmt on a register-held table, two values per instruction), bf16x2
arithmetic, or split K for more parallelism on short rows. For M > 1 each chunk of W is dequantized once
for up to 8 rows (M = 2: on par with bitsandbytes; M = 4: 0.37 vs 0.33 ms on 8192x28672), but the
per-chunk reductions make M = 8 slow there (bitsandbytes dequantizes and calls cuBLAS).
"""


import torch
import triton
import triton.language as tl

from ..codebooks import derived_table
from ..state import QuantState
from .dequantize_4bit import _on
from .twins import twin

__all__ = ["compile_ahead", "gemv_4bit_kernel", "gemv_4bit_triton", "gemv_config", "MAX_ROWS"]

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = ()

MAX_ROWS = 8  # rows of x per program; more rows take more programs (grid axis 1), each reading W again

# Defaults: the fastest setting of qlora_ref.bench_gemv's sweep on every Llama weight (bench/results/gemv-*.json).
DEFAULT_BLOCK_N = 8  # output rows per program
DEFAULT_CHUNK_BYTES = 512  # packed bytes of one row per loop iteration (1024 values)
DEFAULT_NUM_WARPS = 4
INTERPRETER_BLOCK_N = 64  # CPU tensors (Triton's interpreter): fewer, larger programs run much faster


@triton.jit
def _round_to_bf16(x):
    """float32 -> bfloat16, round to nearest even, in integer arithmetic (dequantize_4bit.py's, repeated
    here because a @triton.jit function must come from the module copy that is interpreted)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _load_chunk(packed_ptr, absmax_ptr, absmax2_ptr, row_bytes, row_blocks, row_ok, sub_start, sub_ok, byte,
                BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """One chunk's loads from memory: packed bytes [BLOCK_N, SUB, HALF], stored absmax [BLOCK_N, SUB] (codes
    when NESTED) and the nested scale [BLOCK_N, SUB] (NESTED only; else the stored absmax again)."""
    ok2 = row_ok[:, None] & sub_ok[None, :]  # [BLOCK_N, SUB]
    offsets = row_bytes[:, None, None] + sub_start[None, :, None] + byte[None, None, :]
    packed = tl.load(packed_ptr + offsets, mask=ok2[:, :, None], other=0)
    block = row_blocks[:, None] + (2 * sub_start[None, :]) // BLOCKSIZE  # one absmax per (row, sub-block)
    stored = tl.load(absmax_ptr + block, mask=ok2, other=0)
    if NESTED:
        scale2 = tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=ok2, other=0.0)
    else:
        scale2 = stored
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


INTERPRETED = isinstance(gemv_4bit_kernel, InterpretedFunction)


def _twin(interpret: bool):
    """This module loaded with TRITON_INTERPRET=1 (interpret=True) or =0: see qlora_ref.kernels.twins."""
    return twin(__name__, __file__, interpret, INTERPRETED)


def gemv_config(K: int, blocksize: int, block_n=None, chunk_bytes=None, num_warps=None):
    """(BLOCK_N, SUB, HALF, num_warps): the tile for rows of K values in blocks of `blocksize`."""
    block_n = block_n or DEFAULT_BLOCK_N
    chunk = chunk_bytes or DEFAULT_CHUNK_BYTES
    for name, value in (("block_n", block_n), ("chunk_bytes", chunk)):
        if value < 1 or value & (value - 1):
            raise ValueError(f"{name} must be a power of two, got {value}")
    chunk = min(chunk, triton.next_power_of_2(max(K // 2, 1)))  # no wider than a row (small K)
    half = min(blocksize // 2, chunk)
    return block_n, chunk // half, half, num_warps or DEFAULT_NUM_WARPS


_W_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _pair_table(code: torch.Tensor, device) -> torch.Tensor:
    """int64 [256]: entry b holds the float32 pair (code[b >> 4], code[b & 15]), the first in the low word.

    Cached per codebook tensor (qlora_ref.codebooks.derived_table): building it costs a few torch calls,
    as long as the whole GEMV of a small weight."""
    return derived_table(code, device, _build_pair_table)


def _build_pair_table(code: torch.Tensor, device) -> torch.Tensor:
    c = code.to(device=device, dtype=torch.float32).reshape(16)
    b = torch.arange(256, device=device)
    return torch.stack([c[b >> 4], c[b & 15]], dim=1).contiguous().view(torch.int64).reshape(256)


def gemv_4bit_triton(x: torch.Tensor, packed: torch.Tensor, state: QuantState, *, block_n=None, chunk_bytes=None,
                     num_warps=None, soft_bf16=None, pairs: bool = False, split_x: bool = True,
                     scale_sums: bool = True, prefetch: bool = True) -> torch.Tensor:
    """y = x @ W^T for a 4-bit W ([N, K], `packed` + `state` from quantize_4bit), in x's dtype.

    x: [..., K] float32 / float16 / bfloat16 (meant for 1 to MAX_ROWS rows in all). W is dequantized in
    registers; products and sums are float32. CPU tensors run in Triton's interpreter. `block_n`,
    `chunk_bytes` and `num_warps` are tuning knobs (qlora_ref.bench_gemv sweeps them).
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
    device = x.device
    if packed.device != device:
        raise ValueError(f"x is on {device} but the packed weight on {packed.device}")
    if device.type == "cpu" and not INTERPRETED:
        return _twin(interpret=True).gemv_4bit_triton(x, packed, state, block_n=block_n, chunk_bytes=chunk_bytes,
                                                      num_warps=num_warps, soft_bf16=soft_bf16, pairs=pairs,
                                                      split_x=split_x, scale_sums=scale_sums, prefetch=prefetch)
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
    block_n, sub, half, num_warps = gemv_config(K, state.blocksize, block_n, chunk_bytes, num_warps)

    code = _pair_table(state.code, device) if pairs else _on(state.code, device, torch.float32)
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
    w_dtype = _W_DTYPES[state.dtype]
    soft_bf16 = bool(soft_bf16) and torch.bfloat16 in (state.dtype, x.dtype)

    m_tile = 1 if M == 1 else min(MAX_ROWS, triton.next_power_of_2(M))
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, m_tile), 1)
    args = (x2, _on(packed, device), absmax, code, absmax2, code2, offset, y, M, N, K, x2.stride(0), y.stride(0))
    constexprs = (state.blocksize, nested_blocksize, state.nested, block_n, sub, half, w_dtype, soft_bf16, bool(pairs),
                  bool(split_x), m_tile, bool(scale_sums), bool(prefetch))
    _launch(grid, args, constexprs, num_warps)
    return y.reshape(*lead, N)


CONSTEXPRS = ("BLOCKSIZE", "NESTED_BLOCKSIZE", "NESTED", "BLOCK_N", "SUB", "HALF", "W_DTYPE", "SOFT_BF16", "PAIRS",
              "SPLIT_X", "M_TILE", "SCALE_SUMS", "PREFETCH")
FAST_LAUNCH = True
_COMPILED = {}


def _spec(value: int):
    return (value == 1, value % 16 == 0, value >= 2**31)


def _launch(grid, args, constexprs, num_warps):
    """gemv_4bit_kernel[grid](*args, **constexprs), calling the cached compiled kernel directly after the
    first launch of each specialization (see dequantize_4bit._launch: at 20 us per GEMV Python matters)."""
    pointers, ints = args[:8], args[8:]
    key = (pointers[0].device.index, pointers[0].dtype, pointers[2].dtype, pointers[3].dtype,
           tuple(p.data_ptr() % 16 == 0 for p in pointers), tuple(_spec(i) for i in ints), constexprs, num_warps)
    compiled = _COMPILED.get(key) if FAST_LAUNCH else None
    if compiled is not None:
        compiled[grid](*args, *constexprs)
        return
    compiled = gemv_4bit_kernel[grid](
        *args, **dict(zip(CONSTEXPRS, constexprs)), num_warps=num_warps,
        enable_fp_fusion=False,  # the nested absmax: a product, then a separately rounded sum
    )
    if not INTERPRETED and compiled is not None:
        _COMPILED[key] = compiled


_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def compile_ahead(capability: int, dtype: torch.dtype = torch.bfloat16, blocksize: int = 64, nested: bool = False,
                  K: int = 4096, *, block_n=None, chunk_bytes=None, num_warps=None, pairs=False, split_x=True,
                  m_tile: int = 1, scale_sums: bool = True, prefetch: bool = True):
    """Compile the kernel for a GPU that need not be here (x, y and W all `dtype`); returns Triton's
    CompiledKernel (`.asm["ptx"]`, `.asm["cubin"]`). Pointers are declared 16-byte aligned and the sizes
    int32, as the launcher specializes them for fresh tensors."""
    from triton.backends.compiler import GPUTarget

    block_n, sub, half, num_warps = gemv_config(K, blocksize, block_n, chunk_bytes, num_warps)
    kernel = _twin(interpret=False).gemv_4bit_kernel
    t = "*" + _TRITON_TYPES[dtype]
    pointers = {"x_ptr": t, "packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32",
                "code_ptr": "*i64" if pairs else "*fp32",
                "absmax2_ptr": "*fp32", "code2_ptr": "*fp32", "offset_ptr": "*fp32", "y_ptr": t}
    ints = {"M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    constexprs = {"BLOCKSIZE": blocksize, "NESTED_BLOCKSIZE": 256, "NESTED": nested, "BLOCK_N": block_n, "SUB": sub,
                  "HALF": half, "W_DTYPE": _W_DTYPES[dtype], "SOFT_BF16": False,
                  "PAIRS": pairs, "SPLIT_X": split_x, "M_TILE": m_tile, "SCALE_SUMS": scale_sums, "PREFETCH": prefetch}
    signature = {**pointers, **ints, **{name: "constexpr" for name in constexprs}}
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in [*pointers, "N", "K", "stride_xm", "stride_ym"]}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "enable_fp_fusion": False})
