"""The GEMV's variants that bench.gemv measures (bench/experiments/gemv_variants.py) on a CPU, in Triton's
interpreter: the library's kernel at other settings (gemv_row) and the first design, gemv_4bit_kernel, also for
several rows of x (gemv_tile). Each within the bound of tests/test_triton_gemv.py, whose helpers they share.
"""

import pytest
import torch

pytest.importorskip("triton", reason="the Triton kernels need the triton package (pip install triton; Linux only)")

from bench.experiments import gemv_variants as V  # noqa: E402
from qlora_ref.kernels import gemv_4bit as G  # noqa: E402
from qlora_ref.kernels.gemv_4bit import gemv_4bit_triton  # noqa: E402
from test_triton_gemv import activations, check, weight  # noqa: E402


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_tile_blocksizes_and_chunks(blocksize):
    """Sub-blocks smaller than a block (4096: many chunks share one absmax), several loop iterations,
    a last chunk only partly inside the row (K = 3 blocks of 32 with 32-byte chunks), small row tiles."""
    k = 4096 if blocksize == 4096 else 3 * blocksize
    packed, state = weight(5, k, torch.bfloat16, blocksize, "nf4", nested=True)
    check(activations(2, k, torch.bfloat16), packed, state, V.gemv_tile, block_n=2,
          chunk_bytes=256 if blocksize == 4096 else 32)


def test_tile_up_to_eight_rows():
    packed, state = weight(48, 128, torch.float16, nested=True)
    x = activations(8, 128, torch.float16).reshape(2, 4, 128)
    y = V.gemv_variant(x, packed, state)
    assert y.shape == (2, 4, 48)
    assert torch.equal(y.reshape(8, 48), check(x.reshape(8, 128), packed, state, V.gemv_tile))
    # A row alone takes the library's kernel (another float32 summation order): the same up to the last bit.
    torch.testing.assert_close(y[1, 2], gemv_4bit_triton(x[1, 2:3], packed, state)[0], rtol=2**-10, atol=1e-3)


@pytest.mark.parametrize("m", [5, 11])
def test_tile_row_tiles(m):
    """5 rows: one tile of 8 with 3 masked; 11 rows: two tiles (grid axis 1)."""
    packed, state = weight(20, 256, torch.bfloat16, nested=True)
    check(activations(m, 256, torch.bfloat16), packed, state, V.gemv_tile, chunk_bytes=64)


@pytest.mark.parametrize("pairs,split_x", [(False, False), (True, False), (False, True)])
def test_tile_lookup_and_x_variants(pairs, split_x):
    packed, state = weight(24, 256, torch.bfloat16, quant_type="fp4", nested=True)
    for m in (1, 3):
        check(activations(m, 256, torch.bfloat16), packed, state, V.gemv_tile, pairs=pairs, split_x=split_x)


@pytest.mark.parametrize("scale_sums,prefetch", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("nested", [False, True])
def test_tile_scaled_sums_and_prefetch(scale_sums, prefetch, nested):
    """Rows of 6 chunks of 64 bytes: the prefetched loop's first, middle and last (masked) chunks."""
    packed, state = weight(12, 768, torch.bfloat16, nested=nested)
    for m in (1, 2):
        check(activations(m, 768, torch.bfloat16), packed, state, V.gemv_tile, chunk_bytes=64,
              scale_sums=scale_sums, prefetch=prefetch)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_row_settings_on_awkward_shapes(nested):
    """The library's kernel at other tiles and prefetch modes: N not a multiple of the row tile, K of one 4-word
    group (a chunk wider than the row), a last chunk partly outside the row, blocks of 32 and 4096. (The
    interpreter runs both lookups alike: tests/test_triton_gemv_gpu.py compares them on a GPU.)"""
    cases = [(37, 192, 64, 8, 64), (3, 32, 32, 4, 512), (21, 96, 32, 4, 32), (9, 4096, 4096, 2, 512),
             (18, 640, 128, 16, 256)]
    for seed, (n, k, blocksize, block_n, chunk) in enumerate(cases):
        for dtype in (torch.bfloat16, torch.float16):
            packed, state = weight(n, k, dtype, blocksize, "fp4" if seed % 2 else "nf4", nested, seed)
            for prefetch in (False, True, "weights"):
                check(activations(1, k, dtype, seed), packed, state, V.gemv_row, block_n=block_n,
                      chunk_bytes=chunk, prefetch=prefetch)


def test_the_library_call_is_gemv_row_at_its_defaults():
    for nested in (False, True):
        packed, state = weight(6, 8192, torch.bfloat16, nested=nested)
        x = activations(1, 8192, torch.bfloat16)
        chunk, prefetch = G.row_defaults(8192, nested)
        assert torch.equal(gemv_4bit_triton(x, packed, state), V.gemv_row(x, packed, state, chunk_bytes=chunk,
                                                                          prefetch=prefetch))
    assert V.row_config(8192, True, chunk_bytes=1024, prefetch=True) == (4, 64, 4, 1)


def test_lookups_compute_the_same_numbers():
    """The interpreter runs both lookups as "memory": the same y; the row kernel equals the tile kernel up to
    float32 summation order."""
    packed, state = weight(40, 512, torch.bfloat16, quant_type="nf4", nested=True)
    x = activations(1, 512, torch.bfloat16)
    memory = V.gemv_variant(x, packed, state, lookup="memory")
    assert torch.equal(V.gemv_variant(x, packed, state, lookup="shuffle"), memory)
    tile = V.gemv_variant(x, packed, state, row_kernel=False)
    torch.testing.assert_close(memory.float(), tile.float(), rtol=2**-7, atol=2**-7 * memory.float().abs().max().item())


def test_bad_settings_are_refused():
    packed, state = weight(16, 128, torch.float32)
    x = activations(1, 128, torch.float32)
    with pytest.raises(ValueError, match="power of two"):
        V.gemv_variant(x, packed, state, block_n=3)
    with pytest.raises(ValueError, match="prefetch must be"):
        V.gemv_variant(x, packed, state, prefetch="x")
    with pytest.raises(ValueError, match="prefetch must be"):
        V.gemv_variant(x, packed, state, row_kernel=False, prefetch="x")
    with pytest.raises(ValueError, match="lookup must be one of"):
        V.gemv_variant(x, packed, state, lookup="prmt")


@pytest.mark.parametrize("options", [{}, {"m_tile": 8}], ids=["one row", "m8"])
def test_tile_compiles_for_a_gpu_ahead_of_time(options):
    """gemv_4bit_kernel builds for sm_75, sm_80 and sm_90 without a GPU; the nested absmax adds no fma."""
    fmas = []
    for capability, nested in [(75, True), (80, False), (90, False), (90, True)]:
        ptx = V.compile_tile_ahead(capability, torch.bfloat16, nested=nested, **options).asm["ptx"]
        assert f".target sm_{capability}" in ptx and "ld.global.v4" in ptx
        fmas.append(ptx.count("fma.rn.f32"))
    assert fmas[1] > 0 and fmas[0] == fmas[2] == fmas[3], fmas
