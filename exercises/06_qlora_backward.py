# %% [markdown]
# # Exercises 6 — The backward of the QLoRA layer
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/exercises/06_qlora_backward.ipynb)
#
# **What you will write**
# - `qlora_backward`: given dL/dy, the frozen base weight as NF4 codes and its `QuantState`, the input x, the
#   adapters A and B and the scaling s = alpha/r, return dL/dx, dL/dA and dL/dB: the backward of QLoRA's
#   custom autograd function, which dequantizes W0 again instead of keeping a dense copy.
#
# **Prerequisites:** lesson 6 (`notebooks/06_lora_qlora.ipynb`), sections on the layer and its gradients, and
# PyTorch autograd. The papers: LoRA (Hu et al. 2021, arXiv:2106.09685) and QLoRA (Dettmers et al. 2023,
# arXiv:2305.14314), section 3.
#
# In `exercises/` the function's body is replaced by `raise NotImplementedError(...)`: fill it in, then run the
# check. `check_qlora_backward` compares your three gradients with autograd through the dense layer on three
# inputs (x of shapes [7, 48], [2, 5, 64] and [3, 1, 2, 20], float32 on the CPU, within 1e-5) and prints one
# line. `solutions/` holds the notebook solved.

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

from qlora_ref import QLoRALinear, dequantize_4bit, quantize_4bit
from graders.lesson06 import check_qlora_backward
from qlora_ref.lora import LoRAMatmul

# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; the checks run on the CPU.
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16
_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. The layer and its gradients
#
# With W0 [out, in] frozen and stored as 4-bit codes, A [r, in], B [out, r] and s = alpha/r, the layer computes
# (no dropout here)
#
#     y = x W0^T + s · (x A^T) B^T
#
# For a loss L with g = dL/dy (g has y's shape [..., out]):
#
#     dL/dx = g W0 + s · (g B) A                  x's shape [..., in]
#     dL/dA = s · (g B)^T x                       [r, in]
#     dL/dB = s · g^T (x A^T)                     [out, r]
#
# x may have any number of leading dimensions (batch, sequence): dL/dA and dL/dB sum over all of them, so
# flatten x and g to [tokens, features] first. W0 gets no gradient: it is frozen, and only its codes exist.
# The checker runs everything in float32 on the CPU, whatever `device` says. A layer's shapes:

# %%
W0 = torch.randn(40, 48, generator=torch.Generator().manual_seed(0)) * 0.1
packed, state = quantize_4bit(W0, blocksize=64, double_quant=True)
print(f"packed codes {tuple(packed.shape)} {packed.dtype}; the state restores W0^ of shape {tuple(state.shape)}")
print(f"dequantize_4bit(packed, state): {tuple(dequantize_4bit(packed, state).shape)} {dequantize_4bit(packed, state).dtype}")

# %% [markdown]
# ## 2. The backward
#
# Dequantize W0^ with `dequantize_4bit(packed, state)` (a temporary: it is freed when the function returns),
# then apply the three formulas. Compute g B once: both dL/dx and dL/dA use it, and it is small ([tokens, r]).

# %%
def qlora_backward(grad_out, packed, state, x, A, B, scaling):
    """(dL/dx, dL/dA, dL/dB) for y = x W0^T + scaling · x A^T B^T, W0 = dequantize_4bit(packed, state) frozen."""
    # YOUR CODE HERE
    raise NotImplementedError("fill in the TODO in qlora_backward")
    return grad_x, grad_A, grad_B


# %%
ok = check_qlora_backward(qlora_backward)

# %% [markdown]
# ## 3. Your backward inside autograd
#
# A `torch.autograd.Function` saves what its backward needs (the codes, x, A, B; never the dense W0^) and hands
# g to your function. One training step of a `QLoRALinear` with your backward against the layer's own
# (`qlora_ref.lora.LoRAMatmul`), from the same start; B is set to random values so that dL/dA is not zero:

# %%
class MyQLoRAMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, packed, state, A, B, scaling):
        ctx.state, ctx.scaling = state, scaling
        ctx.save_for_backward(packed, x, A, B)
        return x @ dequantize_4bit(packed, state).t() + scaling * (x @ A.t()) @ B.t()

    @staticmethod
    def backward(ctx, grad_out):
        packed, x, A, B = ctx.saved_tensors
        grad_x, grad_A, grad_B = qlora_backward(grad_out, packed, ctx.state, x, A, B, ctx.scaling)
        return grad_x, None, None, grad_A, grad_B, None


def one_step(layer, x, target, mine):
    """The gradients of the adapters and of x after one mean-squared-error backward."""
    x = x.clone().requires_grad_(True)
    base = (layer.weight_packed, layer.quant_state())
    A, B = layer.lora_A.weight, layer.lora_B.weight
    if mine:
        y = MyQLoRAMatmul.apply(x, *base, A, B, layer.scaling)
    else:
        y = LoRAMatmul.apply(x, None, base, None, A, B, layer.scaling)
    torch.nn.functional.mse_loss(y, target).backward()
    grads = (x.grad, A.grad.clone(), B.grad.clone())
    layer.zero_grad()
    return grads


if ok:
    gen = torch.Generator().manual_seed(1)
    layer = QLoRALinear(torch.nn.Linear(64, 32, bias=False), r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(32, 8, generator=gen) * 0.1)
    x, target = torch.randn(4, 6, 64, generator=gen), torch.randn(4, 6, 32, generator=gen)
    for name, mine, ref in zip(("dL/dx", "dL/dA", "dL/dB"), one_step(layer, x, target, True),
                               one_step(layer, x, target, False)):
        agree = torch.allclose(mine, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        print(f"{name} {tuple(mine.shape)}: {'the same as' if agree else 'DIFFERENT from'} LoRAMatmul's within 1e-5 "
              f"(values up to {ref.abs().max():.3f})")
else:
    print("run this cell after check_qlora_backward prints OK")

# %% [markdown]
# ## 4. What the checker catches
#
# Forgetting the scaling s on the adapters' gradients is the usual slip: the loss still goes down, only with the
# learning rate silently multiplied by 1/s. This backward takes the right gradients from autograd through
# `LoRAMatmul` (no code from you) and then drops s from dL/dA:

# %%
def backward_without_scaling(grad_out, packed, state, x, A, B, scaling):
    x, A, B = (t.clone().requires_grad_(True) for t in (x, A, B))
    LoRAMatmul.apply(x, None, (packed, state), None, A, B, scaling).backward(grad_out)
    return x.grad, A.grad / scaling, B.grad


_ = check_qlora_backward(backward_without_scaling)

# %% [markdown]
# ## Summary
#
# - The backward of a QLoRA layer needs W0 again (dL/dx = g W0 + s (g B) A): it dequantizes the codes a second
#   time instead of saving a dense copy in the forward, which is where QLoRA's memory saving comes from.
# - The adapters' gradients are two small products through g B [tokens, r], summed over every token; W0 gets none.
# - The scaling s = alpha/r multiplies all of the adapters' path, in the forward and in each gradient.
#
# **Questions**
# 1. Why does `backward_without_scaling` still train, and how would you notice the mistake in a training run?
# 2. With B = 0 (LoRA's initialisation), what are dL/dA and dL/dB at the first step, and why does training start?
# 3. How many bytes would saving W0^ in float32 for the backward cost for a 4096 × 4096 layer, against the codes?
