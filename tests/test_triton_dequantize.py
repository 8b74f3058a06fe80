"""The Triton 4-bit dequantize kernel on a CPU: Triton's interpreter against qlora_ref.dequantize_4bit.

No GPU is needed. `dequantize_4bit_triton` sends CPU tensors to a copy of the kernel module loaded with
TRITON_INTERPRET=1 (the kernel then runs in numpy); the variable is not set for this process, because
@triton.jit reads it once per module and a process-wide setting would also make the GPU tests in
test_triton_dequantize_gpu.py run interpreted. The last tests compile the kernel ahead of time for
sm_75 (a Colab T4), sm_80 and sm_90 with the ptxas inside the triton wheel, and read the PTX.

Shapes stay small: the interpreter costs about 10 ms per program.
"""

import re

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton; Linux only)")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import qlora_ref as Q  # noqa: E402
from qlora_ref.kernels import dequantize_4bit as K  # noqa: E402
from qlora_ref.kernels.dequantize_4bit import compile_ahead, dequantize_4bit_triton  # noqa: E402
from qlora_ref.validation import BLOCKSIZES  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# An odd count and a 3-D shape, both smaller than one tile (2048 bytes = 4096 values).
SHAPES = [(3,), (2, 3, 333)]


def quantized(shape, dtype, blocksize, quant_type, double_quant, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    return Q.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, double_quant=double_quant)


def assert_same(ours, reference):
    assert ours.dtype == reference.dtype and ours.shape == reference.shape
    if not torch.equal(ours, reference):
        differ = (ours != reference).reshape(-1).nonzero().reshape(-1)
        i = int(differ[0])
        raise AssertionError(
            f"{differ.numel()} of {ours.numel()} values differ, first at flat index {i}: "
            f"triton {ours.reshape(-1)[i].item()!r} vs reference {reference.reshape(-1)[i].item()!r}"
        )


def test_cpu_tensors_run_in_the_interpreter():
    assert not K.INTERPRETED or K._twin(True) is K  # this module compiles (unless TRITON_INTERPRET=1 was set)
    assert K._twin(interpret=True).INTERPRETED
    packed, state = quantized((10,), torch.float32, 64, "nf4", False)
    assert dequantize_4bit_triton(packed, state).device.type == "cpu"


# Every block size, NF4 for half of them and FP4 for the other half (the kernel only sees a 16-entry table).
BLOCKSIZES_AND_TYPES = [(blocksize, "nf4" if i % 2 == 0 else "fp4") for i, blocksize in enumerate(BLOCKSIZES)]


@pytest.mark.parametrize("blocksize,quant_type", BLOCKSIZES_AND_TYPES, ids=[f"{t}-{b}" for b, t in BLOCKSIZES_AND_TYPES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
def test_matches_reference(blocksize, quant_type, dtype, double_quant):
    for seed, shape in enumerate(SHAPES):
        packed, state = quantized(shape, dtype, blocksize, quant_type, double_quant, seed)
        assert_same(dequantize_4bit_triton(packed, state), Q.dequantize_4bit(packed, state))


@pytest.mark.parametrize("shape", [(1,), (63, 65)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_value_and_a_matrix(shape, dtype):
    packed, state = quantized(shape, dtype, 64, "nf4", True)
    assert_same(dequantize_4bit_triton(packed, state), Q.dequantize_4bit(packed, state))


@pytest.mark.parametrize("blocksize", [32, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "nested"])
def test_many_tiles_odd_n(blocksize, dtype, double_quant):
    """Tiles of 128 bytes: full tiles (unmasked), a last tile cut mid-row and mid-byte, and with
    blocksize 4096 tiles much smaller than a block (several tiles share one absmax)."""
    shape = (1999,) if double_quant else (5, 401)
    packed, state = quantized(shape, dtype, blocksize, "nf4", double_quant)
    assert_same(dequantize_4bit_triton(packed, state, tile_bytes=128), Q.dequantize_4bit(packed, state))


def test_exact_multiple_of_the_tile():
    """n = 4 tiles exactly: every program takes the unmasked path."""
    packed, state = quantized((16, 32), torch.float16, 64, "fp4", True)
    assert_same(dequantize_4bit_triton(packed, state, tile_bytes=64), Q.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["wide rows", "strided stores"])
def test_other_layouts(dtype, layout):
    """The variants the benchmark compares compute the same values."""
    options = {"row_bytes": 1024} if layout == "wide rows" else {"join": False}
    packed, state = quantized((3, 333), dtype, 64, "nf4", True)
    assert_same(dequantize_4bit_triton(packed, state, tile_bytes=256, **options), Q.dequantize_4bit(packed, state))


@settings(max_examples=12, deadline=None)
@given(
    shape=st.lists(st.integers(1, 16), min_size=1, max_size=3),
    blocksize=st.sampled_from(BLOCKSIZES),
    dtype=st.sampled_from(DTYPES),
    quant_type=st.sampled_from(["nf4", "fp4"]),
    double_quant=st.booleans(),
    tile_bytes=st.sampled_from([16, 128, 2048]),
    seed=st.integers(0, 2**16),
)
def test_any_shape(shape, blocksize, dtype, quant_type, double_quant, tile_bytes, seed):
    packed, state = quantized(tuple(shape), dtype, blocksize, quant_type, double_quant, seed)
    assert_same(dequantize_4bit_triton(packed, state, tile_bytes=tile_bytes), Q.dequantize_4bit(packed, state))


def test_bf16_rounds_to_nearest_even():
    """Values halfway between two bfloat16 numbers, and just off halfway: the interpreter's own cast
    truncates, so this checks the kernel's integer rounding (the GPU uses the hardware's)."""
    code = torch.tensor([1.0, -1.0] + [0.0] * 14)
    bits = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F817FFF, 0x3F7FFFFF, 0x7F7FFFFF]  # ties, near-ties, overflow
    absmax = torch.tensor(bits, dtype=torch.int32).view(torch.float32)
    n = 32 * absmax.numel()  # one block of 32 values per absmax
    packed = torch.full((n // 2, 1), 0x01, dtype=torch.uint8)  # codes 0, 1, 0, 1, ...: +1, -1, +1, -1, ...
    state = Q.QuantState(absmax=absmax, shape=torch.Size([n]), code=code, dtype=torch.bfloat16, blocksize=32,
                         quant_type="nf4")
    expected = (code[:2].repeat(n // 2) * absmax.repeat_interleave(32)).to(torch.bfloat16)
    assert_same(dequantize_4bit_triton(packed, state), expected)


def test_bad_input_is_refused_like_the_reference():
    packed, state = quantized((10,), torch.float32, 64, "nf4", False)
    with pytest.raises(TypeError, match="uint8"):
        dequantize_4bit_triton(packed.float(), state)
    with pytest.raises(ValueError, match="do not belong together"):
        dequantize_4bit_triton(packed[:-1], state)
    with pytest.raises(TypeError, match="QuantState"):
        dequantize_4bit_triton(packed, None)
    with pytest.raises(ValueError, match="power of two"):
        dequantize_4bit_triton(packed, state, tile_bytes=48)


# Ahead-of-time compilation: no GPU, no driver, only the ptxas shipped inside the triton wheel.
AOT_TARGETS = [(75, torch.float32), (75, torch.float16)] + [(cc, dtype) for cc in (80, 90) for dtype in DTYPES]


def _instructions(ptx):
    return set(re.findall(r"^\s*(?:@!?%p\d+\s+)?([a-z][\w.]*)", ptx, re.M))


@pytest.mark.parametrize("capability,dtype", AOT_TARGETS, ids=[f"sm_{cc}-{str(d)[6:]}" for cc, d in AOT_TARGETS])
def test_compiles_ahead_of_time(capability, dtype, double_quant=True):
    """The nested kernel (a superset of the plain one) for each target; the plain one is compiled below."""
    kernel = compile_ahead(capability, dtype, blocksize=64, nested=double_quant)
    ptx = kernel.asm["ptx"]
    assert f".target sm_{capability}" in ptx
    assert len(kernel.asm["cubin"]) > 0
    instructions = _instructions(ptx)
    # No fused multiply-add anywhere: the nested absmax is a product, then a separately rounded sum.
    assert not any(i.startswith("fma") for i in instructions), sorted(i for i in instructions if "fma" in i)
    if capability == 75:
        assert "bf16" not in ptx  # a T4 has no bfloat16 instructions
    # Each row of the tile is one 16-byte store, straight from registers.
    assert "st.global.v4.b32" in instructions


def test_plain_kernel_compiles_for_a_t4():
    test_compiles_ahead_of_time(75, torch.float16, double_quant=False)


def test_default_fp_fusion_would_contract_the_nested_absmax():
    """What enable_fp_fusion=False prevents: with Triton's default, the product and the sum become one fma."""
    ptx = compile_ahead(90, torch.bfloat16, blocksize=64, nested=True, fp_fusion=True).asm["ptx"]
    assert "fma.rn.f32" in ptx
