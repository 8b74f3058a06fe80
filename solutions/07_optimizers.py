# %% [markdown]
# # Exercises 7 — Optimizers: one AdamW step, and the pager behind paged optimizers
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/qlora-course/blob/main/solutions/07_optimizers.ipynb)
#
# **What you will write**
# - `adamw_update`: one AdamW step on float32 tensors, in place: the two moments, the bias-corrected step and the
#   decoupled weight decay, in the order of bitsandbytes' CUDA kernel (the update inside its 8-bit AdamW,
#   between decoding the 8-bit moments and encoding them again);
# - `LRUPager.add` and `LRUPager.fetch`: the bookkeeping of a paged optimizer's pager. Pages of optimizer state
#   come to the device under a byte budget, and the least recently used ones are evicted to make room.
#
# **Prerequisites:** lesson 7 (`notebooks/07_optimizers.ipynb`), sections 3 "8-bit AdamW against bitsandbytes"
# and 4 "Paging". The papers: Adam (Kingma & Ba 2014, arXiv:1412.6980), AdamW's decoupled weight decay
# (Loshchilov & Hutter 2017, arXiv:1711.05101), 8-bit optimizers (Dettmers et al. 2021, arXiv:2110.02861), paged
# optimizers (QLoRA, Dettmers et al. 2023, arXiv:2305.14314, section 3).
#
# In `exercises/` the body of each function is replaced by `raise NotImplementedError(...)`: fill it in, then run
# the check below it. `check_adamw_update` runs five steps of three cases (chosen so that a misplaced weight decay
# or eps shows) against `qlora_ref.adamw_step.adamw_update_`; `check_pager` replays sequences of fetches on your
# pager and on `qlora_ref.pager.Pager` and compares every page move. Each prints one line. `solutions/` holds
# the notebook solved.

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

import math
from collections import OrderedDict

import torch

from graders.lesson07 import check_adamw_update, check_pager
from qlora_ref.adamw_step import adamw_update_
from qlora_ref.optim8bit import predicted_state_bytes
from qlora_ref.paging import PagedAdamW8bit
from qlora_ref.spike import spike_model

# Lesson 0's device and compute dtype (float16 on a T4), for your own experiments; the checks run on the CPU.
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
adamw_ok = check_adamw_update(adamw_update)

# %% [markdown]
# ## 3. Your step on a small problem
#
# 200 steps of a least-squares fit (w = 40 weights, 256 samples) with your update, with
# `qlora_ref.adamw_step.adamw_update_` and with `torch.optim.AdamW` (which decays first), from the same start:

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


if adamw_ok:
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
# ## 5. A pager for optimizer states
#
# Each parameter's optimizer state is used once per step, in its update. A paged optimizer keeps the states in
# host memory and brings each one to the GPU just before its update; `qlora_ref.pager.Pager` (lesson 7,
# section 4) does it under an explicit byte budget. Its heart is bookkeeping: which pages are on the device, in
# which order they were last used, and which must leave so that the next one fits. You write that part (the
# `Pager` also copies the tensors, which changes none of the decisions):
#
# - a *page* has a name and a size in bytes; the pages on the device (*resident*) add up to at most
#   `budget_bytes`;
# - `fetch(name)` of a resident page is a *hit*: no bytes move, nothing is recorded, and the page becomes the
#   most recently used;
# - otherwise, while `resident_bytes + nbytes > budget_bytes`, the *least recently used* resident page is
#   evicted (copied home, its device bytes freed); then the page comes in, as the most recently used;
# - each move is recorded in `events`, in order: `("out", page, resident bytes after)` or
#   `("in", page, resident bytes after)`;
# - `add(name, nbytes)` registers a page, in host memory (not resident). A page larger than the whole budget
#   could never come in, so `add` refuses it with a `ValueError`; a page of exactly the budget fits once every
#   other page is out, and so does a page of 0 bytes.
#
# `collections.OrderedDict` keeps its keys in order and has the two operations LRU needs:
# `move_to_end(key)` (now the most recent) and `popitem(last=False)` (remove the oldest).
#
# `check_pager` replays five sequences of fetches (one by hand, four seeded, budgets from 64 to 4,099 bytes,
# with pages of 0 bytes and of the whole budget) on your class and on `qlora_ref.pager.Pager`, compares the
# events fetch by fetch, and prints one line: the first fetch whose events differ, what was on the device,
# expected against got, and a hint.

# %% [markdown]
# ## 6. Write it

# %%
class LRUPager:
    """Pages (a name, a size in bytes) that move between host memory and a device holding at most budget_bytes."""

    def __init__(self, budget_bytes):
        self.budget_bytes = budget_bytes
        self.page_bytes = {}  # every page: name -> its size in bytes
        self.resident = OrderedDict()  # the pages on the device, name -> bytes, least recently used first
        self.resident_bytes = 0
        self.events = []  # ("in" | "out", name, resident_bytes after the move), one per move

    def add(self, name, nbytes):
        """Register a page of nbytes, in host memory; refuse (ValueError) one larger than the whole budget."""
        ### BEGIN SOLUTION
        if nbytes > self.budget_bytes:
            raise ValueError(f"page {name!r} needs {nbytes:,} bytes, more than the whole budget of "
                             f"{self.budget_bytes:,}: it could never be on the device")
        self.page_bytes[name] = nbytes
        ### END SOLUTION

    def fetch(self, name):
        """Put page `name` on the device as the most recently used, evicting least recently used pages to fit."""
        ### BEGIN SOLUTION
        if name in self.resident:  # a hit: nothing moves
            self.resident.move_to_end(name)
            return
        nbytes = self.page_bytes[name]
        while self.resident_bytes + nbytes > self.budget_bytes:
            victim, victim_bytes = self.resident.popitem(last=False)
            self.resident_bytes -= victim_bytes
            self.events.append(("out", victim, self.resident_bytes))
        self.resident[name] = nbytes
        self.resident_bytes += nbytes
        self.events.append(("in", name, self.resident_bytes))
        ### END SOLUTION


# %%
pager_ok = check_pager(LRUPager)

# %% [markdown]
# ## 7. Your pager on a paged optimizer's traffic
#
# `PagedAdamW8bit(paging="pager")` fetches each parameter's page just before that parameter's update, so one
# step fetches every page once, always in the same order. Three steps of lesson 7's small MLP (8 parameters, so 8
# pages), with a budget that holds all the states and with one that holds half of them; then the same fetches
# replayed on your pager:

# %%
def paged_steps(budget_bytes, steps=3):
    """The page sizes and the pager's events of `steps` training steps of PagedAdamW8bit under budget_bytes."""
    model = spike_model()
    optimizer = PagedAdamW8bit(model.named_parameters(), lr=1e-2, paging="pager", budget_bytes=budget_bytes)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = torch.randn(16, 64, generator=gen), torch.randn(16, 16, generator=gen)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    return optimizer.pager.pages, [(e.direction, e.page, e.resident_after) for e in optimizer.pager.events]


if pager_ok:
    states = predicted_state_bytes(spike_model().parameters())
    for budget in (states, states // 2):
        pages, optimizer_events = paged_steps(budget)
        yours = LRUPager(budget)
        for name, nbytes in pages.items():
            yours.add(name, nbytes)
        for _ in range(3):
            for name in pages:
                yours.fetch(name)
        ins = sum(event[0] == "in" for event in yours.events)
        print(f"budget {budget:,} bytes ({budget / states:.0%} of the states): of {3 * len(pages)} fetches, {ins} "
              f"brought the page from host memory, {len(yours.events) - ins} pages evicted; at most "
              f"{max(event[2] for event in yours.events):,} bytes on the device; "
              f"your events equal the optimizer's pager's: {yours.events == optimizer_events}")
else:
    print("run this cell after check_pager prints OK")

# %% [markdown]
# With room for every state, only the first step moves pages. With room for half, *every* fetch misses: in a
# cyclic order, the page needed next is always the one used longest ago, which LRU has just evicted. A cycle
# longer than the cache is LRU's worst case. The budget holds, but each step copies every page in and most of
# them out again. A pager's budget should therefore hold every page in an ordinary step, so that only a memory
# spike costs copies (lesson 7's `simulate_spike`).

# %% [markdown]
# ## Summary
#
# - AdamW keeps two float32 moments per parameter (8 bytes, what the 8-bit optimizer compresses to about 2) and
#   updates each weight by about lr at most, whatever the gradient's scale.
# - The bias corrections fold into one step size, -lr · c2 / c1, and scale eps by c2.
# - Decoupled weight decay multiplies p by (1 - lr · weight_decay); bitsandbytes' kernel does it after the step,
#   `torch.optim.AdamW` before it: both are AdamW, and they differ by about lr · weight_decay times the step.
# - A pager keeps the resident pages within a byte budget: a hit moves nothing, a miss evicts least recently used
#   pages until the new one fits, and a page larger than the budget is refused when it is added.
#
# **Questions**
# 1. At step 1 with m = v = 0, what is m / (sqrt(v) + eps · c2) times the step size, for any nonzero g?
# 2. Why does adding weight_decay · p to the gradient (Adam with L2) not give the same update as AdamW?
# 3. In `fit`, how large is the difference between your w and `torch.optim.AdamW`'s, and how does it scale with
#    weight_decay?
# 4. In section 7, with room for half of the states, every fetch misses. Which page would you evict instead, for
#    this cyclic order, so that some fetches hit? Why can a pager not know that in general?
# 5. Why does `add` refuse a page larger than the budget instead of letting `fetch` evict everything and fail?
