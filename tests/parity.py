"""Helpers for comparing qlora_ref with bitsandbytes byte for byte."""

import bitsandbytes.functional as bnb
import torch

import qlora_ref as Q


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
    bnb_values = bnb.dequantize_4bit(bnb_packed, bnb_state)
    assert values.shape == x.shape and values.dtype == x.dtype
    # bitsandbytes' CPU kernel returns [1, n] for a 1-D input, and the transpose when the packed
    # tensor has a single byte (its "BC shim" for a [1, n] layout): compare in x's shape.
    assert_equal("dequantized", values, bnb_values.reshape(x.shape))


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
