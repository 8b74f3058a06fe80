# %% [markdown]
# # Lesson 5 — Triton kernels
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/notebooks/05_triton_kernels.ipynb)
#
# Lessons 3 and 4 dequantized a weight with a few lines of torch: look the 4-bit codes up in a table,
# multiply by the block's absmax. On a GPU that takes several passes over memory. This lesson writes the
# whole thing as **one GPU kernel** in Triton, runs it on a CPU in Triton's interpreter, checks it against
# bitsandbytes bit for bit, and reads what an optimized version of it achieves on an H100.
#
# **What you will learn**
# - why dequantization is *memory-bound*: the bytes it moves, its arithmetic intensity, the time floor;
# - how a Triton kernel is built, step by step: program ids, offsets and masks, loading and unpacking
#   packed bytes, the table lookup, broadcasting the absmax, double dequantization, the stores;
# - how to check a kernel bit for bit against lesson 3 and bitsandbytes, and a trap: Triton's interpreter
#   rounds float32 → bfloat16 differently from a GPU;
# - what the course's optimized kernel (`qlora_ref.kernels.dequantize_4bit`) does differently, read in its
#   PTX, and what it measured on an H100.
#
# **Prerequisites:** lessons 3 and 4. No GPU needed: the H100's numbers come from a committed results file;
# with a GPU, section 7 checks and times the kernel on yours.
#
# **Sources:** QLoRA (Dettmers et al. 2023, arXiv:2305.14314); Triton (Tillet, Kung and Cox 2019,
# "Triton: an intermediate language and compiler for tiled neural network computations", MAPL);
# the roofline model (Williams, Waterman and Patterson 2009, Communications of the ACM 52(4)).

# %% [markdown]
# **The code of this lesson**, in the order to read it: `qlora_ref/kernels/dequantize_4bit.py`,
# `qlora_ref/kernels/launch.py`, `qlora_ref/kernels/twins.py`, `qlora_ref/kernels/bf16.py`. For its demonstrations
# it also uses `qlora_ref/results.py`.

# %%
import logging
import os
import sys

# Both before the imports they affect. TRITON_INTERPRET=1: the kernels of this notebook run in Triton's
# interpreter (numpy on the CPU) instead of being compiled for a GPU. TORCH_COMPILE_DISABLE: bitsandbytes
# would otherwise torch.compile its CPU code paths, which is slow.
os.environ["TRITON_INTERPRET"] = "1"
os.environ["TORCH_COMPILE_DISABLE"] = "1"
# bitsandbytes, imported on a CPU with AVX512-BF16, tries to fetch a kernel from the Hugging Face hub and logs a
# warning to stderr when it cannot. The course runs offline: that logger is kept quiet (lesson 0, section 4).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:  # clone the course, install it beside Colab's own torch (tools/colab_install.sh), run from notebooks/
    import importlib
    import subprocess

    subprocess.run(["sh", "-c", "[ -d qlora-course ] || git clone -q --depth 1 -b main https://github.com/OWNER/qlora-course; "
                    f"sh qlora-course/tools/colab_install.sh {sys.executable}"], cwd="/content", check=True)
    importlib.invalidate_caches()  # so that this running kernel finds the packages just installed
    os.chdir("/content/qlora-course/notebooks")

# %matplotlib inline
import dataclasses
import inspect
import re
from pathlib import Path

import bitsandbytes.functional as bnbF
import torch
import triton
import triton.language as tl

from qlora_ref import bnb_cpu, dequantize_4bit, nf4_codebook, quantize_4bit
from qlora_ref.blockwise import unpack_4bit
from qlora_ref.compare import compare
from qlora_ref.double_quant import decompress_absmax
from qlora_ref.kernels import dequantize_4bit as K
from qlora_ref.kernels.dequantize_4bit import _round_to_bf16, compile_ahead, dequantize_4bit_triton, launch_config
from qlora_ref.results import dequantize_summary, load_kernel_results

_ = torch.manual_seed(0)  # `_ =` keeps the generator's repr (a memory address) out of the output
gen = torch.Generator().manual_seed(0)
NF4 = nf4_codebook()
# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; this lesson's checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16

# %%
# NBVAL_IGNORE_OUTPUT
import bitsandbytes

print("torch", torch.__version__, "| triton", triton.__version__, "| bitsandbytes", bitsandbytes.__version__)

# %% [markdown]
# The course's kernel module was imported with the variable set, so its kernel is interpreted too (it
# would send CPU tensors to an interpreted copy of itself anyway):

# %%
print("qlora_ref.kernels.dequantize_4bit runs interpreted:", K.INTERPRETED)

# %% [markdown]
# ## 1. Why a kernel: dequantization is memory-bound
#
# To dequantize n values to bf16, a GPU must read n/2 bytes of packed codes and one float32 absmax per
# block of 64, and write 2n bytes. The arithmetic per value is one table lookup (a load from a 16-entry
# table that stays in the L1 cache), one float32 multiply and one conversion. Per value:

# %%
B = 64
plain_bytes = {"packed codes (4 bits)": 0.5, "absmax (float32 per 64)": 4 / B, "output (bf16)": 2.0}
nested_bytes = {"packed codes (4 bits)": 0.5, "absmax codes (uint8 per 64)": 1 / B,
                "absmax2 (float32 per 64*256)": 4 / (B * 256), "output (bf16)": 2.0}
for name, parts in [("plain", plain_bytes), ("double-quantized", nested_bytes)]:
    total = sum(parts.values())
    print(f"{name}: " + " + ".join(f"{v:.4g} {k}" for k, v in parts.items()) + f" = {total:.4f} bytes per value")
bytes_per_value = sum(plain_bytes.values())
flops_per_value = 1  # the multiply code[q] * absmax (the shift, mask and lookup are integer work and loads)
print(f"arithmetic intensity: {flops_per_value} FLOP / {bytes_per_value} bytes = {flops_per_value / bytes_per_value:.2f} FLOP per byte;"
      f" the output alone is {plain_bytes['output (bf16)'] / bytes_per_value:.0%} of the bytes")

# %% [markdown]
# A GPU can do far more than 0.39 FLOP per byte it moves. What it can move is best measured: the results
# file of this course's GPU benchmark (`python -m bench.kernels run`, run on an H100 and
# committed to `bench/results/`) timed a device-to-device copy of a tensor of the output's size, the
# practical roofline of a kernel that streams through memory. We read it here:

# %%
RESULTS = Path("..") / "bench" / "results" / "kernels-nvidia-h100-80gb-hbm3.json"
results = load_kernel_results(RESULTS)
print(f"read {RESULTS.as_posix()}: {results['device']}, measured {results['date']}")
print(f"torch {results['torch']}, triton {results['triton']}, bitsandbytes {results['bitsandbytes']}, CUDA {results['cuda']}")
by_case = {(tuple(r["shape"]), r["dtype"], r["nested"]): r for r in results["llama"]}
largest = by_case[((8192, 28672), "bf16", False)]
copy_gbps = largest["gbps"]["copy"]
print(f"copy of an 8192x28672 bf16 tensor: {largest['ms']['copy']:.4f} ms for {largest['bytes']['copy'] / 1e6:.1f} MB "
      f"read + written = {copy_gbps:.0f} GB/s")

# %% [markdown]
# With it, the roofline reasoning for the largest weight of a Llama-70B MLP (8192 × 28672). NVIDIA's H100
# SXM datasheet lists 67 TFLOP/s of float32 arithmetic (without tensor cores): divided by the measured
# bandwidth, that is the *ridge point*, the arithmetic intensity a kernel needs before compute, not memory,
# limits it. For a T4 (a free Colab GPU) we take its datasheet's 320 GB/s, an upper bound (a copy gets less).

# %%
rows, cols = 8192, 28672
n = rows * cols
moved = n * bytes_per_value
print(f"{rows}x{cols}: n = {n:,} values, {moved / 1e6:.1f} MB to move; the benchmark counted "
      f"{largest['bytes']['dequantize'] / 1e6:.1f} MB")
ridge = 67e12 / (copy_gbps * 1e9)
print(f"H100 ridge point: 67 TFLOP/s / {copy_gbps:.0f} GB/s = {ridge:.0f} FLOP per byte; "
      f"dequantization's 0.39 is {ridge / (flops_per_value / bytes_per_value):.0f}x below it: memory-bound")
floor_h100 = moved / (copy_gbps * 1e9) * 1e3
floor_t4 = moved / 320e9 * 1e3
print(f"time floor on the H100 (copy bandwidth): {floor_h100:.3f} ms; the multiplies alone at 67 TFLOP/s: "
      f"{n / 67e12 * 1e3:.4f} ms")
print(f"time floor on a T4 (320 GB/s, fp16 output, same bytes): {floor_t4:.2f} ms")

# %% [markdown]
# So the question for a dequantization kernel is never "how fast is the math" but "how close does it get
# to a copy of the same bytes". The yardstick is the copy, not bitsandbytes.
#
# ## 2. Triton in one paragraph
#
# A Triton kernel is a Python function decorated with `@triton.jit`. It is launched on a *grid* of
# programs (`kernel[grid](args)`); each program handles one tile of the data, and the code is written for
# a whole tile at once: `tl.arange(0, TILE)` is a vector of TILE offsets, `tl.load(ptr + offsets)` loads
# TILE values, arithmetic works on the whole vector. The compiler decides how the tile is spread over the
# GPU's threads. Tensors passed in become pointers to their first element. Under `TRITON_INTERPRET=1`,
# the same code runs on CPU tensors in numpy, one program after another: slow, but every step can be checked.
#
# We build the kernel from small `@triton.jit` helpers, one step at a time, each checked by a tiny kernel
# that stores what the step computed. The test input: 99 values (an odd count) in blocks of 32, so
# 4 blocks, the last one short, and 50 packed bytes.

# %%
x99 = torch.randn(99, generator=gen)
packed99, state99 = quantize_4bit(x99, blocksize=32)
print(f"packed: {packed99.numel()} bytes ({packed99.dtype}), absmax: {state99.absmax.numel()} values, "
      f"blocksize {state99.blocksize}")

# %% [markdown]
# ### Step 1: which bytes does this program own?
#
# Each program handles TILE packed bytes. `tl.program_id(0)` says which program it is; its bytes are
# `pid * TILE + arange(TILE)`. The grid has `cdiv(50, 16) = 4` programs, and the last one owns 16 slots
# but only 2 real bytes: the *mask* says which offsets exist. Every load and store of the last tile
# must use it, or it reads and writes past the end of the tensors.

# %%
@triton.jit
def tile_offsets(n_bytes, TILE: tl.constexpr):
    pid = tl.program_id(0)  # this program's number: 0, 1, 2, ...
    offs = pid * TILE + tl.arange(0, TILE)  # the TILE packed bytes it owns
    mask = offs < n_bytes  # False past the end: only the last tile has such slots
    return offs, mask


@triton.jit
def show_offsets(out_ptr, n_bytes, TILE: tl.constexpr):
    offs, mask = tile_offsets(n_bytes, TILE)
    tl.store(out_ptr + offs, tl.where(mask, offs, -1))  # -1 where the mask is False


TILE = 16
grid = (triton.cdiv(packed99.numel(), TILE),)
slots = torch.empty(grid[0] * TILE, dtype=torch.int32)
show_offsets[grid](slots, packed99.numel(), TILE=TILE)
print(f"grid = {grid}")
print(slots.reshape(grid[0], TILE))

# %% [markdown]
# ### Step 2: load the packed bytes, unpack the nibbles
#
# One masked load brings each program's bytes in (`other=0` fills the masked slots). Lesson 3 packed
# the *even* value in the high nibble: `byte >> 4` is its code, `byte & 0xF` the odd value's code.
# The codes become int32, ready to index a table.

# %%
@triton.jit
def load_codes(packed_ptr, offs, mask):
    byte = tl.load(packed_ptr + offs, mask=mask, other=0)  # uint8, one per offset
    high = (byte >> 4).to(tl.int32)  # code of value 2j (even)
    low = (byte & 0xF).to(tl.int32)  # code of value 2j + 1 (odd)
    return high, low


@triton.jit
def show_codes(packed_ptr, high_ptr, low_ptr, n_bytes, TILE: tl.constexpr):
    offs, mask = tile_offsets(n_bytes, TILE)
    high, low = load_codes(packed_ptr, offs, mask)
    tl.store(high_ptr + offs, high, mask=mask)
    tl.store(low_ptr + offs, low, mask=mask)


high = torch.empty(packed99.numel(), dtype=torch.int32)
low = torch.empty_like(high)
show_codes[grid](packed99, high, low, packed99.numel(), TILE=TILE)
codes99 = unpack_4bit(packed99, 99)  # lesson 3's unpacking, in torch
compare("even codes (high nibbles) vs lesson 3", high, codes99[0::2])
_ = compare("odd codes (low nibbles) vs lesson 3 ", low[:49], codes99[1::2])
print(f"the 50th byte's low nibble, the padding of an odd count: {int(low[49])} = 0b{int(low[49]):04b} (the code of 0.0 in NF4)")

# %% [markdown]
# ### Step 3: the table lookup
#
# Dequantization looks the code up: `code[q]`, not `q` itself (a mistake of one of the course's sources,
# lesson 3). In Triton the table is a pointer like any other tensor, and the lookup is a load
# at `code_ptr + q`, a *gather*: 16 float32 values that stay in the cache after the first touch.

# %%
@triton.jit
def show_lookup(packed_ptr, code_ptr, out_ptr, n_bytes, TILE: tl.constexpr):
    offs, mask = tile_offsets(n_bytes, TILE)
    high, low = load_codes(packed_ptr, offs, mask)
    tl.store(out_ptr + offs, tl.load(code_ptr + high), mask=mask)  # NF4 value of each even element


looked_up = torch.empty(packed99.numel())
show_lookup[grid](packed99, state99.code, looked_up, packed99.numel(), TILE=TILE)
_ = compare("code[high nibble] vs NF4[codes] in torch", looked_up, NF4[codes99[0::2]])

# %% [markdown]
# ### Step 4: one absmax per value, broadcast
#
# Value i belongs to block `i // blocksize`. Byte j holds values 2j and 2j+1; the block size is even, so
# both are in block `2j // blocksize`. Loading `absmax_ptr + block` for every offset gives each lane its
# block's scale: the load broadcasts the absmax (neighbouring lanes load the same address).

# %%
@triton.jit
def show_absmax(absmax_ptr, out_ptr, n_bytes, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr):
    offs, mask = tile_offsets(n_bytes, TILE)
    block = (2 * offs) // BLOCKSIZE  # the block of values 2j and 2j + 1
    tl.store(out_ptr + offs, tl.load(absmax_ptr + block, mask=mask, other=0.0), mask=mask)


per_byte = torch.empty(packed99.numel())
show_absmax[grid](state99.absmax, per_byte, packed99.numel(), BLOCKSIZE=32, TILE=TILE)
print("absmax per block:", [round(v, 4) for v in state99.absmax.tolist()])
print("absmax of bytes 0, 15, 16, 31, 32, 48, 49:", [round(per_byte[j].item(), 4) for j in (0, 15, 16, 31, 32, 48, 49)])
_ = compare("absmax per byte vs repeat_interleave", per_byte, state99.absmax.repeat_interleave(32)[0::2][:50])

# %% [markdown]
# ### Step 5: double dequantization of the absmax
#
# With double quantization (lesson 4) the absmax array holds uint8 codes, and each block's absmax is
# restored first: `code2[qabsmax] * absmax2[b // 256] + offset`, with the dynamic map as `code2` and one
# float32 `absmax2` per 256 blocks. Written as a product, rounded to float32, *then* a sum, the way
# bitsandbytes does it (section 5 comes back to why the order of roundings matters).
#
# To reach more than one `absmax2` entry the check needs more than 256 blocks: 600 blocks of 64 values.

# %%
@triton.jit
def nested_absmax(qabsmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, mask, NESTED_BLOCKSIZE: tl.constexpr):
    q = tl.load(qabsmax_ptr + block, mask=mask, other=0).to(tl.int32)  # uint8 code of this block's absmax
    scale2 = tl.load(absmax2_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
    product = tl.load(code2_ptr + q) * scale2  # the 8-bit blockwise dequantization, rounded to float32
    return product + tl.load(offset_ptr)  # then the mean, added back


@triton.jit
def show_nested(qabsmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, out_ptr, n_blocks, TILE: tl.constexpr):
    block, mask = tile_offsets(n_blocks, TILE)  # here one lane per block
    tl.store(out_ptr + block, nested_absmax(qabsmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, mask, 256), mask=mask)


x600 = torch.randn(600 * 64, generator=gen)
packed600, state600 = quantize_4bit(x600, blocksize=64, double_quant=True)
n_blocks = state600.absmax.numel()
restored = torch.empty(n_blocks)
offset600 = state600.offset.reshape(1).float()
show_nested[(triton.cdiv(n_blocks, 256),)](state600.absmax, state600.state2.code, state600.state2.absmax, offset600,
                                           restored, n_blocks, TILE=256)
print(f"{n_blocks} absmax codes ({state600.absmax.dtype}), {state600.state2.absmax.numel()} absmax2 values, offset {offset600.item():.4f}")
_ = compare("restored absmax vs lesson 4's decompress_absmax", restored,
            decompress_absmax(state600.absmax, state600.offset, state600.state2))

# %% [markdown]
# ### Step 6: scale and store: the whole kernel
#
# Now the steps together. Each program scales its two codes per byte by the absmax, converts to the
# output's dtype (`out_ptr.dtype.element_ty`: float32, float16 or bfloat16, whatever tensor was passed) and
# stores the even values at `2j` and the odd ones at `2j + 1`: two strided stores, the simple way. With an
# odd count the last odd value does not exist: its own mask. (`SOFT_BF16` is section 4's, ignore it for now.)

# %%
@triton.jit
def dequantize_4bit_naive(
    packed_ptr,  # uint8 [n_bytes]: two codes per byte, the even value in the high nibble
    absmax_ptr,  # float32 [blocks], or uint8 [blocks] codes of it when NESTED
    code_ptr,  # float32 [16]: the 4-bit codebook (NF4, FP4)
    absmax2_ptr,  # float32 [blocks / 256] (NESTED only)
    code2_ptr,  # float32 [256]: the dynamic map (NESTED only)
    offset_ptr,  # float32 [1]: the absmax mean (NESTED only)
    out_ptr,  # float32 / float16 / bfloat16 [n]
    n,  # number of values
    n_bytes,  # number of packed bytes, (n + 1) // 2
    BLOCKSIZE: tl.constexpr,  # values per absmax
    NESTED: tl.constexpr,  # double-quantized absmax?
    TILE: tl.constexpr,  # packed bytes per program
    SOFT_BF16: tl.constexpr,  # section 4
):
    offs, mask = tile_offsets(n_bytes, TILE)  # step 1
    high, low = load_codes(packed_ptr, offs, mask)  # step 2
    block = (2 * offs) // BLOCKSIZE  # step 4
    if NESTED:  # step 5
        absmax = nested_absmax(absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, block, mask, 256)
    else:
        absmax = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    even = tl.load(code_ptr + high) * absmax  # step 3, scaled: a float32 product
    odd = tl.load(code_ptr + low) * absmax
    if SOFT_BF16:
        even = _round_to_bf16(even)
        odd = _round_to_bf16(odd)
    dtype = out_ptr.dtype.element_ty
    tl.store(out_ptr + 2 * offs, even.to(dtype), mask=2 * offs < n)  # values 0, 2, 4, ...
    tl.store(out_ptr + 2 * offs + 1, odd.to(dtype), mask=2 * offs + 1 < n)  # values 1, 3, 5, ...


def dequantize_naive(packed, state, tile=1024, soft_bf16=False):
    """Launch dequantize_4bit_naive on a QuantState from quantize_4bit: one program per `tile` packed bytes."""
    n = state.shape.numel()
    out = torch.empty(state.shape, dtype=state.dtype, device=packed.device)
    if state.nested:
        absmax2, code2, offset = state.state2.absmax, state.state2.code, torch.as_tensor(state.offset).reshape(1).float()
    else:
        absmax2 = code2 = offset = state.absmax  # not read: any pointer will do
    grid = (triton.cdiv(packed.numel(), tile),)
    dequantize_4bit_naive[grid](packed, state.absmax, state.code, absmax2, code2, offset, out, n, packed.numel(),
                                BLOCKSIZE=state.blocksize, NESTED=state.nested, TILE=tile,
                                SOFT_BF16=soft_bf16 and state.dtype == torch.bfloat16)
    return out


_ = compare("99 values, blocks of 32: kernel vs lesson 3's dequantize_4bit",
            dequantize_naive(packed99, state99, tile=16), dequantize_4bit(packed99, state99))

# %% [markdown]
# ## 3. Check it: against lesson 3 and against bitsandbytes
#
# A kernel is only done when it is exact on awkward inputs. Every combination of NF4 / FP4, plain /
# double-quantized and float32 / float16 / bfloat16 output, on a 128 × 160 weight (320 blocks of 64, so two
# `absmax2` entries, and rows that are not whole blocks), compared with `qlora_ref.dequantize_4bit` and with
# bitsandbytes (it quantized the weight; its packed bytes are checked to equal ours first). bitsandbytes' values
# come from its portable decoder, the one that computes the same on every CPU (lesson 0, section 4):

# %%
def verdict(ours, reference):
    """'exact', '±0' (equal values, some zeros of opposite sign) or the share of values that differ."""
    ours, reference = ours.double(), reference.double()
    if not torch.equal(ours, reference):
        return f"{(ours != reference).double().mean():.0%} differ"
    return "exact" if torch.equal(ours.signbit(), reference.signbit()) else "±0"


def check(dequantizer, shape=(128, 160), dtypes=(torch.float32, torch.float16, torch.bfloat16), label=""):
    """One row per codebook and absmax, one column per output dtype: `dequantizer` vs reference | vs bitsandbytes."""
    print(f"{label}{shape[0]} x {shape[1]}, each cell: vs lesson 3's reference | vs bitsandbytes")
    print(f"{'':11}" + "".join(f"{str(dtype)[6:]:>25}" for dtype in dtypes))
    for quant_type in ("nf4", "fp4"):
        for nested in (False, True):
            cells = []
            for dtype in dtypes:
                w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
                packed, state = quantize_4bit(w, blocksize=64, quant_type=quant_type, double_quant=nested)
                bnb_packed, bnb_state = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=nested)
                assert torch.equal(packed, bnb_packed), "lesson 3's quantizer gives bitsandbytes' bytes"
                ours = dequantizer(packed, state)
                cells.append(f"{verdict(ours, dequantize_4bit(packed, state))} | "
                             f"{verdict(ours, bnb_cpu.dequantize_4bit_portable(bnb_packed, bnb_state))}")
            print(f"{quant_type + (' nested' if nested else ' plain'):11}" + "".join(f"{cell:>25}" for cell in cells))


check(dequantize_naive)

# %% [markdown]
# float32 and float16: exact, for both codebooks, plain and nested. Against bitsandbytes FP4's zeros differ in
# sign (`±0`), and only they: its portable decoder looks codes up in its Python table, whose code 8 is +0.0, where its
# C++ scalar loop and ours give -0.0 (lesson 2). bfloat16: a quarter to a half of the values differ, by one
# bfloat16 step. The kernel is right; the interpreter is not a GPU.
#
# 128 × 160 is also a shape that bitsandbytes' own decoder gets wrong on a CPU with AVX-512, whose loop misreads
# the scales of rows that are not whole blocks (lesson 0, section 4). On this machine (the output depends on it):

# %%
# NBVAL_IGNORE_OUTPUT
for quant_type in ("nf4", "fp4"):
    print(bnb_cpu.native_decoder_report(torch.randn(128, 160, generator=torch.Generator().manual_seed(1)), quant_type))
#
# ## 4. A trap: the interpreter truncates float32 → bfloat16
#
# A GPU converts float32 to bfloat16 by *rounding to the nearest* bfloat16 (ties to even), as torch does:
# `.to(tl.bfloat16)` compiles to the PTX instruction `cvt.rn.bf16.f32` (`rn`: round to nearest; section 5
# finds its two-at-a-time form in the compiled kernel). Triton's
# interpreter (3.9 and 3.6 both) does it by dropping the low 16 bits of the float32: *truncation*, toward zero.
# The naive kernel's bfloat16 output against the reference's float32 product truncated in torch:

# %%
w = torch.randn(128, 160, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
packed_bf, state_bf = quantize_4bit(w, blocksize=64)
naive_bf = dequantize_naive(packed_bf, state_bf)
product = dequantize_4bit(packed_bf, dataclasses.replace(state_bf, dtype=torch.float32))  # code[q] * absmax in float32
truncated = (product.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)  # low 16 bits dropped
rounded = product.to(torch.bfloat16)  # round to nearest even
compare("interpreter's bf16 vs float32 product truncated", naive_bf, truncated)
compare("interpreter's bf16 vs float32 product rounded  ", naive_bf, rounded)
differ = naive_bf != rounded
print(f"{int(differ.sum()):,} of {w.numel():,} values differ ({differ.double().mean():.1%}); all of them by one bfloat16 step "
      f"toward zero: {bool(((rounded[differ].float().abs() - naive_bf[differ].float().abs()) > 0).all())}")

# %% [markdown]
# Truncation and rounding agree when the dropped 16 bits are below half a step, so only part of the values
# (44% here) move. On a GPU the
# same kernel would be exact; in the interpreter a check of bfloat16 output would fail for a reason that has
# nothing to do with the kernel. The course's kernel rounds in integer arithmetic when it runs interpreted,
# with this helper (`_round_to_bf16`: add 0x7FFF plus the lowest kept bit, then drop 16 bits; that is
# round-to-nearest-even; NaN kept a NaN):

# %%
print(inspect.getsource(getattr(_round_to_bf16, "fn", _round_to_bf16)))

# %% [markdown]
# Our kernel already takes the flag: with `SOFT_BF16=True` it calls the same helper before the cast. Run
# again, on everything:

# %%
check(lambda packed, state: dequantize_naive(packed, state, soft_bf16=True), dtypes=(torch.bfloat16,), label="soft bf16 ")

# %% [markdown]
# Exact now. (On a GPU one uses the plain cast, which is faster: the library sets `SOFT_BF16` only in the
# interpreter.)
#
# One more awkward case, the Triton tutorials' favourite: a shape whose last dimension is odd. Our kernel
# is fine. It is also the one shape for which bitsandbytes' own `dequantize_4bit` takes the portable decoder on
# every CPU, so here its native call gives the same values as above, FP4's +0.0 included:

# %%
w_odd = torch.randn(3, 333, generator=gen)
for quant_type in ("nf4", "fp4"):
    packed_odd, state_odd = quantize_4bit(w_odd, blocksize=64, quant_type=quant_type)
    bnb_packed, bnb_state = bnbF.quantize_4bit(w_odd, blocksize=64, quant_type=quant_type)
    ours = dequantize_naive(packed_odd, state_odd)
    compare(f"3x333 {quant_type} vs reference   ", ours, dequantize_4bit(packed_odd, state_odd))
    compare(f"3x333 {quant_type} vs bitsandbytes", ours, bnbF.dequantize_4bit(bnb_packed, bnb_state))

# %% [markdown]
# `compare` tells the sign of zero apart (-0.0 == 0.0 is True in Python, but their bits differ): the FP4
# values that differ are all zeros, -0.0 here against +0.0 there.
#
# ## 5. The library kernel: what it does differently
#
# `qlora_ref.kernels.dequantize_4bit.dequantize_4bit_triton` computes the same thing, tested bit for bit
# against bitsandbytes on an H100. First, the same check on the CPU (it runs in the interpreter, with the
# bfloat16 rounding on):

# %%
check(dequantize_4bit_triton, label="library ")

# %% [markdown]
# Its differences are all about memory traffic, the only thing that counts here (section 1).
#
# **A 2-D tile shaped for 16-byte stores.** The tile is ROWS × COLS packed bytes, with COLS chosen so that
# one row's *output* is 16 bytes, the widest store one thread of an H100 or a T4 can do (`st.global.v4.b32`): 4 packed bytes →
# 8 bf16 values. Triton gives each thread whole rows, neighbouring threads neighbouring rows, so loads and
# stores are coalesced. A row never straddles two blocks (COLS ≤ blocksize / 2), so one absmax per row.

# %%
for dtype in (torch.bfloat16, torch.float32):
    rows_, cols_, warps, tile_bytes = launch_config(64, dtype)
    print(f"{str(dtype)[6:]:8}: tile {rows_} x {cols_} bytes = {tile_bytes} bytes, {warps} warps; one row = {cols_} bytes in "
          f"-> {2 * cols_ * dtype.itemsize} bytes out")

# %% [markdown]
# **`tl.join` instead of two strided stores.** Our naive kernel writes even and odd values with two
# stores of stride 2. The library joins the two halves into pairs and reshapes, so that each row's
# values lie in memory order and go out in one contiguous store:

# %%
@triton.jit
def join_demo(even_ptr, odd_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    pairs = tl.join(tl.load(even_ptr + i), tl.load(odd_ptr + i))  # shape [N, 2]
    tl.store(out_ptr + tl.arange(0, 2 * N), tl.reshape(pairs, (2 * N,)))  # even0, odd0, even1, odd1, ...


joined = torch.empty(8, dtype=torch.int32)
join_demo[(1,)](torch.tensor([0, 2, 4, 6], dtype=torch.int32), torch.tensor([1, 3, 5, 7], dtype=torch.int32), joined, N=4)
print(joined.tolist())

# %% [markdown]
# **Unmasked full tiles.** Masks cost: every tile but the last takes a branch without them
# (`if values_left >= 2 * ROWS * COLS`), and only the last tile, which may stop in the middle of a row or
# of a byte, is masked.
#
# **No fused multiply-add for the nested absmax.** `code2[q] * absmax2 + offset` invites the compiler to
# fuse the two into one `fma` instruction, with one rounding instead of two. bitsandbytes computes the
# product in one kernel and adds the offset in another, so the product is rounded to float32 first; an
# fma would differ from it in the last bit now and then. The kernel is compiled with
# `enable_fp_fusion=False`.
#
# We can check all of this in the generated code without a GPU: `compile_ahead` compiles the kernel for a
# GPU of a given compute capability (90: H100; 75: T4) with the `ptxas` that ships inside the triton wheel,
# and returns the PTX (the GPU's assembly language). Counting its instructions:

# %%
def ptx_counts(kernel, pattern=r"\b(st\.global[.\w]*|st\.shared[.\w]*|bar\.sync|fma\.rn\.f32|cvt\.rn\.b?f16\w*\.f32)"):
    ptx = kernel.asm["ptx"]
    found = re.findall(pattern, ptx)
    target = re.search(r"\.target (\w+)", ptx).group(1)
    return target, {name: found.count(name) for name in sorted(set(found))}


def store_bytes(instruction):
    """Bytes one global store moves: st.global.v4.b32 -> 16, st.global.b16 -> 2."""
    vector, bits = re.fullmatch(r"st\.global(?:\.v(\d))?\.b(\d+)", instruction).groups()
    return int(vector or 1) * int(bits) // 8


kernels = {
    "H100, bf16, nested            ": compile_ahead(90, torch.bfloat16, nested=True),
    "H100, bf16, nested, fp fusion ": compile_ahead(90, torch.bfloat16, nested=True, fp_fusion=True),
    "H100, bf16, two strided stores": compile_ahead(90, torch.bfloat16, nested=True, join=False),
    "T4,   fp16, nested            ": compile_ahead(75, torch.float16, nested=True),
}
for label, kernel in kernels.items():
    target, counts = ptx_counts(kernel)
    widest = max((name for name in counts if name.startswith("st.global")), key=store_bytes)
    rounding = sorted({name.split(".")[1] for name in counts if name.startswith("cvt")})
    print(f"{label}: {target}; widest global store {widest} ({store_bytes(widest)} bytes); "
          f"fma: {'yes' if 'fma.rn.f32' in counts else 'no'}; to 16 bits by cvt.{'/'.join(rounding)}")

# %% [markdown]
# Read it line by line:
# - the default H100 kernel stores with `st.global.v4.b32`: 16 bytes per instruction, and has no `fma`;
# - with Triton's default `enable_fp_fusion=True` the nested absmax becomes `fma.rn.f32` (not bit-exact);
# - with two strided stores, as in our naive kernel, the stores become 2-byte scalars (`st.global.b16`);
# - `cvt.rn...` converts float32 to bfloat16 or float16, rounding to nearest (`rn`): the GPU's rounding that
#   section 4 reproduced by hand;
# - for a T4 (sm_75, no bfloat16 arithmetic) the same kernel compiles for float16 output: a Colab T4 can run it.
#
# The instruction counts themselves depend on Triton's version (the output depends on it): Triton 3.9 converts
# two values at a time (`cvt.rn.bf16x2.f32`) and, for the strided stores, shuffles through shared memory first
# (`st.shared`, `bar.sync`); older versions convert one at a time and store straight from registers.

# %%
# NBVAL_IGNORE_OUTPUT
print("triton", triton.__version__)
for label, kernel in kernels.items():
    print(label, *ptx_counts(kernel))

# %%
# NBVAL_IGNORE_OUTPUT
import time

start = time.perf_counter()
compile_ahead(90, torch.bfloat16, nested=True, tile_bytes=1024)
# Triton keeps compiled kernels in a disk cache (~/.triton/cache): about 0.5 s the first time, ~0 s after.
print(f"compile_ahead took {time.perf_counter() - start:.2f} s on this CPU")

# %% [markdown]
# ## 6. What it measured on an H100
#
# The results file of section 1 holds the benchmark: each Llama weight quantized to NF4 (blocks of 64) by
# bitsandbytes on the GPU, both dequantizers checked to give the same bits, then timed with
# `triton.testing.do_bench` (median, L2 cache flushed before every call) next to a copy of a tensor of the
# output's size. GB/s counts the bytes each must move (section 1). The bf16 rows, read from the file:

# %%
print(f"{results['device']}, {results['date'][:10]}; bf16 output")
print(f"{'weight':>10} {'absmax':6} | {'ours ms':>7} {'copy ms':>7} | {'ours GB/s':>9} {'bnb GB/s':>8} {'copy GB/s':>9} | "
      f"{'ours/copy':>9} {'vs bnb':>6} | same bits")
for r in results["llama"]:
    if r["dtype"] == "bf16":
        v = dequantize_summary(r)
        print(f"{r['shape'][0]:>4}x{r['shape'][1]:<5} {'nested' if r['nested'] else 'plain':6} | {v['ms']:7.4f} {v['copy_ms']:7.4f} | "
              f"{v['gbps']:9.0f} {v['bnb_gbps']:8.0f} {v['copy_gbps']:9.0f} | {v['fraction_of_copy']:9.0%} "
              f"{v['speedup_vs_bnb']:5.2f}x | {v['exact']}")

# %% [markdown]
# On the largest weight the kernel streams at 94-95% of a copy's bandwidth. It is faster than bitsandbytes on
# every weight: 1.20-1.27x on plain weights, 1.40-1.55x with double quantization, where it restores each
# absmax in registers inside its one launch while bitsandbytes makes separate passes over the absmax. The
# optional [lesson 11](11_performance.ipynb) reads the rest of this benchmark: the fp16 rows and a figure, the
# targets the kernel met and missed (and why one of them was out of any kernel's reach), the GPU-only and host
# times that separate the two effects of double quantization, and what the naive kernel's two strided stores
# cost on the GPU.
#
# ## 7. On your GPU
#
# With a CUDA GPU, section 6 runs on your card: each weight quantized by the course (lesson 3's function, which on a
# GPU runs the course's Triton quantizer) and by bitsandbytes' CUDA kernel, the two states compared byte for byte,
# dequantized by both and the values compared, then both timed with `triton.testing.do_bench` against a copy of the
# output's size. The output is your card's compute dtype (float16 on a T4). The course's kernels compile for the
# GPU even though this notebook set `TRITON_INTERPRET=1` for its own: a kernel module sends CUDA tensors to a
# compiled copy of itself. The output is your machine's, so nbval does not compare it.

# %%
# NBVAL_IGNORE_OUTPUT
def same_state(ours, theirs) -> bool:
    """Our QuantState and bitsandbytes' hold the same bytes: absmax (or its codes), and nested, absmax2 and offset."""
    same = torch.equal(ours.absmax, theirs.absmax)
    if theirs.nested:
        same &= torch.equal(ours.state2.absmax, theirs.state2.absmax) and torch.equal(ours.offset, theirs.offset)
    return same


if device.type == "cuda":
    import matplotlib.pyplot as plt
    from triton.testing import do_bench

    print(f"{torch.cuda.get_device_name(device)}: output {str(compute_dtype)[6:]}, NF4, blocks of 64")
    print(f"{'weight':>10} {'absmax':6} | same bytes, values | {'ours ms':>8} {'bnb ms':>7} {'copy ms':>8} | "
          f"{'ours GB/s':>9} {'bnb GB/s':>8} {'copy GB/s':>9} | vs bnb")
    measured = []
    for shape in [(4096, 4096), (4096, 14336), (8192, 8192), (8192, 28672)]:
        w = torch.randn(shape, device=device, generator=torch.Generator(device).manual_seed(0)).to(compute_dtype)
        for nested in (False, True):
            packed, state = quantize_4bit(w, blocksize=64, double_quant=nested)
            bnb_packed, bnb_state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
            same_bytes = torch.equal(packed, bnb_packed) and same_state(state, bnb_state)
            out = dequantize_4bit_triton(packed, state)
            same_values = torch.equal(out, bnbF.dequantize_4bit(bnb_packed, bnb_state))
            ms = {"ours": do_bench(lambda: dequantize_4bit_triton(packed, state)),
                  "bnb": do_bench(lambda: bnbF.dequantize_4bit(bnb_packed, bnb_state)),
                  "copy": do_bench(lambda: out.clone())}
            moved = w.numel() * sum((nested_bytes if nested else plain_bytes).values())  # section 1's bytes
            gbps = {"ours": moved / ms["ours"] / 1e6, "bnb": moved / ms["bnb"] / 1e6,
                    "copy": 2 * out.numel() * out.element_size() / ms["copy"] / 1e6}
            measured.append((f"{shape[0]}x{shape[1]} {'nested' if nested else 'plain'}", gbps))
            print(f"{shape[0]:>5}x{shape[1]:<5} {'nested' if nested else 'plain':6} | {str(same_bytes):>10}, "
                  f"{str(same_values):6} | {ms['ours']:8.4f} {ms['bnb']:7.4f} {ms['copy']:8.4f} | {gbps['ours']:9.0f} "
                  f"{gbps['bnb']:8.0f} {gbps['copy']:9.0f} | {ms['bnb'] / ms['ours']:5.2f}x")
    fig, ax = plt.subplots(figsize=(9, 3.2))
    labels = [label for label, _ in measured]
    for i, key in enumerate(("ours", "bnb", "copy")):
        ax.bar([x + 0.27 * (i - 1) for x in range(len(labels))], [g[key] for _, g in measured], width=0.27,
               label={"ours": "course kernel", "bnb": "bitsandbytes", "copy": "copy (roofline)"}[key])
    ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
    ax.set_ylabel("GB/s")
    ax.set_title(f"4-bit dequantize on {torch.cuda.get_device_name(device)}")
    ax.legend(fontsize=8)
    plt.show()
else:
    print("No GPU here: on a CUDA GPU this cell checks the course's kernels against bitsandbytes' CUDA ones on your "
          "card, byte for byte, and times them against a copy (section 6 has the H100's figures).")

# %% [markdown]
# ## Summary
#
# - Dequantizing to bf16 moves 2.56 bytes per value (the output is 78% of them) for 1 FLOP: 0.39 FLOP per
#   byte, 58x below the H100's ridge point. The floor for 8192 × 28672 is set by memory: 0.20 ms at
#   the H100's measured copy bandwidth (2985 GB/s), 1.9 ms at a T4's 320 GB/s.
# - A Triton kernel is written per tile: program id → offsets → mask; load the packed bytes; `>> 4` and
#   `& 0xF`; `tl.load(code_ptr + q)` is the lookup; `absmax_ptr + 2j // blocksize` broadcasts the scale;
#   double dequantization is `code2[q] * absmax2[b // 256] + offset`; two strided stores write the values.
# - Checked in Triton's interpreter: exact against lesson 3 and bitsandbytes for NF4 and FP4, plain and nested,
#   float32 and float16. bfloat16 needs care: the interpreter truncates float32 → bfloat16 (25-49% of the
#   values one step off here); integer round-to-nearest-even (`_round_to_bf16`) makes it exact.
# - The library kernel shapes its tile for 16-byte stores, interleaves with `tl.join`, skips masks on full
#   tiles and forbids the fma that would change the nested absmax's bits; its PTX shows all of it, compiled
#   here for an H100 and a T4 without either.
# - On an H100 it reaches 94-95% of a copy on 8192 × 28672, and runs 1.20-1.27x as fast as bitsandbytes on
#   plain weights, 1.40-1.55x with double quantization (section 6; lesson 11 has its targets).

# %% [markdown]
# **Exercise:** [exercises/05_triton_kernels.ipynb](../exercises/05_triton_kernels.ipynb) (solution:
# [solutions/05_triton_kernels.ipynb](../solutions/05_triton_kernels.ipynb))

# %% [markdown]
# ## Check your understanding
#
# 1. With float32 output, how many bytes per value must the kernel move, and what is the floor for
#    8192 × 28672 at 2985 GB/s? Why is float32 output rarely what a QLoRA layer wants?
#
# <details><summary>Answer</summary>
#
# 0.5 (codes) + 4/64 (absmax) + 4 (output) = 4.5625 bytes per value, against 2.5625 for bf16. For
# 8192 × 28672 = 234,881,024 values that is 1,072 MB, and 1,072 MB / 2985 GB/s = 0.36 ms, against 0.20 ms for
# bf16: the output is now 88% of the bytes. A QLoRA layer multiplies in its 16-bit compute dtype (tensor cores
# run 16-bit products), so a float32 weight would be converted again before the GEMM, or slow it down.
#
# </details>

# %% [markdown]
# 2. In step 4 the block of byte j is `2j // blocksize`. Which block size would break this, and why does
#    the library require COLS ≤ blocksize / 2 for its one-absmax-per-row trick?
#
# <details><summary>Answer</summary>
#
# An odd one: byte j holds values 2j and 2j + 1, and only an even block size guarantees that both fall in the
# same block (with blocksize 3, values 2 and 3 lie in blocks 0 and 1). A row of the library's tile is COLS
# packed bytes, 2 · COLS values; it starts at a multiple of 2 · COLS values, so with COLS ≤ blocksize / 2 (both
# powers of two) the row lies inside one block, and one absmax load serves the whole row.
#
# </details>

# %% [markdown]
# 3. Round 1.00390625 (= 1 + 2^-8) and 1.01171875 (= 1 + 3 · 2^-8) to bfloat16 by truncation and by
#    round-to-nearest-even. Which of them differ? (bfloat16 keeps 7 fraction bits.)
#
# <details><summary>Answer</summary>
#
# A bfloat16 step near 1 is 2^-7, so 2^-8 is exactly half a step: both numbers are ties. 1 + 2^-8: truncation
# gives 1.0; to nearest even also 1.0 (its last kept bit is 0, already even). 1 + 3 · 2^-8 = 1 + 2^-7 + 2^-8:
# truncation gives 1 + 2^-7 = 1.0078125; the last kept bit is 1 (odd), so round-to-nearest-even goes up to
# 1 + 2^-6 = 1.015625. Only the second differs, by one step: what section 4 saw on 44% of the values.
#
# </details>

# %% [markdown]
# 4. Section 6's "ours/copy" column compares bandwidths, not times. On 8192 × 28672, which takes less time,
#    our kernel or the copy, and why?
#
# <details><summary>Answer</summary>
#
# Our kernel: 0.2137 ms against the copy's 0.3147 ms. The copy of a bf16 tensor of the output's size reads
# and writes 2 bytes a value (4 in all, 940 MB in section 1), the kernel moves 2.56 (602 MB). It moves 64% of
# the copy's bytes at 94% of its bandwidth, so it takes about 0.64 / 0.94 ≈ 0.68 of its time. The copy is the
# yardstick for bandwidth; a kernel that reads 4-bit codes is allowed to finish first.
#
# </details>
