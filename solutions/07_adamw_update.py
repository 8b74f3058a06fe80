# %% [markdown]
# # Exercises 7 — One AdamW step, in bitsandbytes' kernel order
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/exercises/07_adamw_update.ipynb)
#
# **What you will write**
# - `adamw_update`: one AdamW step on float32 tensors, in place: the two moments, the bias-corrected step and the
#   decoupled weight decay, in the order of bitsandbytes' CUDA kernel (the update inside its 8-bit AdamW,
#   between decoding the 8-bit moments and encoding them again).
#
# **Prerequisites:** lesson 7 (`notebooks/07_optimizers.ipynb`), section 3 "8-bit AdamW against bitsandbytes".
# The papers: Adam (Kingma & Ba 2014, arXiv:1412.6980), AdamW's decoupled weight decay (Loshchilov & Hutter 2017,
# arXiv:1711.05101), 8-bit optimizers (Dettmers et al. 2021, arXiv:2110.02861).
#
# In `exercises/` the function's body is replaced by `raise NotImplementedError(...)`: fill it in, then run the
# check. `check_adamw_update` runs five steps of three cases (chosen so that a misplaced weight decay or eps
# shows) against `qlora_ref.optim8bit.adamw_update_`, starting each step from the reference's state, and prints
# one line. `solutions/` holds the notebook solved.

# %%
import os
import sys

# Before importing torch: bitsandbytes would otherwise torch.compile its CPU code paths, which is slow.
os.environ["TORCH_COMPILE_DISABLE"] = "1"

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:  # clone the course and install it next to Colab's own torch (lesson 0, "Troubleshooting")
    import importlib
    import subprocess
    from importlib.metadata import version

    COURSE = "/content/qlora-course"
    if not os.path.isdir(COURSE):
        url = "https://github.com/OWNER/qlora-course"
        subprocess.run(["git", "clone", "--depth", "1", "--branch", "main", url, COURSE], check=True)
    # torch pinned to the version installed: pip keeps Colab's CUDA build instead of replacing it
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", COURSE, "bitsandbytes==0.50.2", f"torch=={version('torch')}"],
                   check=True)
    importlib.invalidate_caches()  # so that this running kernel finds the packages just installed
    os.chdir(f"{COURSE}/notebooks")  # the lessons run from notebooks/ (lesson 5 reads ../bench/results)

import math

import torch

from qlora_ref.checks import check_adamw_update
from qlora_ref.optim8bit import adamw_update_

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
compute_dtype = torch.float16 if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0) else torch.bfloat16
_ = torch.manual_seed(0)

# %% [markdown]
# ## 1. The step, per element
#
# At step t (counting from 1) with gradient g, the kernel computes, in this order:
#
#     v = beta2 · v + (1 - beta2) · g²
#     m = beta1 · m + (1 - beta1) · g
#     p = p + step_size · m / (sqrt(v) + eps · c2)        step_size = -lr · c2 / c1
#     p = p · (1 - lr · weight_decay)                     decoupled weight decay, after the step
#
# with the bias corrections c1 = 1 - beta1^t and c2 = sqrt(1 - beta2^t). This is Adam's
# p - lr · m̂ / (sqrt(v̂) + eps) with m̂ = m / c1 and v̂ = v / c2², rearranged so that the corrections become
# one scalar per step; eps is therefore multiplied by c2. `torch.optim.AdamW` decays *before* the step; the two
# orders differ by lr · weight_decay times the step, small but not zero. p, m and v are float32 here (the
# checker's tensors, on the CPU); update them in place and return nothing.

# %% [markdown]
# ## 2. Write it

# %%
def adamw_update(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """One AdamW step of p, m and v in place (float32), bitsandbytes' kernel order: moments, step, then decay."""
    ### BEGIN SOLUTION
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    c1 = 1 - beta1**step
    c2 = math.sqrt(1 - beta2**step)
    p.add_(m / (v.sqrt() + eps * c2), alpha=-lr * c2 / c1)
    p.mul_(1 - lr * weight_decay)
    ### END SOLUTION


# %%
ok = check_adamw_update(adamw_update)

# %% [markdown]
# ## 3. Your step on a small problem
#
# 200 steps of a least-squares fit (w = 40 weights, 256 samples) with your update, with
# `qlora_ref.optim8bit.adamw_update_` and with `torch.optim.AdamW` (which decays first), from the same start:

# %%
def fit(update, steps=200, lr=0.05, weight_decay=0.1):
    gen = torch.Generator().manual_seed(2)
    X, w_true = torch.randn(256, 40, generator=gen), torch.randn(40, generator=gen)
    y = X @ w_true
    w, m, v = torch.zeros(40), torch.zeros(40), torch.zeros(40)
    for step in range(1, steps + 1):
        g = 2 * X.t() @ (X @ w - y) / len(y)
        update(w, g, m, v, step, lr, 0.9, 0.999, 1e-8, weight_decay)
    return w, float(((X @ w - y) ** 2).mean())


def torch_adamw(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """One step of torch.optim.AdamW on the same p, m, v (its state: exp_avg = m, exp_avg_sq = v)."""
    param = torch.nn.Parameter(p)  # shares p's storage: the step updates p in place
    param.grad = g
    opt = torch.optim.AdamW([param], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, foreach=False)
    opt.state[param] = {"step": torch.tensor(float(step - 1)), "exp_avg": m, "exp_avg_sq": v}
    opt.step()


if ok:
    w_ref, loss_ref = fit(adamw_update_)
    for name, update in (("yours", adamw_update), ("torch.optim.AdamW", torch_adamw)):
        w, loss = fit(update)
        print(f"{name:18s}: loss {loss:.4f} (adamw_update_: {loss_ref:.4f}), "
              f"max |w - adamw_update_'s w| = {(w - w_ref).abs().max():.1e}")
else:
    print("run this cell after check_adamw_update prints OK")

# %% [markdown]
# ## 4. What the checker catches
#
# One step of `torch.optim.AdamW` (the function above, no code from you) is AdamW too, but it decays before the
# step. The checker's first case uses lr = 0.1 and weight_decay = 0.5, where the order shows at once:

# %%
_ = check_adamw_update(torch_adamw)

# %% [markdown]
# ## Summary
#
# - AdamW keeps two float32 moments per parameter (8 bytes, what the 8-bit optimizer compresses to about 2) and
#   updates each weight by about lr at most, whatever the gradient's scale.
# - The bias corrections fold into one step size, -lr · c2 / c1, and scale eps by c2.
# - Decoupled weight decay multiplies p by (1 - lr · weight_decay); bitsandbytes' kernel does it after the step,
#   `torch.optim.AdamW` before it: both are AdamW, and they differ by about lr · weight_decay times the step.
#
# **Questions**
# 1. At step 1 with m = v = 0, what is m / (sqrt(v) + eps · c2) times the step size, for any nonzero g?
# 2. Why does adding weight_decay · p to the gradient (Adam with L2) not give the same update as AdamW?
# 3. In `fit`, how large is the difference between your w and `torch.optim.AdamW`'s, and how does it scale with
#    weight_decay?
