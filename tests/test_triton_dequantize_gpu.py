"""The Triton 4-bit dequantize kernel on a CUDA GPU against bitsandbytes' CUDA dequantize_4bit: equal bits.

bitsandbytes quantizes on the GPU; both dequantize the same packed bytes and state. Skipped without a GPU
(marker `gpu`, see conftest.py). Each output buffer is first poisoned with NaN through the caching
allocator, so a value the kernel failed to write cannot pass by luck.
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton; Linux only)")
F = pytest.importorskip("bitsandbytes.functional", reason="the comparison needs bitsandbytes")

import qlora_ref as Q  # noqa: E402
from bench.timing import LLAMA_SHAPES, state_from_bitsandbytes  # noqa: E402
from qlora_ref.kernels.dequantize_4bit import dequantize_4bit_triton  # noqa: E402
from qlora_ref.validation import BLOCKSIZES  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Odd counts, a single value, shapes that end mid-block and mid-tile, several dimensions.
ODD_SHAPES = [(1,), (3,), (63, 65), (2, 3, 333), (4097,), (1000, 1001), (3, 4095, 7)]


def quantize(shape, dtype, blocksize, quant_type, nested, seed=0):
    generator = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(shape, device="cuda", generator=generator) * 3).to(dtype)
    return F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)


def ours(packed, bnb_state, **options):
    n = torch.Size(bnb_state.shape).numel()
    poison = torch.full((n,), float("nan"), dtype=bnb_state.dtype, device="cuda")
    del poison  # the allocator hands the NaN-filled block to the output
    return dequantize_4bit_triton(packed, state_from_bitsandbytes(bnb_state), **options)


def assert_same(mine, theirs):
    theirs = theirs.reshape(mine.shape)
    assert mine.dtype == theirs.dtype
    if not torch.equal(mine, theirs):
        differ = (mine != theirs).reshape(-1).nonzero().reshape(-1)
        i = int(differ[0])
        raise AssertionError(
            f"{differ.numel()} of {mine.numel()} values differ, first at flat index {i}: "
            f"triton {mine.reshape(-1)[i].item()!r} vs bitsandbytes {theirs.reshape(-1)[i].item()!r}"
        )


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_matches_bitsandbytes(blocksize, dtype, quant_type, nested):
    for seed, shape in enumerate(ODD_SHAPES):
        packed, bnb_state = quantize(shape, dtype, blocksize, quant_type, nested, seed)
        assert_same(ours(packed, bnb_state), F.dequantize_4bit(packed, bnb_state))


@pytest.mark.parametrize("shape", LLAMA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_llama_shapes(shape, dtype, nested):
    packed, bnb_state = quantize(shape, dtype, 64, "nf4", nested)
    assert_same(ours(packed, bnb_state), F.dequantize_4bit(packed, bnb_state))


@pytest.mark.parametrize("options", [{"row_bytes": 1 << 20}, {"join": False}, {"tile_bytes": 8192, "num_warps": 8},
                                     {"tile_bytes": 64}, {"soft_bf16": True}], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_variants_match_bitsandbytes(options, dtype):
    """The benchmark's variants, and the interpreter's integer bf16 rounding run on the GPU."""
    for blocksize in (32, 4096):
        packed, bnb_state = quantize((1000, 1001), dtype, blocksize, "nf4", True)
        assert_same(ours(packed, bnb_state, **options), F.dequantize_4bit(packed, bnb_state))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_the_cpu_reference(dtype):
    """qlora_ref's bytes (made on the CPU) dequantized on the GPU: qlora_ref.dequantize_4bit's values."""
    x = (torch.randn(333, 777, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    packed, state = Q.quantize_4bit(x, blocksize=64, quant_type="nf4", double_quant=True)
    on_gpu = dequantize_4bit_triton(packed.cuda(), state)  # the state's tensors follow packed to the GPU
    assert_same(on_gpu.cpu(), Q.dequantize_4bit(packed, state))
    torch_path = Q.dequantize_4bit(packed.cuda(), state, backend="torch")  # the same rule without Triton
    assert torch_path.device.type == "cuda"
    assert_same(torch_path.cpu(), Q.dequantize_4bit(packed, state))


def test_cached_launches_follow_alignment_and_size():
    """The launch cache keys on what Triton specializes on: a packed tensor that starts 1 byte into its
    buffer (not 16-byte aligned), n a multiple of 16 or not, n = 1. Each call must still be right."""
    from qlora_ref.kernels import launch

    for shape in [(64, 64), (63, 65), (1,), (64, 64)]:
        packed, bnb_state = quantize(shape, torch.bfloat16, 64, "nf4", True)
        expected = F.dequantize_4bit(packed, bnb_state)
        buffer = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")
        misaligned = buffer[1:].view(packed.shape)
        misaligned.copy_(packed)
        for _ in range(2):  # the second call of each takes the cached launcher
            assert_same(ours(packed, bnb_state), expected)
            assert_same(ours(misaligned, bnb_state), expected)
    launch.FAST_LAUNCH = False
    try:
        assert_same(ours(packed, bnb_state), expected)
    finally:
        launch.FAST_LAUNCH = True


def test_a_module_loaded_interpreted_sends_cuda_tensors_to_the_compiled_kernel(monkeypatch):
    # Lesson 5 sets TRITON_INTERPRET=1 for its own kernels; the course's must still compile on a GPU.
    from qlora_ref.kernels import dequantize_4bit as K

    interpreted = K._twin(interpret=True)
    assert interpreted.INTERPRETED
    monkeypatch.setattr(interpreted, "dequantize_4bit_kernel", None)  # launching it here would fail
    packed, state = quantize((4096, 64), torch.bfloat16, 64, "nf4", True)
    assert_same(interpreted.dequantize_4bit_triton(packed, state_from_bitsandbytes(state)),
                F.dequantize_4bit(packed, state))
