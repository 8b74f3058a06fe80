"""The fused Triton 4-bit GEMV on a CPU (Triton's interpreter) against a float32 reference.

The reference is x.float() @ qlora_ref.dequantize_4bit(W).float().T: the weights exactly as the dequantizer
makes them (rounded to the state's dtype), products and sums in float32. The kernel rounds each weight the
same way and multiplies and adds in float32 too, so it differs from the reference only in
  (a) the order of the float32 additions: at most gamma_K * sum_k |x_k w_k| with gamma_K = K * 2^-24
      (the classic bound for a float32 sum of K terms; the real error is far smaller), and
  (b) the one rounding of y to x's dtype: at most half an ulp, u * |y| with the unit roundoff
      u = 2^-24 (float32), 2^-11 (float16), 2^-8 (bfloat16).
So the test asserts |y - ref| <= u * |ref| + 2 * gamma_K * (|x| @ |W|^T) (the factor 2 covers (a) carried
through (b)). The kernel does not round each weight: it multiplies sums of code * x by the absmax, so each
of its weights is the exact float32 code * absmax, within u_w * |w| of the reference's rounded one (u_w: the
unit roundoff of the state's dtype); that adds u_w * (|x| @ |W|^T) (scale_sums=True below). For bf16 / fp16 outputs that is "within half an ulp of the output, plus float32 noise":
nothing looser than the output format itself can hold. bitsandbytes' own GEMV cannot run here (CUDA only);
tests/test_triton_gemv_gpu.py compares the two errors on a GPU. The kernel's variants and other settings
(bench/experiments/gemv_variants.py): tests/test_gemv_variants.py.
"""

import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton; Linux only)")

import qlora_ref as Q  # noqa: E402
from qlora_ref.kernels import gemv_4bit as G  # noqa: E402
from qlora_ref.kernels.gemv_4bit import gemv_4bit_triton  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def weight(n, k, dtype, blocksize=64, quant_type="nf4", nested=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=generator) * 0.5).to(dtype)
    return Q.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, double_quant=nested)


def activations(m, k, dtype, seed=1):
    return torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype)


def check(x, packed, state, gemv=gemv_4bit_triton, **options):
    """y = gemv(x, packed, state, **options), asserted within the bound above (scale_sums=False: a variant's
    weights rounded as the reference's)."""
    y = gemv(x, packed, state, **options)
    w = Q.dequantize_4bit(packed, state).float()
    reference = x.float() @ w.T
    K = w.shape[1]
    magnitude = x.float().abs() @ w.abs().T
    bound = UNIT_ROUNDOFF[x.dtype] * reference.abs() + 2 * K * 2.0**-24 * magnitude
    if options.get("scale_sums", True):
        bound = bound + UNIT_ROUNDOFF[state.dtype] * magnitude
    assert y.dtype == x.dtype and y.shape == reference.shape
    error = (y.float() - reference).abs()
    worst = int((error - bound).argmax())
    assert bool((error <= bound).all()), (
        f"{int((error > bound).sum())} of {error.numel()} outputs over the bound; worst: y "
        f"{y.reshape(-1)[worst].item()!r}, reference {reference.reshape(-1)[worst].item()!r}, "
        f"bound {bound.reshape(-1)[worst].item():.3g}")
    return y


def test_cpu_tensors_run_in_the_interpreter():
    assert G._twin(interpret=True).INTERPRETED
    packed, state = weight(8, 64, torch.float32)
    assert gemv_4bit_triton(activations(1, 64, torch.float32), packed, state).device.type == "cpu"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_within_half_an_ulp_of_the_reference(dtype, quant_type, nested):
    for seed, (n, k) in enumerate([(64, 128), (96, 256), (37, 192)]):  # odd N: a partial row tile
        packed, state = weight(n, k, dtype, 64, quant_type, nested, seed)
        check(activations(1, k, dtype, seed), packed, state)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_blocksizes(blocksize):
    """Blocks of 32 (one 4-word group) to 4096 (many loop iterations share one absmax, prefetched)."""
    k = 4096 if blocksize == 4096 else 3 * blocksize
    packed, state = weight(5, k, torch.bfloat16, blocksize, "nf4", nested=True)
    check(activations(1, k, torch.bfloat16), packed, state)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.float16), (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.float32)], ids=str)
def test_x_and_weight_dtypes_may_differ(x_dtype, w_dtype):
    packed, state = weight(33, 128, w_dtype, nested=True)
    check(activations(1, 128, x_dtype), packed, state)


def test_leading_dimensions_and_one_row_only():
    packed, state = weight(48, 128, torch.float16, nested=True)
    x = activations(1, 128, torch.float16)
    y = gemv_4bit_triton(x.reshape(1, 1, 128), packed, state)
    assert y.shape == (1, 1, 48)
    assert torch.equal(y.reshape(1, 48), check(x, packed, state))
    assert torch.equal(gemv_4bit_triton(x.reshape(128), packed, state), y.reshape(48))
    with pytest.raises(ValueError, match="one row of x.*\\(2, 128\\)"):
        gemv_4bit_triton(activations(2, 128, torch.float16), packed, state)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_every_loop_the_library_takes(nested):
    """Rows of 768 values (W, its scales and x a chunk ahead; nested: W and its scales) and of 8192 (1024-byte
    chunks, nothing ahead): the kernel's three loops, as row_settings picks them."""
    for k in (768, 8192):
        packed, state = weight(6, k, torch.bfloat16, nested=nested)
        check(activations(1, k, torch.bfloat16), packed, state)


def test_strided_x_row():
    packed, state = weight(16, 128, torch.float32)
    x = activations(1, 256, torch.float32)[:, ::2]  # not contiguous
    check(x, packed, state)


def test_bad_input_is_refused():
    packed, state = weight(16, 128, torch.float32)
    x = activations(1, 128, torch.float32)
    with pytest.raises(ValueError, match="K = 128.*got x of shape \\(1, 96\\)"):
        gemv_4bit_triton(activations(1, 96, torch.float32), packed, state)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16.*torch.int32"):
        gemv_4bit_triton(x.to(torch.int32), packed, state)
    with pytest.raises(TypeError, match="4-bit QuantState"):
        gemv_4bit_triton(x, packed, None)
    codes, state8 = Q.quantize_blockwise(torch.randn(16, 128))
    with pytest.raises(TypeError, match="4-bit QuantState"):
        gemv_4bit_triton(x, codes, state8)
    with pytest.raises(TypeError, match="uint8"):
        gemv_4bit_triton(x, packed.float(), state)
    with pytest.raises(ValueError, match="do not belong together"):
        gemv_4bit_triton(x, packed[:-1], state)
    packed1, state1 = Q.quantize_4bit(torch.randn(128), blocksize=64)
    with pytest.raises(ValueError, match="2-D"):
        gemv_4bit_triton(x, packed1, state1)
    packed3, state3 = Q.quantize_4bit(torch.randn(4, 96), blocksize=64)
    with pytest.raises(ValueError, match="multiple of the blocksize"):
        gemv_4bit_triton(activations(1, 96, torch.float32), packed3, state3)
    # 2^31 blocks of 32 (a 2^21 x 2^15 weight): refused before anything is read. Stride-0 views stand in for
    # the 32 GiB of codes and the 8 GiB of absmax such a weight would take.
    N, K = 2**21, 2**15
    huge = dataclasses.replace(state, shape=torch.Size((N, K)), blocksize=32,
                               absmax=torch.zeros(1).expand(N * K // 32))
    with pytest.raises(ValueError, match="int32.*2,147,483,648"):
        gemv_4bit_triton(torch.zeros(1, K), torch.zeros(1, dtype=torch.uint8).expand(N * K // 2), huge)


def test_row_defaults():
    """The per-weight settings: wide chunks without prefetch for long rows, on shorter ones W and its scales a
    chunk ahead (nested) or x as well (plain)."""
    assert G.row_defaults(4096, nested=False) == (512, True)
    assert G.row_defaults(8192, nested=False) == (1024, False)
    assert G.row_defaults(28672, nested=True) == (1024, False)
    assert G.row_defaults(4096, nested=True) == (512, "weights")
    assert G.row_settings(8192, False) == (4, 64, 4, 0)
    assert G.row_settings(4096, False) == (4, 32, 4, 1)
    assert G.row_settings(4096, True) == (4, 32, 4, 2)
    assert G.row_settings(96, True) == (4, 4, 4, 2)  # no wider than the row (rounded up to a power of two)


def test_compiles_for_a_gpu_ahead_of_time():
    """The compiled kernel (not the interpreter) builds for sm_75 (a T4: no bf16 arithmetic), sm_80 and sm_90
    without a GPU. Its fma are the explicit tl.fma of the dot products: the nested absmax adds none (a product,
    then a separate sum). The lookups are inline PTX: 8 shuffles a word."""
    fmas = []
    for capability, nested in [(75, True), (80, False), (90, False), (90, True)]:
        ptx = G.compile_ahead(capability, torch.bfloat16, nested=nested).asm["ptx"]
        assert f".target sm_{capability}" in ptx
        assert "ld.global.v4" in ptx  # the packed bytes: 16-byte loads
        fmas.append(ptx.count("fma.rn.f32"))
        words = ptx.count("fma.rn.f32") // 8  # 7 multiply-adds per word and one by the absmax
        assert ptx.count("shfl.sync.idx") == 8 * words, (ptx.count("shfl.sync.idx"), words)
    assert fmas[1] > 0 and fmas[0] == fmas[2] == fmas[3], fmas


def test_compiles_for_every_x_dtype():
    """x as bf16 / fp16 pairs (16-byte loads) or float32 values; a blocksize wider than the chunk."""
    for dtype in DTYPES:
        for capability in (75, 90):
            ptx = G.compile_ahead(capability, dtype, blocksize=4096, K=8192).asm["ptx"]
            assert ptx.count("shfl.sync.idx") > 0


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_awkward_shapes(nested):
    """N not a multiple of the row tile, K of one 4-word group (a chunk wider than the row), a last chunk partly
    outside the row, blocks of 32 and 4096, at the library's settings (other settings: test_gemv_variants.py)."""
    cases = [(37, 192, 64), (3, 32, 32), (21, 96, 32), (9, 4096, 4096), (18, 640, 128)]
    for seed, (n, k, blocksize) in enumerate(cases):
        for dtype in (torch.bfloat16, torch.float16):
            packed, state = weight(n, k, dtype, blocksize, "fp4" if seed % 2 else "nf4", nested, seed)
            check(activations(1, k, dtype, seed), packed, state)


def test_x_layouts():
    """x misaligned for 16-byte loads, float32 x, and x of another dtype than W: each value loaded alone."""
    packed, state = weight(20, 256, torch.bfloat16, nested=True)
    buffer = activations(1, 257, torch.bfloat16)
    check(buffer[:, 1:], packed, state)  # x's first value not 16-byte aligned
    check(activations(1, 256, torch.float32), packed, state)
    check(activations(1, 256, torch.float16), packed, state)
