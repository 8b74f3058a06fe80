"""The Triton quantize kernels on a CPU (Triton's interpreter) against cuda_semantics, their PyTorch spec.

No GPU is needed. Three layers are checked here:
  1. Triton (quantize_4bit_triton, quantize_blockwise_triton, dequantize_blockwise_triton) == cuda_semantics,
     byte for byte: NF4 / FP4, plain and nested, every block size, fp32 / fp16 / bf16, odd n, all-zero
     blocks, values on the thresholds, denormals.
  2. cuda_semantics (bitsandbytes' CUDA bytes) against qlora_ref's reference (bitsandbytes' CPU bytes):
     equal wherever the two flavours of bitsandbytes agree, and the places where they differ, counted.
  3. Ahead-of-time compilation for sm_75 (a Colab T4), sm_80 and sm_90, and what the PTX holds.
On a CPU both the kernel and the spec use the correctly rounded reciprocal; on a GPU the kernel uses
MUFU.RCP, and test_triton_quantize_gpu.py compares it with bitsandbytes itself. Shapes stay small.
"""

import re

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton; Linux only)")

import qlora_ref as Q  # noqa: E402
from qlora_ref.kernels import cuda_semantics as C  # noqa: E402
from qlora_ref.kernels import quantize_4bit as K  # noqa: E402
from qlora_ref.kernels.blockwise_8bit import dequantize_blockwise_triton, quantize_blockwise_triton  # noqa: E402
from qlora_ref.kernels.quantize_4bit import compile_ahead, quantize_4bit_triton  # noqa: E402
from qlora_ref.validation import BLOCKSIZES  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sample(n, dtype, seed=0, zero_values=0):
    """N(0, 9) values, the first `zero_values` of them 0 (all-zero blocks), a -0.0 and a denormal among them."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 3
    x[:zero_values] = 0
    if n > zero_values + 4:
        x[zero_values] = -0.0
        x[zero_values + 1] = 1e-39  # float32 denormal (bf16 keeps it; fp16 rounds it to 0)
    return x.to(dtype)


def assert_equal(name, mine, theirs):
    assert mine.dtype == theirs.dtype and mine.shape == theirs.shape, (name, mine.dtype, theirs.dtype, mine.shape)
    if mine.is_floating_point():
        same = (mine == theirs) | (mine.isnan() & theirs.isnan())
        same &= torch.signbit(mine) == torch.signbit(theirs)
    else:
        same = mine == theirs
    if not bool(same.all()):
        differ = (~same).reshape(-1).nonzero().reshape(-1)
        i = int(differ[0])
        raise AssertionError(f"{name}: {differ.numel()} of {mine.numel()} differ, first at {i}: "
                             f"{mine.reshape(-1)[i].item()!r} vs {theirs.reshape(-1)[i].item()!r}")


def assert_same_4bit(ours, spec):
    (packed, state), (spec_packed, spec_state) = ours, spec
    assert_equal("packed", packed, spec_packed)
    assert_equal("absmax", state.absmax, spec_state.absmax)
    assert state.shape == spec_state.shape and state.dtype == spec_state.dtype
    assert state.blocksize == spec_state.blocksize and state.quant_type == spec_state.quant_type
    assert_equal("code", state.code, spec_state.code)
    assert state.nested == spec_state.nested
    if state.nested:
        assert_equal("offset", state.offset.reshape(()), spec_state.offset.reshape(()))
        assert_equal("state2.absmax", state.state2.absmax, spec_state.state2.absmax)
        assert_equal("state2.code", state.state2.code, spec_state.state2.code)


# ---------------------------------------------------------------------------------------------------------
# 1. Triton == cuda_semantics


CASES = [(b, "nf4" if i % 2 == 0 else "fp4", d) for i, b in enumerate(BLOCKSIZES) for d in DTYPES]


@pytest.mark.parametrize("blocksize,quant_type,dtype", CASES, ids=[f"{t}-{b}-{str(d)[6:]}" for b, t, d in CASES])
def test_4bit_matches_cuda_semantics(blocksize, quant_type, dtype):
    """Odd n, a short last block, all-zero blocks (the first 2 * blocksize values), nested for half of them."""
    nested = blocksize in (32, 128, 512, 2048) or dtype == torch.bfloat16
    x = sample(3 * blocksize + 77, dtype, seed=blocksize, zero_values=2 * blocksize).reshape(1, -1)
    assert_same_4bit(quantize_4bit_triton(x, blocksize, quant_type, nested), C.quantize_4bit(x, blocksize, quant_type, nested))


@pytest.mark.parametrize("shape", [(1,), (3,), (63, 65)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_small_and_odd_shapes(shape, quant_type):
    x = sample(int(torch.tensor(shape).prod()), torch.float16, seed=7).reshape(shape)
    assert_same_4bit(quantize_4bit_triton(x, 64, quant_type, True), C.quantize_4bit(x, 64, quant_type, True))


def test_4bit_many_programs_and_tails():
    """tile_values 64 at blocksize 32: two blocks per program, many programs, a masked last one; and blocks
    larger than the tile's default."""
    x = sample(1999, torch.bfloat16, seed=3, zero_values=64)
    assert_same_4bit(quantize_4bit_triton(x, 32, "nf4", True, tile_values=64), C.quantize_4bit(x, 32, "nf4", True))
    assert_same_4bit(quantize_4bit_triton(x, 1024, "fp4", tile_values=256), C.quantize_4bit(x, 1024, "fp4"))


def threshold_block(quant_type):
    """Blocks of 64 holding 1.0 (absmax 1, reciprocal exactly 1) and every threshold of bitsandbytes' trees,
    one ulp either side, the float32 midpoints of the table, the table itself, +-0."""
    thresholds = torch.tensor(C.NF4_THRESHOLDS + C.FP4_THRESHOLDS)
    table = Q.codebook_4bit(quant_type).sort().values
    points = torch.cat([thresholds, -thresholds, (table[1:] + table[:-1]) / 2, table])
    points = torch.cat([points, points.nextafter(torch.tensor(2.0)), points.nextafter(torch.tensor(-2.0))])
    values = torch.cat([torch.ones(1), points, torch.zeros(1), -torch.zeros(1)])
    ones = torch.ones(-values.numel() % 63 + 1)  # 1.0 heads each block of 64
    values = torch.cat([values, ones])
    blocks = [torch.cat([torch.ones(1), chunk]) for chunk in values.split(63)]
    return torch.cat([torch.cat([b, torch.zeros(64 - b.numel())]) for b in blocks])


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_thresholds_ties_and_zeros(quant_type):
    x = threshold_block(quant_type)
    assert_same_4bit(quantize_4bit_triton(x, 64, quant_type), C.quantize_4bit(x, 64, quant_type))


def test_4bit_denormals_are_flushed():
    """bitsandbytes' fast-math kernels flush float32 denormals: an input of 1e-39 counts as 0, a product
    x * (1/absmax) below 2^-126 becomes 0 (for FP4, -tiny loses its sign bit), a block of denormals has absmax 0."""
    x = torch.tensor([1e30, -1e-10, 1e-10, -3.0] + [0.0] * 60 + [1e-39, -1e-39] + [0.0] * 62 + [1e-39] * 64)
    for quant_type in ("nf4", "fp4"):
        packed, state = quantize_4bit_triton(x, 64, quant_type)
        assert_same_4bit((packed, state), C.quantize_4bit(x, 64, quant_type))
        assert state.absmax[1] == 0 and state.absmax[2] == 0
    # FP4, block 0: -1e-10 / 1e30 is 1e-40, a denormal: flushed to -0.0, whose sign bit the tree ignores (u < 0 is false)
    assert int(quantize_4bit_triton(x, 64, "fp4")[0][0, 0]) & 0x0F == 0


def test_trees_are_searches_over_sorted_thresholds():
    """The spec's transcribed trees equal #{t < u} (NF4) and a rank through FP4_RANK_TO_BITS (FP4), on the
    thresholds, their neighbours, random values and NaN; the kernel's branch-free trees equal them too."""
    t4 = torch.tensor(C.NF4_THRESHOLDS)
    tf = torch.tensor(C.FP4_THRESHOLDS)
    assert bool((t4[1:] > t4[:-1]).all()) and bool((tf[1:] > tf[:-1]).all())
    u = torch.cat([t4, tf, -tf, torch.rand(5000) * 2.2 - 1.1])
    u = torch.cat([u, u.nextafter(torch.tensor(2.0)), u.nextafter(torch.tensor(-2.0)), torch.tensor([0.0, -0.0])])
    assert_equal("nf4", C.nf4_tree(u), torch.searchsorted(t4, u, side="left").to(torch.uint8))
    rank = torch.searchsorted(tf, u.abs(), side="left")
    fp4 = torch.tensor(C.FP4_RANK_TO_BITS)[rank] + torch.where(u < 0, 8, 0)
    assert_equal("fp4", C.fp4_tree(u), fp4.to(torch.uint8))
    nan = torch.tensor([float("nan")])
    assert int(C.nf4_tree(nan)) == 0 and int(C.fp4_tree(nan)) == 0


def test_four_nf4_literals_round_differently_through_float64():
    """nvcc rounds `0.8614784181118011f` straight to float32; Python's float first, then float32, lands one
    step higher for four of the fifteen literals (the values come from the sm_90 machine code)."""
    literals = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
                -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
                0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
                0.5016634166240692, 0.6427869200706482, 0.8614784181118011]
    via_double = torch.tensor(literals, dtype=torch.float64).float()
    differ = (via_double != torch.tensor(C.NF4_THRESHOLDS)).nonzero().reshape(-1).tolist()
    assert differ == [0, 8, 12, 14]


def test_8bit_matches_cuda_semantics():
    code = Q.dynamic_map()
    for i, (blocksize, dtype) in enumerate([(32, torch.float32), (64, torch.bfloat16), (256, torch.float16),
                                            (4096, torch.float32)]):
        x = sample(2 * blocksize + 33, dtype, seed=i, zero_values=blocksize).reshape(1, -1)
        q, state = quantize_blockwise_triton(x, blocksize=blocksize)
        spec_q, spec_state = C.quantize_blockwise(x, blocksize=blocksize)
        assert_equal("codes", q, spec_q)
        assert_equal("absmax", state.absmax, spec_state.absmax)
        assert_equal("code", state.code, code)
        assert_equal("dequantized", dequantize_blockwise_triton(q, state), C.dequantize_blockwise(q, state))


def test_8bit_midpoints_and_tie_rules():
    """On the midpoints of neighbouring levels the search's tie rule decides: above the level it ended
    on, a tie goes down (to pivot); below it, up (to pivot). Kernel and spec agree on all of them."""
    code = Q.dynamic_map()
    mid = (code[1:] + code[:-1]) / 2
    points = torch.cat([mid, mid.nextafter(torch.tensor(2.0)), mid.nextafter(torch.tensor(-2.0)), code])
    x = torch.cat([torch.ones(1), points])
    x = torch.cat([x, x.new_zeros(-x.numel() % 256)])
    q, _ = quantize_blockwise_triton(x, blocksize=256)
    spec = C.quantize_blockwise(x, blocksize=256)[0]
    assert_equal("codes", q, spec)
    start = 1 + 3 * mid.numel()
    assert_equal("levels", spec[start:start + 256].long(), torch.arange(256))  # each level maps to itself


# ---------------------------------------------------------------------------------------------------------
# 2. cuda_semantics (bitsandbytes' CUDA bytes) against the reference (bitsandbytes' CPU bytes)


def nibbles(packed, n):
    return torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1)[:n]


def test_nf4_cpu_and_cuda_bytes_agree_on_ordinary_blocks():
    """Random N(0, 1) in full blocks of 64, no zero block: the same codes, absmax and offset. The nested
    8-bit absmax codes differ in a few places (the 8-bit roundings differ, see below)."""
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    cpu = Q.quantize_4bit(x, 64, "nf4", double_quant=True, backend="torch")
    cuda = C.quantize_4bit(x, 64, "nf4", double_quant=True)
    assert_equal("packed", cpu[0], cuda[0])
    assert_equal("offset", cpu[1].offset, cuda[1].offset)
    plain_cpu, plain_cuda = Q.quantize_4bit(x, 64, "nf4", backend="torch"), C.quantize_4bit(x, 64, "nf4")
    assert_equal("absmax", plain_cpu[1].absmax, plain_cuda[1].absmax)
    assert int((cpu[1].absmax != cuda[1].absmax).sum()) == 4  # of 4096 absmax codes


def test_where_cpu_and_cuda_bytes_differ():
    """The differences, counted on fixed inputs (bitsandbytes itself shows the same on an H100; see
    bench/results/kernels-*.json, key quantize_facts):
      * an all-zero block: CUDA codes 0 (NF4 -1.0 * 0 = -0.0), CPU the code of 0.0 (NF4 7, FP4 0);
      * FP4: the tree's literals 0.00260417f, 0.583333f, 0.8333333f... are not the float32 midpoints;
      * the short last block: CPU divides and stores max(absmax, 1e-38); CUDA multiplies by the reciprocal;
      * 8-bit: the CPU's 65536-point table against the CUDA binary search, 0.15-0.2% of codes."""
    x = torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))
    x.view(-1)[:640] = 0  # 10 all-zero blocks of 64
    n = x.numel()
    cpu = Q.quantize_4bit(x, 64, "nf4", backend="torch")[0]
    cuda = C.quantize_4bit(x, 64, "nf4")[0]
    differ = nibbles(cpu, n) != nibbles(cuda, n)
    assert int(differ.sum()) == 640 and bool(differ[:640].all())
    assert int(nibbles(cpu, n)[0]) == 7 and int(nibbles(cuda, n)[0]) == 0
    cpu = Q.quantize_4bit(x, 64, "fp4", backend="torch")[0]
    cuda = C.quantize_4bit(x, 64, "fp4")[0]
    fp4_differ = nibbles(cpu, n) != nibbles(cuda, n)
    assert int(fp4_differ.sum()) == 1452 and not bool(fp4_differ[:640].any())  # 0.55% of 262144; FP4 zero blocks agree (code 0)
    # the short last block: an absmax that is not a power of two, so x / a and x * (1 / a) can differ
    tail = torch.randn(64 * 50 + 33, generator=torch.Generator().manual_seed(1))
    cpu_packed, cpu_state = Q.quantize_4bit(tail, 64, "nf4", backend="torch")
    cuda_packed, cuda_state = C.quantize_4bit(tail, 64, "nf4")
    assert_equal("absmax", cpu_state.absmax, cuda_state.absmax)
    zero_tail = torch.cat([torch.randn(64), torch.zeros(33)])
    assert Q.quantize_4bit(zero_tail, 64, "nf4", backend="torch")[1].absmax[1] == torch.tensor(1e-38)
    assert float(C.quantize_4bit(zero_tail, 64, "nf4")[1].absmax[1]) == 0.0
    q_cpu = Q.quantize_blockwise(x.reshape(-1), blocksize=256, backend="torch")[0]
    q_cuda = C.quantize_blockwise(x.reshape(-1), blocksize=256)[0]
    assert int((q_cpu != q_cuda).sum()) == 522  # of 262144: 0.2% (all-zero blocks: code 0 on both)


# ---------------------------------------------------------------------------------------------------------
# The public API's backend switch


def test_backends():
    x = sample(500, torch.float32, seed=5, zero_values=64)
    triton = Q.quantize_4bit(x, 64, "nf4", True, backend="triton")
    assert_same_4bit(triton, C.quantize_4bit(x, 64, "nf4", True))
    torch_bytes = Q.quantize_4bit(x, 64, "nf4", True, backend="torch")
    assert_same_4bit(Q.quantize_4bit(x, 64, "nf4", True), torch_bytes)  # auto on a CPU tensor: torch
    assert_equal("dequantize", Q.dequantize_4bit(*triton, backend="triton"), Q.dequantize_4bit(*triton))
    q, state = Q.quantize_blockwise(x, backend="triton")
    assert_equal("8-bit", q, C.quantize_blockwise(x)[0])
    assert_equal("8-bit dequantize", Q.dequantize_blockwise(q, state, backend="triton"),
                 C.dequantize_blockwise(q, state))
    with pytest.raises(ValueError, match="backend must be one of"):
        Q.quantize_4bit(x, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        Q.dequantize_blockwise(q, state, backend="gpu")
    with pytest.raises(ValueError, match="rounding applies to backend='torch'"):
        Q.quantize_blockwise(x, rounding="nearest", backend="triton")


def test_backend_triton_without_triton(monkeypatch):
    from qlora_ref import backend

    monkeypatch.setattr(backend, "triton_available", lambda: False)
    with pytest.raises(ImportError, match="needs the triton package"):
        Q.quantize_4bit(torch.ones(8), backend="triton")
    assert backend.resolve_backend("auto", torch.ones(1)) == "torch"


def test_bad_input_is_refused_like_the_reference():
    with pytest.raises(ValueError, match="non-finite"):
        quantize_4bit_triton(torch.tensor([1.0, float("nan")]))
    with pytest.raises(TypeError, match="dtype"):
        quantize_4bit_triton(torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match="empty"):
        quantize_4bit_triton(torch.ones(0))
    with pytest.raises(ValueError, match="blocksize"):
        quantize_4bit_triton(torch.ones(4), blocksize=48)
    with pytest.raises(ValueError, match="nf4' or 'fp4"):
        quantize_4bit_triton(torch.ones(4), quant_type="int4")
    with pytest.raises(ValueError, match="power of two"):
        quantize_4bit_triton(torch.ones(4), tile_values=48)
    with pytest.raises(ValueError, match="non-finite"):
        quantize_blockwise_triton(torch.tensor([float("inf")]))


# ---------------------------------------------------------------------------------------------------------
# 3. Ahead-of-time compilation (no GPU, no driver: the ptxas inside the triton wheel)

AOT_TARGETS = [(75, torch.float32, "nf4"), (75, torch.float16, "fp4"), (80, torch.bfloat16, "nf4"),
               (90, torch.bfloat16, "nf4"), (90, torch.float16, "fp4")]


@pytest.mark.parametrize("capability,dtype,quant_type", AOT_TARGETS,
                         ids=[f"sm_{c}-{str(d)[6:]}-{q}" for c, d, q in AOT_TARGETS])
def test_compiles_ahead_of_time(capability, dtype, quant_type):
    kernel = compile_ahead(capability, dtype, blocksize=64, quant_type=quant_type)
    ptx = kernel.asm["ptx"]
    assert f".target sm_{capability}" in ptx
    assert len(kernel.asm["cubin"]) > 0
    instructions = set(re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", ptx, re.M))
    assert "rcp.approx.ftz.f32" in instructions  # bitsandbytes' 1.0f / absmax under --use_fast_math
    assert not any(i.startswith("fma") for i in instructions)
    assert "ld.global.v4.b32" in instructions  # 16-byte loads of the input
    if capability == 75:
        assert "bf16" not in ptx


def test_interpreter_twin():
    assert K._twin(interpret=True).INTERPRETED
    assert not K.INTERPRETED or K._twin(True) is K
