"""The variants of the 4-bit GEMV (qlora_ref.kernels.gemv_4bit) that bench.gemv measures and the library does not
use; README.md here says what each was and what it measured.

- gemv_row: the library's kernel (gemv_4bit_row_kernel) at other settings: `block_n`, `chunk_bytes`, `num_warps`,
  `prefetch` (True: W, its scales and x a chunk ahead; "weights": W and its scales; False: nothing; None: as the
  library chooses, gemv_4bit.row_defaults), `lookup` ("shuffle", the library's, or "memory": codes and x by
  tl.load, what the interpreter runs, on a GPU).
- gemv_tile: gemv_4bit_kernel, the kernel's first design and the one for several rows of x (up to MAX_ROWS a
  program, each chunk of W dequantized once for all of them): a [BLOCK_N rows, SUB sub-blocks, HALF bytes] tile
  of bytes, each split into its two codes, gathered from the codebook in memory. Its switches: `pairs` (both
  codes of a byte in one 8-byte lookup), `split_x` (x loaded contiguously and split, else two stride-2 loads),
  `scale_sums` (False: round every w = code * absmax to the state's dtype as dequantize_4bit does, before the
  products), `prefetch`.
- gemv_variant: the keywords gemv_4bit_triton took before the variants moved here (bench.gemv's CONFIGS): one
  row with row_kernel and scale_sums takes gemv_row, anything else gemv_tile; no keywords, the library's call.

CPU tensors run in Triton's interpreter, as the library's do. Dropped, with its numbers in README.md: the row
kernel's lookup="prmt" (fp16 codes from a table in registers).
"""

import torch
import triton
import triton.language as tl

from qlora_ref.codebooks import derived_table
from qlora_ref.kernels import gemv_4bit
from qlora_ref.kernels.dequantize_4bit import _on
from qlora_ref.kernels.launch import TRITON_TYPES, compile_for, launch
from qlora_ref.kernels.twins import twin

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = ()


@triton.jit
def _probe():
    pass


INTERPRETED = isinstance(_probe, InterpretedFunction)
# The library's helpers, interpreted or compiled as this module is (an interpreted kernel cannot call compiled ones)
G = gemv_4bit._twin(interpret=INTERPRETED)
_block_scales, _sum12, _round_out, _round_to_bf16 = G._block_scales, G._sum12, G._round_out, G._round_to_bf16

MAX_ROWS = 8  # rows of x per program; more rows take more programs (grid axis 1), each reading W again
# gemv_4bit_kernel's defaults: the fastest of bench.gemv's sweep for it on the Llama weights
DEFAULT_BLOCK_N = 8  # output rows per program
DEFAULT_CHUNK_BYTES = 512  # packed bytes of one row per loop iteration (1024 values)
DEFAULT_NUM_WARPS = 4
LOOKUPS = ("shuffle", "memory")


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


def _twin(interpret: bool):
    """This module loaded with TRITON_INTERPRET=1 (interpret=True) or =0: see qlora_ref.kernels.twins."""
    return twin(__name__, __file__, interpret, INTERPRETED)


def _power_of_two(name, value):
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value


def _prefetch(prefetch):
    if prefetch is not None and prefetch not in G.PREFETCHES:
        raise ValueError(f"prefetch must be True, False, 'weights' or None, got {prefetch!r}")
    return prefetch


def gemv_config(K: int, blocksize: int, block_n=None, chunk_bytes=None, num_warps=None, prefetch=None):
    """(BLOCK_N, SUB, HALF, num_warps, PREFETCH): gemv_4bit_kernel's tile for rows of K values in blocks of
    `blocksize`, and whether it loads a chunk ahead (None and "weights" mean yes: it has one prefetch)."""
    block_n = _power_of_two("block_n", block_n or DEFAULT_BLOCK_N)
    chunk = _power_of_two("chunk_bytes", chunk_bytes or DEFAULT_CHUNK_BYTES)
    chunk = min(chunk, triton.next_power_of_2(max(K // 2, 1)))  # no wider than a row (small K)
    half = min(blocksize // 2, chunk)
    return block_n, chunk // half, half, num_warps or DEFAULT_NUM_WARPS, prefetch is None or bool(prefetch)


def row_config(K: int, nested: bool, block_n=None, chunk_bytes=None, num_warps=None, prefetch=None):
    """(BLOCK_N, SUB, num_warps, PREFETCH): gemv_4bit_row_kernel's settings, the library's (gemv_4bit.row_settings)
    where not given."""
    default_chunk, default_prefetch = G.row_defaults(K, nested)
    block_n = _power_of_two("block_n", block_n or G.ROW_BLOCK_N)
    chunk = _power_of_two("chunk_bytes", chunk_bytes or default_chunk)
    prefetch = G.PREFETCHES[default_prefetch if _prefetch(prefetch) is None else prefetch]
    return block_n, G.sub_groups(K, chunk), num_warps or G.ROW_NUM_WARPS, prefetch


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


def _rows(x: torch.Tensor, N: int, K: int):
    """x as [M, K] with its last stride 1, and y [M, N] to fill."""
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, torch.empty((x2.shape[0], N), dtype=x.dtype, device=x.device)


def gemv_row(x: torch.Tensor, packed: torch.Tensor, state, *, block_n=None, chunk_bytes=None, num_warps=None,
             prefetch=None, lookup: str = "shuffle") -> torch.Tensor:
    """gemv_4bit_triton's y for one row of x, by the library's kernel at these settings (None: the library's)."""
    N, K = G._check(x, packed, state)
    if x.numel() != K:
        raise ValueError(f"gemv_row computes one row of x, got x of shape {tuple(x.shape)}")
    if lookup not in LOOKUPS:
        raise ValueError(f"lookup must be one of {', '.join(LOOKUPS)}, got {lookup!r}")
    if (x.device.type == "cpu") != INTERPRETED:
        return _twin(interpret=x.device.type == "cpu").gemv_row(x, packed, state, block_n=block_n, chunk_bytes=chunk_bytes,
                                              num_warps=num_warps, prefetch=prefetch, lookup=lookup)
    x2, y = _rows(x, N, K)
    if block_n is None and INTERPRETED:
        block_n = G.INTERPRETER_BLOCK_N
    if N:
        G._launch(x2, packed, state, y, *row_config(K, state.nested, block_n, chunk_bytes, num_warps, prefetch),
                  asm=lookup == "shuffle")
    return y.reshape(*x.shape[:-1], N)


def gemv_tile(x: torch.Tensor, packed: torch.Tensor, state, *, block_n=None, chunk_bytes=None, num_warps=None,
              pairs: bool = False, split_x: bool = True, scale_sums: bool = True, prefetch=None,
              soft_bf16=None) -> torch.Tensor:
    """y = x @ W^T by gemv_4bit_kernel, for x [..., K] with any number of rows (meant for 1 to MAX_ROWS).
    `soft_bf16`: round w and y to bf16 in integer arithmetic (None: in the interpreter, whose cast truncates)."""
    N, K = G._check(x, packed, state)
    _prefetch(prefetch)
    if (x.device.type == "cpu") != INTERPRETED:
        return _twin(interpret=x.device.type == "cpu").gemv_tile(x, packed, state, block_n=block_n, chunk_bytes=chunk_bytes,
                                               num_warps=num_warps, pairs=pairs, split_x=split_x,
                                               scale_sums=scale_sums, prefetch=prefetch, soft_bf16=soft_bf16)
    device = x.device
    x2, y = _rows(x, N, K)
    M = x2.shape[0]
    if M == 0 or N == 0:
        return y.reshape(*x.shape[:-1], N)
    if block_n is None and INTERPRETED:
        block_n = G.INTERPRETER_BLOCK_N
    absmax, absmax2, code2, offset, nested_blocksize = G._absmax_tensors(state, device)
    soft_bf16 = (INTERPRETED if soft_bf16 is None else bool(soft_bf16)) and torch.bfloat16 in (state.dtype, x.dtype)
    block_n, sub, half, num_warps, prefetch = gemv_config(K, state.blocksize, block_n, chunk_bytes, num_warps, prefetch)
    code = _pair_table(state.code, device) if pairs else _on(state.code, device, torch.float32)
    m_tile = 1 if M == 1 else min(MAX_ROWS, triton.next_power_of_2(M))
    grid = (triton.cdiv(N, block_n), triton.cdiv(M, m_tile), 1)
    args = (x2, _on(packed, device), absmax, code, absmax2, code2, offset, y, M, N, K, x2.stride(0), y.stride(0))
    constexprs = (state.blocksize, nested_blocksize, state.nested, block_n, sub, half, _W_DTYPES[state.dtype],
                  soft_bf16, bool(pairs), bool(split_x), m_tile, bool(scale_sums), prefetch)
    launch(gemv_4bit_kernel, CONSTEXPRS, grid, args, constexprs, num_warps, enable_fp_fusion=False)
    return y.reshape(*x.shape[:-1], N)


def gemv_variant(x: torch.Tensor, packed: torch.Tensor, state, *, row_kernel: bool = True, scale_sums: bool = True,
                 pairs: bool = False, split_x: bool = True, lookup: str = "shuffle", **settings) -> torch.Tensor:
    """y by the keywords gemv_4bit_triton took before its variants moved here (`settings`: block_n, chunk_bytes,
    num_warps, prefetch): one row of x with row_kernel and scale_sums takes gemv_row (pairs, split_x ignored),
    anything else gemv_tile (lookup ignored). No keywords and one row: the library's gemv_4bit_triton."""
    rows = x.numel() // max(x.shape[-1], 1) if x.dim() else 1
    if rows == 1 and row_kernel and scale_sums:
        if not settings and lookup == "shuffle":
            return G.gemv_4bit_triton(x, packed, state)
        return gemv_row(x, packed, state, lookup=lookup, **settings)
    return gemv_tile(x, packed, state, scale_sums=scale_sums, pairs=pairs, split_x=split_x, **settings)


CONSTEXPRS = ("BLOCKSIZE", "NESTED_BLOCKSIZE", "NESTED", "BLOCK_N", "SUB", "HALF", "W_DTYPE", "SOFT_BF16", "PAIRS",
              "SPLIT_X", "M_TILE", "SCALE_SUMS", "PREFETCH")


def compile_tile_ahead(capability: int, dtype: torch.dtype = torch.bfloat16, blocksize: int = 64, nested: bool = False,
                       K: int = 4096, *, block_n=None, chunk_bytes=None, num_warps=None, pairs=False, split_x=True,
                       m_tile: int = 1, scale_sums: bool = True, prefetch=None):
    """gemv_4bit_kernel compiled for a GPU that need not be here, as gemv_4bit.compile_ahead compiles the library's."""
    block_n, sub, half, num_warps, prefetch = gemv_config(K, blocksize, block_n, chunk_bytes, num_warps, prefetch)
    t = "*" + TRITON_TYPES[dtype]
    pointers = {"x_ptr": t, "packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32",
                "code_ptr": "*i64" if pairs else "*fp32", "absmax2_ptr": "*fp32", "code2_ptr": "*fp32",
                "offset_ptr": "*fp32", "y_ptr": t}
    ints = {"M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_ym": "i32"}
    constexprs = {"BLOCKSIZE": blocksize, "NESTED_BLOCKSIZE": 256, "NESTED": nested, "BLOCK_N": block_n,
                  "SUB": sub, "HALF": half, "W_DTYPE": _W_DTYPES[dtype], "SOFT_BF16": False, "PAIRS": pairs,
                  "SPLIT_X": split_x, "M_TILE": m_tile, "SCALE_SUMS": scale_sums, "PREFETCH": prefetch}
    aligned = [*pointers, *(name for name in ints if name != "M")]
    return compile_for(_twin(interpret=False).gemv_4bit_kernel, capability, pointers, ints, constexprs, num_warps,
                       aligned=aligned)
