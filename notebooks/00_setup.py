# %% [markdown]
# # Lesson 0 — Setup: check your environment
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/notebooks/00_setup.ipynb)
#
# **What you will learn**
# - how to install the course (locally, or on Colab) and check that it works;
# - which device your notebooks will run on, and which 16-bit *compute dtype* goes with it
#   (bfloat16, or float16 on a Colab T4);
# - how Triton kernels run on a machine without a GPU (the interpreter);
# - the `compare(name, ours, reference)` helper that every later lesson uses to check our code against
#   bitsandbytes.
#
# **Prerequisites:** Python and PyTorch basics. No GPU is needed: every lesson runs on a CPU, and with a GPU
# lessons 5-8 also time and train on it (section 6 says what each needs).

# %% [markdown]
# **The code of this lesson**, in the order to read it: `qlora_ref/environment.py`, `qlora_ref/compare.py`,
# `qlora_ref/bnb_cpu.py`.

# %% [markdown]
# **Install, locally:** `make lab` in the repository root sets everything up and opens JupyterLab; `make test`
# runs the course's own checks. Both install exactly the versions in `requirements.lock` (one version of every
# package, with its hash), so that your outputs are the ones printed here. With conda: `conda env create -f
# environment.yml && conda activate qlora-course` installs the same versions. Then open this notebook from
# `notebooks/`.
#
# **Install, on Colab:** open the notebook with the *Open in Colab* badge above, pick *Runtime → Change runtime
# type → T4 GPU*, and run the first code cell. On Colab only, it clones the course into `/content/qlora-course`,
# pip-installs the course package (`qlora_ref`) and `bitsandbytes==0.50.2` while keeping Colab's own torch, and
# moves into the clone's `notebooks/` folder. Every lesson starts with the same cell, so each one opens on Colab
# by itself. Section 5 lists what can go wrong, and the fix.

# %%
import logging
import os
import sys

# Before importing torch: bitsandbytes would otherwise torch.compile its CPU code paths, which is slow.
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

import torch

import qlora_ref
from qlora_ref.compare import compare

_ = torch.manual_seed(0)  # `_ =` keeps the generator's repr (a memory address) out of the output

# %% [markdown]
# ## 1. Versions
#
# This cell's output depends on your machine, so the course's automatic checks ignore it (it starts with
# `# NBVAL_IGNORE_OUTPUT`). Paste it into any bug report. The course's outputs were recorded with the versions in
# `requirements.lock`; the last line lists every installed package that differs from it (Colab's own torch,
# numpy and friends will: torch is not in the lock, and a line may then print differently from the one stored).

# %%
# NBVAL_IGNORE_OUTPUT
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from qlora_ref.environment import lock_differences, locked_pins

print(f"[{'OK' if sys.version_info >= (3, 11) else 'FAIL'}] python {platform.python_version()} (the course needs >= 3.11)")

PINNED = {"bitsandbytes": "0.50.2"}
OPTIONAL = {"triton"}  # the Triton lessons need it; lessons 0-4 do not
for package in ["torch", "bitsandbytes", "triton", "numpy", "scipy", "matplotlib", "ipywidgets"]:
    try:
        installed = version(package)
    except PackageNotFoundError:
        print(f"[{'--' if package in OPTIONAL else 'FAIL'}] {package} is not installed")
        continue
    wanted = PINNED.get(package)
    status = "OK" if wanted is None or installed == wanted else "FAIL"
    print(f"[{status}] {package} {installed}" + (f" (the course pins {wanted})" if wanted else ""))

LOCK = Path("..") / "requirements.lock"  # the lessons run from notebooks/
if LOCK.exists():
    differences = lock_differences(LOCK)
    print(f"[{'--' if differences else 'OK'}] {len(locked_pins(LOCK))} locked packages:",
          "; ".join(differences) if differences else "every one at its locked version")
else:
    print(f"[--] no {LOCK}: the course is not installed from a clone")

# %% [markdown]
# ## 2. The device, and the compute dtype that goes with it
#
# QLoRA stores the frozen weights in 4 bits but computes in 16 bits: each 4-bit block is dequantized to
# the *compute dtype* just before its matrix multiplication (Dettmers et al. 2023, arXiv:2305.14314). The
# paper uses bfloat16. bfloat16 arithmetic needs an Ampere GPU or newer (compute capability 8.0, "sm_80").
# Colab's free T4 is a Turing GPU, sm_75: there we use float16, which has the same 16 bits but less range.
#
# A trap: `torch.cuda.is_bf16_supported()` answers **True** on a T4, because by default
# (`including_emulation=True`) it only checks that a bfloat16 tensor can be *created* on the GPU. Ask the
# hardware question instead: the compute capability, or `is_bf16_supported(including_emulation=False)`.
# On a CPU, torch supports bfloat16 arithmetic too, so the CPU also gets bfloat16.
#
# Both choices in one line each:

# %%
# NBVAL_IGNORE_OUTPUT
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16

print("device:       ", device)
print("compute dtype:", compute_dtype)
if device.type == "cuda":
    props = torch.cuda.get_device_properties(device)
    print(f"GPU:           {props.name}, sm_{props.major}{props.minor}, {props.total_memory / 2**30:.1f} GiB")
    print("is_bf16_supported():                          ", torch.cuda.is_bf16_supported())
    print("is_bf16_supported(including_emulation=False): ", torch.cuda.is_bf16_supported(including_emulation=False))
else:
    print("no CUDA GPU: everything runs on the CPU (slower, same results)")

# %% [markdown]
# ## 3. Triton, and its interpreter on a CPU
#
# Later lessons write GPU kernels in Triton. Triton compiles a kernel for a GPU; on a machine without one,
# setting the environment variable `TRITON_INTERPRET=1` makes `@triton.jit` run the kernel in Python (with
# numpy), one program instance after another, on CPU tensors. It is slow, but it runs the same kernel code,
# so a CPU-only laptop can still develop and test kernels. Set the variable before the kernel is defined
# (older Triton versions read it when `triton` is imported). Triton is optional for lessons 0-4, so this
# cell only reports; it never fails.

# %%
# NBVAL_IGNORE_OUTPUT
try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    print("[--] triton is not installed (needed only by the Triton lessons)")

if triton is not None:
    if device.type == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
    mode = "in the interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else f"compiled for {device}"

    @triton.jit
    def add_one_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n  # the last program instance is only partly inside the tensor
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + 1, mask=mask)

    x = torch.arange(1000, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    add_one_kernel[(triton.cdiv(x.numel(), 256),)](x, y, x.numel(), BLOCK=256)
    ok = torch.equal(y, x + 1)
    print(f"[{'OK' if ok else 'FAIL'}] triton {triton.__version__}: a kernel ran {mode} and added 1 to 1,000 values")

# %% [markdown]
# ## 4. The course package, checked against bitsandbytes
#
# `qlora_ref` is this course's own implementation of QLoRA's quantization, written from the papers and
# checked against bitsandbytes 0.50.2. To see at a glance whether two tensors match we use a tiny helper,
# `compare(name, ours, reference)`, in the spirit of the `cmp` helper of Karpathy's *makemore* lectures.
# It prints one line, and the line says which claim was made:
#
# - by default, **equality**: **exact** (every value equal, and every zero of the same sign) or **DIFFERENT**
#   (how many values differ, and the first one);
# - given a tolerance (`rtol`, `atol`), **closeness**: **close** when every value is within
#   `atol + rtol·|reference|`, the same line whether or not the two happen to be equal, or DIFFERENT.
#
# Why not print how far apart two close tensors are? A sum of float32 products comes out a few rounding steps
# apart on another CPU, with another number of threads, or with another BLAS library, and every printed line
# that the course's checks compare must read the same on every machine. So a lesson claims exactness where the
# arithmetic is the same everywhere (a table lookup, one product, a cast), and states a tolerance elsewhere.

# %%
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF

compare("NF4 table", qlora_ref.nf4_codebook(), bnbF.get_4bit_type("nf4", device="cpu"))
compare("a near miss", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 2e-7]))
compare("a near miss, within float32 rounding", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 2e-7]), rtol=1e-6)
# compare() also returns its line; `_ =` keeps Jupyter from echoing it a second time.
_ = compare("a real miss", torch.tensor([0.12, 0.5]), torch.tensor([0.13, 0.5]), rtol=1e-6)

# %% [markdown]
# Now the self-check. Every line below must say `[OK]` on every machine: it runs on CPU tensors, where
# bitsandbytes 0.50.2 and `qlora_ref` must agree bit for bit. (A float32 tensor is compared "bit for bit"
# by viewing its 4 bytes per value as an int32.)

# %%
def check(label, ok):
    print(f"[{'OK' if ok else 'FAIL'}] {label}")


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


check(f"qlora_ref imports ({len(qlora_ref.__all__)} public names)", len(qlora_ref.__all__) > 0)
check(f"bitsandbytes {bnb.__version__} is the version the course is checked against", bnb.__version__ == "0.50.2")
check("NF4 table equals bitsandbytes' bit for bit", same_bits(qlora_ref.nf4_codebook(), bnbF.get_4bit_type("nf4", device="cpu")))
# FP4 equals value for value: our entry 8 is -0.0 where bitsandbytes' table has +0.0 (lesson 2 shows why).
check("FP4 table equals bitsandbytes' value for value", torch.equal(qlora_ref.fp4_codebook(), bnbF.get_4bit_type("fp4", device="cpu")))
check("8-bit dynamic map equals bitsandbytes' bit for bit", same_bits(qlora_ref.dynamic_map(), bnbF.create_dynamic_map(signed=True)))

weight = torch.randn(64, 100, generator=torch.Generator().manual_seed(0))  # 6,400 values, 100 blocks of 64
for double_quant in (False, True):
    packed, state = qlora_ref.quantize_4bit(weight, blocksize=64, quant_type="nf4", double_quant=double_quant)
    packed_bnb, state_bnb = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    label = "with" if double_quant else "without"
    check(f"NF4 quantize_4bit {label} double quantization: packed bytes equal bitsandbytes'", torch.equal(packed, packed_bnb))
    check(
        f"NF4 dequantize_4bit {label} double quantization: values equal bitsandbytes' bit for bit",
        same_bits(qlora_ref.dequantize_4bit(packed, state), bnbF.dequantize_4bit(packed_bnb, state_bnb)),
    )

# %% [markdown]
# ### bitsandbytes computes differently on different CPUs
#
# bitsandbytes' CPU backend picks its code by what the CPU can do (`qlora_ref/bnb_cpu.py` lists the paths, from
# bitsandbytes' own source). Quantizing is the same PyTorch code everywhere: the bytes above are equal on every
# machine. Dequantizing 4-bit codes has four paths: a scalar loop; a loop in AVX-512 instructions, which x86 CPUs
# that have them take when a row is a multiple of 16 values; a NEON loop on ARM; and a portable PyTorch version,
# taken for odd rows. They agree but for two things: the sign of FP4's zero (lesson 2), and a mistake in the
# AVX-512 loop, which reads each row's scales as if every row began a new block of 64. A weight whose rows are
# 96 or 160 values long then decodes with other blocks' scales. (The self-check above uses rows of 100 values,
# which every CPU decodes with the scalar loop.)
#
# Which path does each kind of CPU take?

# %%
from qlora_ref import bnb_cpu

CPUS = {  # what bitsandbytes' checks answer on three kinds of CPU
    "x86 with AVX-512": {"machine": "x86_64", "avx512f": True, "avx512bf16": True, "torch": "AVX512"},
    "x86 with AVX2": {"machine": "x86_64", "avx512f": False, "avx512bf16": False, "torch": "AVX2"},
    "ARM": {"machine": "aarch64", "avx512f": False, "avx512bf16": False, "torch": "DEFAULT"},
}
SHAPES = [(4096, 4096), (64, 100), (128, 160), (3, 333)]
print(f"{'weight':>12}" + "".join(f"{cpu:>20}" for cpu in CPUS))
for shape in SHAPES:
    paths = [bnb_cpu.dequantize_4bit_path(shape, 64, features) for features in CPUS.values()]
    wrong = [" (misread)" if path == "avx512" and bnb_cpu.avx512_reads_wrong_scales(shape, 64) else "" for path in paths]
    print(f"{str(shape):>12}" + "".join(f"{path + note:>20}" for path, note in zip(paths, wrong)))

# %% [markdown]
# So "bitsandbytes' values" depend on the CPU. Where a lesson compares dequantized values with bitsandbytes in a
# checked cell, it uses the portable path, `bnb_cpu.dequantize_4bit_portable`: bitsandbytes' own code, the same on
# every CPU. Where bitsandbytes' native decoder differs on your CPU, the lesson says so in a cell that the
# automatic checks ignore, like this one, which asks this machine:

# %%
# NBVAL_IGNORE_OUTPUT
features = bnb_cpu.cpu_features()
print(f"this CPU: {features['machine']}, AVX-512F {'yes' if features['avx512f'] else 'no'}, "
      f"AVX512-BF16 {'yes' if features['avx512bf16'] else 'no'}, torch's CPU capability {features['torch']}")
print(bnb_cpu.native_decoder_report(torch.randn(128, 96, generator=torch.Generator().manual_seed(0))))

# %% [markdown]
# One more thing bitsandbytes does by CPU: imported on a CPU with AVX512-BF16 (recent Xeons and EPYCs), it tries to
# fetch a faster CPU kernel from the Hugging Face hub through the `kernels` package, and logs a warning to stderr
# when it cannot. The course runs offline and does not install that package, so the attempt always fails; every
# lesson's first cell keeps that one logger quiet, so that nothing lands on stderr.
#
# ## 5. Troubleshooting
#
# The usual problems, each with its fix: a Colab notebook without a GPU runtime; a T4, which has no bfloat16
# arithmetic; an old runtime, whose Python or torch is too old for bitsandbytes 0.50.2; triton missing (it has
# Linux wheels only). `troubleshoot` turns a description of an environment into `[OK]` / `[--]` (works, with a
# limit) / `[FAIL]` lines. The torch versions it accepts are not typed in: they are read from bitsandbytes'
# own package metadata.

# %%
from importlib.metadata import requires

from packaging.requirements import Requirement

# bitsandbytes' own requirement on torch, from its installed metadata (e.g. "torch<3,>=2.4")
TORCH_FOR_BNB = next(r.specifier for r in map(Requirement, requires("bitsandbytes")) if r.name == "torch" and not r.marker)


def troubleshoot(python, torch_version, triton_version, gpu, in_colab):
    """[OK] / [--] / [FAIL] lines for an environment: python (major, minor), torch's and triton's version strings
    (triton None when it is not installed), gpu None or (name, (major, minor) compute capability), in_colab."""
    new_runtime = "use Colab's latest runtime" if in_colab else "upgrade it"
    lines = []
    ok = python >= (3, 11)
    fix = "" if ok else f": the course needs 3.11 or newer; {new_runtime}"
    lines.append(f"[{'OK' if ok else 'FAIL'}] python {python[0]}.{python[1]}{fix}")
    ok = TORCH_FOR_BNB.contains(torch_version.split("+")[0])  # "2.8.0+cu126": the local label is not a version
    fix = "" if ok else f": bitsandbytes 0.50.2 needs torch {TORCH_FOR_BNB}; {new_runtime}"
    lines.append(f"[{'OK' if ok else 'FAIL'}] torch {torch_version}{fix}")
    if gpu is None:
        fix = "Runtime → Change runtime type → T4 GPU" if in_colab else "every lesson runs on the CPU; with a GPU, lessons 5-8 also time and train on it"
        lines.append(f"[--] no CUDA GPU: {fix}")
    else:
        name, (major, minor) = gpu
        if (major, minor) >= (8, 0):
            lines.append(f"[OK] {name}, sm_{major}{minor}: native bfloat16, so compute_dtype is bfloat16")
        else:
            lines.append(f"[OK] {name}, sm_{major}{minor}: no native bfloat16 (it needs sm_80), so compute_dtype is float16")
    if triton_version is None:
        lines.append("[--] triton is not installed: lesson 5 needs it (pip install triton; Linux only: elsewhere use Colab)")
    else:
        where = "in the interpreter (TRITON_INTERPRET=1, section 3)" if gpu is None else f"compiled for sm_{gpu[1][0]}{gpu[1][1]}"
        lines.append(f"[OK] triton {triton_version}: kernels run {where}")
    return lines


print(f"bitsandbytes 0.50.2 requires torch {TORCH_FOR_BNB}")
T4 = ("Tesla T4", (7, 5))
EXAMPLES = {  # made-up environments, one per problem
    "Colab with a T4": dict(python=(3, 12), torch_version="2.8.0+cu126", triton_version="3.4.0", gpu=T4, in_colab=True),
    "Colab without a GPU runtime": dict(python=(3, 12), torch_version="2.8.0+cu126", triton_version="3.4.0", gpu=None, in_colab=True),
    "an old runtime": dict(python=(3, 10), torch_version="2.3.1+cu121", triton_version="2.3.1", gpu=T4, in_colab=True),
    "a laptop without triton": dict(python=(3, 11), torch_version="2.13.0", triton_version=None, gpu=None, in_colab=False),
    "an H100": dict(python=(3, 11), torch_version="2.13.0+cu130", triton_version="3.9.0", gpu=("NVIDIA H100 80GB HBM3", (9, 0)),
                    in_colab=False),
}
for label, environment in EXAMPLES.items():
    print(f"\n{label}:")
    for line in troubleshoot(**environment):
        print("  " + line)

# %% [markdown]
# And this machine (its output depends on the machine, so the automatic checks ignore it):

# %%
# NBVAL_IGNORE_OUTPUT
gpu = (torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)) if device.type == "cuda" else None
for line in troubleshoot(sys.version_info[:2], torch.__version__, triton.__version__ if triton else None, gpu, IN_COLAB):
    print(line)

# %% [markdown]
# ## 6. What each lesson needs
#
# Every lesson and solution was run top to bottom on a GPU under a T4's limits (`tools/gpu_lessons.py --t4`: the
# memory PyTorch may use capped at 14.75 GiB, bfloat16 refused, the kernels compiled ahead for sm_75) and checked
# against these very outputs. Per notebook, its time there and the most GPU memory PyTorch held (a card also
# needs the CUDA context, a few hundred MiB):

# %%
from qlora_ref.vram import GPUS

runs_on_t4 = sorted((Path("..") / "bench" / "results").glob("lessons-*-t4.json"))
if runs_on_t4:
    t4_run = json.loads(runs_on_t4[-1].read_text())
    print(f"{t4_run['device']} under a T4's limits, {t4_run['date']}, torch {t4_run['torch']}; kernels for sm_75: "
          + ("all compiled" if all(v.startswith("ok") for v in t4_run["compiled_for_sm75"].values()) else "SOME FAILED"))
    print(f"{'notebook':<40} {'result':<6} {'seconds':>8} {'peak GiB':>9}")
    for run in t4_run["runs"]:
        print(f"{run['notebook']:<40} {'pass' if run['passed'] else 'FAIL':<6} {run['seconds']:8.0f} "
              f"{run['peak_reserved_mib'] / 1024:9.2f}")
    print(f"largest peak: {max(r['peak_reserved_mib'] for r in t4_run['runs']) / 1024:.2f} GiB of a T4's "
          f"{GPUS['T4 (14.75 GiB)'] / 2**30}")
else:
    print("not measured yet: bench/results/ has no lessons-*-t4.json (python tools/gpu_lessons.py --t4 on a GPU)")

# %% [markdown]
# ## Summary
#
# - Install with `make lab` (or conda's `environment.yml`): both install the versions of `requirements.lock`; on
#   Colab open a lesson with its badge, pick a T4 runtime and run the first cell, which installs the course next
#   to Colab's torch.
# - One line picks the device (CUDA if there is one, else the CPU) and one the compute dtype: bfloat16,
#   except float16 on GPUs older than sm_80 such as the T4. Do not trust `is_bf16_supported()` alone.
# - Triton kernels run on a CPU through the interpreter, `TRITON_INTERPRET=1`.
# - `compare(name, ours, reference)` says exact / DIFFERENT, or close / DIFFERENT when given a tolerance; the
#   self-check above must be all `[OK]`.
# - bitsandbytes decodes 4-bit weights with other code on other CPUs, and its AVX-512 loop misreads the scales of
#   rows that are not whole blocks: the lessons check against its portable path, the same on every CPU.
# - `troubleshoot` names the usual problems (no GPU runtime, a T4 without bfloat16, an old Python or torch,
#   triton missing) and their fix.
#
# Along the way: [glossary.md](glossary.md) defines the course's terms (absmax, block, codebook, compute dtype,
# paged, GB vs GiB, ...), each with the lesson that teaches it; after lesson 12, [from_here.md](from_here.md)
# lists where to go next.

# %% [markdown]
# ## Check your understanding
#
# 1. Why does the version cell start with `# NBVAL_IGNORE_OUTPUT`, but the self-check cell does not?
#
# <details><summary>Answer</summary>
#
# The versions differ from machine to machine, so comparing them with the stored output would fail for
# reasons that are not bugs. The self-check prints the same `[OK]` lines on every machine, so a different
# line there is exactly the failure the automatic checks should catch.
#
# </details>
#
# 2. On a T4, `torch.cuda.is_bf16_supported()` returns True. What does it actually check, and which dtype
#    should a QLoRA run on a T4 compute in?
#
# <details><summary>Answer</summary>
#
# With its default `including_emulation=True` it only checks that a bfloat16 tensor can be created on the
# GPU, not that the GPU does bfloat16 arithmetic, which needs sm_80. A T4 is sm_75: compute in float16, as
# section 2's one line chooses from the compute capability.
#
# </details>

# %% [markdown]
# 3. Two float32 tensors of values near 1 differ by at most 2.4e-07. Is that a bug in our code? Which `rtol`
#    would you state, and why not claim exactness? (Hint: how far apart are neighbouring float32 numbers near 1?)
#
# <details><summary>Answer</summary>
#
# Probably not: neighbouring float32 numbers near 1 are 2^-23 apart (`torch.finfo(torch.float32).eps`), so
# 2.4e-07 is two such steps, what summing in another order gives. State a tolerance of a few steps, such as
# section 4's `rtol=1e-6`. Exactness would hold only for one order of operations, and the order changes
# with the CPU, the thread count and the BLAS library.
#
# </details>

# %% [markdown]
# 4. Your CPU has AVX-512 and bitsandbytes decodes a weight of shape (128, 160) differently from ours, from
#    the same bytes. Whose values are right, and how would you show it?
#
# <details><summary>Answer</summary>
#
# Ours. Rows of 160 values are not whole blocks of 64, and bitsandbytes' AVX-512 loop misreads the scales
# of such rows. Show it two ways: bitsandbytes' own portable path (`bnb_cpu.dequantize_4bit_portable`)
# decodes the same bytes to our values bit for bit, and against the original weight our error is the
# smaller one, as `bnb_cpu.native_decoder_report` (section 4) reports on a CPU that takes that path.
#
# </details>
#
# 5. Why can a Triton kernel be tested on a laptop without a GPU, and what does it cost?
#
# <details><summary>Answer</summary>
#
# With `TRITON_INTERPRET=1`, `@triton.jit` runs the same kernel code in Python with numpy, one program
# instance after another, on CPU tensors. It costs speed: the interpreter is far slower, so it suits small
# tests, and it says nothing about how fast the compiled kernel runs on a GPU.
#
# </details>
