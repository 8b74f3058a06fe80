"""The Triton quantize kernels on a CUDA GPU against bitsandbytes' CUDA kernels: the same bytes.

4-bit: packed codes, absmax, and for double quantization the 8-bit absmax codes, the offset and the
second-level absmax. 8-bit: codes and absmax, and the dequantized values. cuda_semantics (the PyTorch
model of those kernels) is held to the same standard. Skipped without a GPU (marker `gpu`).
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton; Linux only)")
F = pytest.importorskip("bitsandbytes.functional", reason="the comparison needs bitsandbytes")

import qlora_ref as Q  # noqa: E402
from bench.timing import LLAMA_SHAPES  # noqa: E402
from qlora_ref.kernels import cuda_semantics as C  # noqa: E402
from qlora_ref.kernels.blockwise_8bit import dequantize_blockwise_triton, quantize_blockwise_triton  # noqa: E402
from qlora_ref.kernels.quantize_4bit import hardware_reciprocal, quantize_4bit_triton  # noqa: E402
from qlora_ref.validation import BLOCKSIZES  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ODD_SHAPES = [(1,), (3,), (63, 65), (2, 3, 333), (4097,), (1000, 1001), (3, 4095, 7)]


def sample(shape, dtype, seed=0, zero_blocks=True):
    """N(0, 9) values; with zero_blocks, the first 4096 values zeroed (all-zero blocks at every block size
    once n > 4096) and a few exact zeros, negative zeros and tiny values elsewhere."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(shape, device="cuda", generator=generator) * 3
    flat = x.view(-1)
    if zero_blocks and flat.numel() > 8192:
        flat[:4096] = 0
        flat[5000:5010] = -0.0
        flat[6000:6010] = 1e-39  # a float32 denormal: flushed by bitsandbytes' fast-math kernels
        flat[6010:6020] = -1e-30
    return x.to(dtype)


def assert_equal(name, mine, theirs):
    theirs = theirs.to(mine.device).reshape(mine.shape)
    assert mine.dtype == theirs.dtype, f"{name}: dtype {mine.dtype} vs {theirs.dtype}"
    same = (mine == theirs) | (torch.isnan(mine) & torch.isnan(theirs)) if mine.is_floating_point() else mine == theirs
    if not bool(same.all()):
        differ = (~same).reshape(-1).nonzero().reshape(-1)
        i = int(differ[0])
        raise AssertionError(f"{name}: {differ.numel()} of {mine.numel()} differ, first at {i}: "
                             f"ours {mine.reshape(-1)[i].item()!r} vs bitsandbytes {theirs.reshape(-1)[i].item()!r}")


def assert_same_4bit(packed, state, bnb_packed, bnb_state):
    assert_equal("packed", packed, bnb_packed)
    assert_equal("absmax", state.absmax, bnb_state.absmax)
    if bnb_state.nested:
        assert_equal("offset", state.offset.reshape(()), bnb_state.offset.reshape(()))
        assert_equal("state2.absmax", state.state2.absmax, bnb_state.state2.absmax)
        assert_equal("state2.code", state.state2.code, bnb_state.state2.code)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_4bit_matches_bitsandbytes(blocksize, dtype, quant_type, nested):
    for seed, shape in enumerate(ODD_SHAPES + [(3, 8193)]):
        x = sample(shape, dtype, seed)
        bnb_packed, bnb_state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                                compress_statistics=nested)
        packed, state = quantize_4bit_triton(x, blocksize, quant_type, nested)
        assert_same_4bit(packed, state, bnb_packed, bnb_state)
        packed, state = C.quantize_4bit(x, blocksize, quant_type, nested)  # the PyTorch model, on the GPU
        assert_same_4bit(packed, state, bnb_packed, bnb_state)


@pytest.mark.parametrize("shape", LLAMA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_4bit_llama_shapes(shape, dtype, nested):
    x = sample(shape, dtype, 1)
    bnb_packed, bnb_state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=nested)
    packed, state = quantize_4bit_triton(x, 64, "nf4", nested)
    assert_same_4bit(packed, state, bnb_packed, bnb_state)
    if nested and dtype == torch.bfloat16:
        del packed, state
        packed, state = C.quantize_4bit(x, 64, "nf4", nested)
        assert_same_4bit(packed, state, bnb_packed, bnb_state)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_thresholds_and_special_values(quant_type):
    """Each block holds 1.0 (absmax 1, reciprocal exactly 1) and values on, just below and just above
    every threshold of the trees, and the float32 midpoints of the table: the tie rules themselves."""
    thresholds = torch.tensor(C.NF4_THRESHOLDS + C.FP4_THRESHOLDS)
    table = Q.codebook_4bit(quant_type).sort().values
    points = torch.cat([thresholds, -thresholds, (table[1:] + table[:-1]) / 2, table])
    points = torch.cat([points, points.nextafter(torch.tensor(2.0)), points.nextafter(torch.tensor(-2.0))])
    values = torch.cat([torch.ones(1), points, torch.zeros(1), -torch.zeros(1)])
    values = torch.cat([values, values.new_zeros(-values.numel() % 64)]).cuda()
    for scale in (1.0, 3.0, 1e-3):
        x = values * scale
        bnb_packed, bnb_state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type)
        assert_same_4bit(*quantize_4bit_triton(x, 64, quant_type), bnb_packed, bnb_state)
        assert_same_4bit(*C.quantize_4bit(x, 64, quant_type), bnb_packed, bnb_state)


def test_hardware_reciprocal_is_within_one_ulp():
    """MUFU.RCP against the correctly rounded reciprocal, over every float32 significand in [1, 2)."""
    a = (torch.arange(2**23, dtype=torch.int32, device="cuda") + 0x3F800000).view(torch.float32)
    hardware = hardware_reciprocal(a)
    exact = 1.0 / a
    ulps = (hardware.view(torch.int32) - exact.view(torch.int32)).abs()
    assert int(ulps.max()) <= 1


def test_backend_auto_on_a_gpu_is_triton():
    x = sample((333, 777), torch.bfloat16, 3)
    bnb_packed, bnb_state = F.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    packed, state = Q.quantize_4bit(x, 64, "nf4", double_quant=True)
    assert_same_4bit(packed, state, bnb_packed, bnb_state)
    assert_equal("dequantize", Q.dequantize_4bit(packed, state), F.dequantize_4bit(bnb_packed, bnb_state))
    with pytest.raises(ValueError, match="non-finite"):
        Q.quantize_4bit(torch.tensor([1.0, float("nan")], device="cuda"))


@pytest.mark.parametrize("blocksize", [64, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_8bit_matches_bitsandbytes(blocksize, dtype):
    for seed, shape in enumerate([(1,), (63, 65), (1000, 1001), (3, 8193)]):
        x = sample(shape, dtype, seed)
        bnb_q, bnb_state = F.quantize_blockwise(x, blocksize=blocksize)
        q, state = quantize_blockwise_triton(x, blocksize=blocksize)
        assert_equal("codes", q, bnb_q)
        assert_equal("absmax", state.absmax, bnb_state.absmax)
        q2, state2 = C.quantize_blockwise(x, blocksize=blocksize)
        assert_equal("codes (cuda_semantics)", q2, bnb_q)
        assert_equal("absmax (cuda_semantics)", state2.absmax, bnb_state.absmax)
        theirs = F.dequantize_blockwise(bnb_q, bnb_state)
        assert_equal("dequantize", dequantize_blockwise_triton(q, state), theirs)
        assert_equal("dequantize (cuda_semantics)", C.dequantize_blockwise(q, state), theirs)


def test_8bit_code_midpoints():
    """Values exactly on the midpoints of neighbouring levels of the dynamic map, and one ulp either side."""
    code = Q.dynamic_map().cuda()
    mid = (code[1:] + code[:-1]) / 2
    points = torch.cat([mid, mid.nextafter(torch.tensor(2.0, device="cuda")),
                        mid.nextafter(torch.tensor(-2.0, device="cuda")), code])
    x = torch.cat([torch.ones(1, device="cuda"), points])
    x = torch.cat([x, x.new_zeros(-x.numel() % 256)])
    bnb_q, _ = F.quantize_blockwise(x, blocksize=256)
    assert_equal("codes", quantize_blockwise_triton(x, blocksize=256)[0], bnb_q)
    assert_equal("codes (cuda_semantics)", C.quantize_blockwise(x, blocksize=256)[0], bnb_q)
