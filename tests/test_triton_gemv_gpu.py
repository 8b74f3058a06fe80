"""The fused Triton 4-bit GEMV on a CUDA GPU: its error against the float32 reference is no larger than
bitsandbytes' matmul_4bit's, on the same packed weights (quantized by bitsandbytes) and the same x.

The reference is x.float() @ dequantize_4bit(W).float().T. Both errors are measured as the maximum absolute
and the RMS difference over the N outputs; the test asserts ours <= bnb's * 1.05 + 1e-6 * scale for each
(the 5% allows for a lucky draw of bnb's rounding on a single output; the real margin, printed on failure,
is much wider because our only roundings are float32 sums and the final one to x's dtype, while bnb
rounds the absmax and every product to 16 bits). Skipped without a GPU (marker `gpu`).
"""

import pytest
import torch

pytestmark = pytest.mark.gpu

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton; Linux only)")
bnb = pytest.importorskip("bitsandbytes", reason="the comparison needs bitsandbytes")
import bitsandbytes.functional as F  # noqa: E402

import qlora_ref as Q  # noqa: E402
from bench.experiments.gemv_variants import gemv_variant  # noqa: E402
from bench.timing import LLAMA_SHAPES, state_from_bitsandbytes  # noqa: E402
from qlora_ref.kernels.gemv_4bit import gemv_4bit_triton  # noqa: E402

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def quantized(n, k, dtype, nested, quant_type="nf4", blocksize=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g)
    packed, bnb_state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    x = torch.randn(1, k, device="cuda", dtype=dtype, generator=g)
    return x, packed, bnb_state


def measures(y, reference):
    d = (y.float() - reference).reshape(-1)
    return d.abs().max().item(), d.pow(2).mean().sqrt().item()


KERNELS = {"row": {}, "tile": {"row_kernel": False}}  # the library's; its first design (bench/experiments/)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("shape", LLAMA_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_error_no_larger_than_bitsandbytes(shape, dtype, nested, kernel):
    """One row of x: the library's kernel and gemv_4bit_kernel (bench/experiments/gemv_variants.py)."""
    x, packed, bnb_state = quantized(*shape, dtype, nested)
    reference = x.float() @ F.dequantize_4bit(packed, bnb_state).float().T
    ours = gemv_variant(x, packed, state_from_bitsandbytes(bnb_state), **KERNELS[kernel])
    theirs = bnb.matmul_4bit(x, packed.t(), quant_state=bnb_state)
    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
    scale = reference.abs().max().item()
    (max_ours, rms_ours), (max_bnb, rms_bnb) = measures(ours, reference), measures(theirs, reference)
    message = f"triton max {max_ours:.4g} rms {rms_ours:.4g}; bitsandbytes max {max_bnb:.4g} rms {rms_bnb:.4g}"
    assert max_ours <= max_bnb * 1.05 + 1e-6 * scale, message
    assert rms_ours <= rms_bnb * 1.05 + 1e-6 * scale, message
    # And the CPU tests' bound: within half an ulp of the output plus float32 noise.
    assert max_ours <= UNIT_ROUNDOFF[dtype] * scale + 1e-4 * scale, message


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_half_an_ulp_bound_small_shapes(dtype, quant_type, nested, m):
    """The CPU test's bound on the compiled kernel: odd N, both codebooks, all dtypes; one row (the library's
    kernel) or several (gemv_4bit_kernel, bench/experiments/gemv_variants.py)."""
    for n, k, blocksize in [(37, 192, 64), (1000, 1024, 128), (5, 4096, 4096), (257, 320, 32)]:
        _, packed, bnb_state = quantized(n, k, dtype, nested, quant_type, blocksize)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        w = F.dequantize_4bit(packed, bnb_state).float()
        reference = x.float() @ w.T
        y = gemv_variant(x, packed, state_from_bitsandbytes(bnb_state))
        magnitude = x.float().abs() @ w.abs().T
        # + u * magnitude: the default scale_sums uses the unrounded float32 code * absmax (tests/test_triton_gemv.py)
        bound = UNIT_ROUNDOFF[dtype] * (reference.abs() + magnitude) + 2 * k * 2.0**-24 * magnitude
        assert bool(((y.float() - reference).abs() <= bound).all()), (n, k, blocksize)


def test_tuning_settings_agree():
    """Every benchmarked setting computes the same y up to float32 summation order and, for scale_sums, the
    per-weight rounding it skips: each y is rounded to bf16 once, so two settings may differ by one bf16 ulp
    of the output (|y| up to ~4 * sqrt(K) here): bounded by 2^-7 of the largest |y|."""
    from bench.gemv import CONFIGS

    x, packed, bnb_state = quantized(4096, 4096, torch.bfloat16, True)
    state = state_from_bitsandbytes(bnb_state)
    options = list(CONFIGS.values()) + [{"row_kernel": False, "split_x": False}, {"row_kernel": False, "prefetch": False}]
    ys = [gemv_variant(x, packed, state, **o).float() for o in options]
    bound = 2**-7 * ys[0].abs().max().item()
    for o, y in zip(options[1:], ys[1:]):
        assert (y - ys[0]).abs().max().item() <= bound, o


def test_cpu_state_on_the_gpu_and_cached_launches():
    """qlora_ref's bytes made on the CPU, state tensors following x to the GPU; the second call of a
    specialization takes the cached launcher, a misaligned x the other specialization."""
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    packed, state = Q.quantize_4bit(w, blocksize=64, quant_type="nf4", double_quant=True)
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    # The reference formula, not the interpreter: Triton 3.6 (the GPU image's) cannot interpret the K loop.
    expected = (x.float() @ Q.dequantize_4bit(packed, state).float().T).to(torch.float16)
    buffer = torch.empty(256 + 1, dtype=torch.float16, device="cuda")
    misaligned = buffer[1:].view(1, 256)
    misaligned.copy_(x)
    for _ in range(2):
        for xs in (x.cuda(), misaligned):
            got = gemv_4bit_triton(xs, packed.cuda(), state).cpu()
            # one fp16 ulp of the largest output: the kernel's weights are not rounded to fp16 (scale_sums)
            assert (got.float() - expected.float()).abs().max() <= 2**-10 * expected.float().abs().max()


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_row_kernel_lookups_give_identical_outputs(nested):
    """The warp-shuffle lookup returns the codebook's float32 values, as the pure-Triton memory lookup (the
    interpreter's path) does: the same y to the bit, on awkward shapes too (odd N, K of one 4-word group, a
    last chunk partly outside the row, fp4)."""
    for n, k, blocksize, quant_type in [(4096, 14336, 64, "nf4"), (37, 32, 32, "fp4"), (1001, 96, 32, "nf4"),
                                        (257, 4096, 4096, "fp4")]:
        x, packed, bnb_state = quantized(n, k, torch.bfloat16, nested, quant_type, blocksize)
        state = state_from_bitsandbytes(bnb_state)
        for options in ({}, {"prefetch": False}, {"prefetch": True}, {"prefetch": "weights"}, {"chunk_bytes": 1024},
                        {"chunk_bytes": 1024, "prefetch": False}, {"block_n": 2, "num_warps": 2}):
            shuffle = gemv_variant(x, packed, state, **options)
            memory = gemv_variant(x, packed, state, lookup="memory", **options)
            assert torch.equal(shuffle, memory), (n, k, options)


def test_a_module_loaded_interpreted_sends_cuda_tensors_to_the_compiled_kernel(monkeypatch):
    # As tests/test_triton_dequantize_gpu.py: a lesson may set TRITON_INTERPRET=1 for its own kernels.
    from qlora_ref.kernels import gemv_4bit as G

    interpreted = G._twin(interpret=True)
    assert interpreted.INTERPRETED
    monkeypatch.setattr(interpreted, "gemv_4bit_row_kernel", None)  # launching it here would fail
    x, packed, bnb_state = quantized(4096, 4096, torch.bfloat16, True)
    state = state_from_bitsandbytes(bnb_state)
    assert torch.equal(interpreted.gemv_4bit_triton(x, packed, state), gemv_4bit_triton(x, packed, state))
