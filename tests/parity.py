"""Helpers for comparing qlora_ref with bitsandbytes byte for byte.

bitsandbytes' CPU decoder takes other paths on other CPUs (qlora_ref.bnb_cpu): the dequantized values are
compared bit for bit with its portable path, which is the same everywhere, and with its native decoder as this
CPU runs it, against what that path computes (`native_dequantize_4bit_expected`).
"""

import bitsandbytes.functional as bnb
import torch

import qlora_ref as Q
from qlora_ref.blockwise import unpack_4bit
from qlora_ref.bnb_cpu import avx512_reads_wrong_scales, decoder_rows, dequantize_4bit_path, dequantize_4bit_portable
from qlora_ref.double_quant import decompress_absmax


def assert_equal(name, ours, theirs):
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} vs bitsandbytes {theirs.dtype}"
    assert ours.shape == theirs.shape, f"{name}: shape {tuple(ours.shape)} vs bitsandbytes {tuple(theirs.shape)}"
    if not torch.equal(ours, theirs):
        differ = (ours != theirs).reshape(-1).nonzero().reshape(-1)
        i = int(differ[0])
        raise AssertionError(
            f"{name}: {differ.numel()} of {ours.numel()} differ, first at flat index {i}: "
            f"ours {ours.reshape(-1)[i].item()!r} vs bitsandbytes {theirs.reshape(-1)[i].item()!r}"
        )


def assert_same_bits(name, ours, theirs):
    """Equal dtype, shape and bits (so -0.0 is not 0.0)."""
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, f"{name}: {ours.dtype} {tuple(ours.shape)} vs {theirs.dtype} {tuple(theirs.shape)}"
    integer = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[ours.dtype]
    assert_equal(name, ours.view(integer), theirs.view(integer))


def with_bitsandbytes_table(packed, state, misread=False):
    """table[code] * absmax with bitsandbytes' Python table, whose FP4 code 8 is +0.0 (ours: -0.0): what its
    portable, NEON and AVX-512 paths compute. misread=True models the AVX-512 loop of csrc/cpu_ops.cpp, which
    scales value j of row r by absmax[r * (n // B) + j // B] instead of its own block's."""
    m, n = decoder_rows(state.shape)
    blocksize = state.blocksize
    absmax = decompress_absmax(state.absmax, state.offset, state.state2) if state.nested else state.absmax
    codes = unpack_4bit(packed, state.numel).long()
    if misread:
        block = (torch.arange(m)[:, None] * (n // blocksize) + torch.arange(n)[None, :] // blocksize).reshape(-1)
    else:
        block = torch.arange(state.numel) // blocksize
    table = bnb.get_4bit_type(state.quant_type, device="cpu")
    return (table[codes] * absmax[block]).to(state.dtype).reshape(state.shape)


def native_dequantize_4bit_expected(packed, state):
    """What bitsandbytes' own dequantize_4bit returns on this CPU for our bytes, path by path (qlora_ref.bnb_cpu):
    our values on its scalar loop, its Python table's on the others, and the AVX-512 loop's misread scales where
    it reads them wrong."""
    path = dequantize_4bit_path(state.shape, state.blocksize)
    if path == "scalar":
        return Q.dequantize_4bit(packed, state)
    misread = path == "avx512" and avx512_reads_wrong_scales(state.shape, state.blocksize)
    return with_bitsandbytes_table(packed, state, misread)


def assert_4bit_matches_bitsandbytes(x, blocksize, quant_type, double_quant):
    packed, state = Q.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)
    bnb_packed, bnb_state = bnb.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    assert_equal("packed codes", packed, bnb_packed)
    assert_equal("absmax", state.absmax, bnb_state.absmax)
    assert_equal("code", state.code, bnb_state.code)
    assert state.nested == bnb_state.nested
    if double_quant:
        assert_equal("offset", state.offset, bnb_state.offset)
        assert_equal("nested absmax", state.state2.absmax, bnb_state.state2.absmax)
        assert_equal("nested code", state.state2.code, bnb_state.state2.code)
        assert state.state2.blocksize == bnb_state.state2.blocksize == 256
    values = Q.dequantize_4bit(packed, state)
    assert values.shape == x.shape and values.dtype == x.dtype
    portable = dequantize_4bit_portable(bnb_packed, bnb_state)
    assert_equal("dequantized vs bitsandbytes' portable path", values, portable)  # torch.equal: -0.0 == 0.0
    assert_same_bits("bitsandbytes' portable path", with_bitsandbytes_table(packed, state), portable)
    # bitsandbytes' CPU kernel returns [1, n] for a 1-D input, and the transpose when the packed
    # tensor has a single byte (its "BC shim" for a [1, n] layout): compare in x's shape.
    assert_same_bits(f"dequantized vs bitsandbytes' {dequantize_4bit_path(x.shape, blocksize)} path on this CPU",
                     native_dequantize_4bit_expected(packed, state),
                     bnb.dequantize_4bit(bnb_packed, bnb_state).reshape(x.shape))


def assert_8bit_matches_bitsandbytes(x, blocksize, code=None):
    q, state = Q.quantize_blockwise(x, code=code, blocksize=blocksize)
    bnb_q, bnb_state = bnb.quantize_blockwise(x, code=code, blocksize=blocksize)
    assert_equal("8-bit codes", q, bnb_q)
    assert_equal("absmax", state.absmax, bnb_state.absmax)
    assert_equal("dequantized", Q.dequantize_blockwise(q, state), bnb.dequantize_blockwise(bnb_q, bnb_state))


def make_optimizer_pair(shapes, seed=0, device="cpu", dtype=torch.float32, **options):
    """The same random parameters twice, one copy under qlora_ref's AdamW8bit and one under bitsandbytes'."""
    import bitsandbytes

    from qlora_ref.optim8bit import AdamW8bit

    torch.manual_seed(seed)
    init = [torch.randn(shape, device=device).to(dtype) for shape in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    return ours, AdamW8bit(ours, **options), theirs, bitsandbytes.optim.AdamW8bit(theirs, **options)


def step_both(ours, opt_ours, theirs, opt_theirs, grads):
    """One step of both optimizers on the same gradients."""
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    opt_ours.step()
    opt_theirs.step()
