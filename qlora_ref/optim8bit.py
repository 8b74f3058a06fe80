"""Lesson 7: 8-bit AdamW, bitsandbytes' `AdamW8bit`: Adam's two moments stored in one byte each.

Memory per parameter
--------------------
fp32 Adam keeps two float32 moments per parameter, m and v: 8 bytes. 8-bit Adam stores each moment as
8-bit codes, blockwise (lesson 4's recipe): one byte per value plus one float32 absmax per block of B,

    bytes per parameter = 2 * (1 + 4 / B) = 2 + 8 / B        2.03125 at B = 256, a quarter of 8.

m takes the signed dynamic map, v (never negative) the unsigned one, which spends all 256 levels on
[0, 1]. Tensors with fewer than `min_8bit_size` (4096) values keep float32 moments: for them the
saving is small and the quantization error not worth it. `predicted_state_bytes` counts this,
`optimizer_state_bytes` measures what an optimizer actually holds.

One step, per element (bitsandbytes' CUDA kernel kOptimizerStatic8bit2StateBlockwise, in its order)
--------------------------------------------------------------------------------------------------
    m, v  = code1[q1] * absmax1, code2[q2] * absmax2          decode the stored moments
    v     = beta2 * v + (1 - beta2) * g^2
    m     = beta1 * m + (1 - beta1) * g
    p     = p - lr * c2 / c1 * m / (sqrt(v) + c2 * eps)       c1 = 1 - beta1^t, c2 = sqrt(1 - beta2^t)
    p     = p * (1 - lr * weight_decay)                       decoupled weight decay, after the step
    absmax1, q1 = max |m| per block, nearest code of m / absmax1  (likewise v); the new absmax is
                                                               the new moments' own maximum
A NaN or Inf gradient element leaves its parameter alone and sets its m and v to 0: one NaN would
otherwise make its block's absmax NaN and take all 256 moments of the block with it. (bitsandbytes'
32-bit kernel, used below min_8bit_size, has no such rule: a NaN there stays in its element; so here.)
`adamw_update_` is this step on float32 moments; the optimizer wraps it in decode and re-encode.

Where bitsandbytes 0.50.2's CPU path differs (read in backends/cpu/ops.py; our choice in brackets)
  * Weight decay first, p * (1 - lr * wd) before the step [the kernel's order: after].
  * The 8-bit step is grouped p - (lr / c1) * m / (sqrt(v) / c2 + eps): the same number, rounded
    differently in float32 [the kernel's grouping; its 32-bit CPU path groups as we do]. Parameters
    then differ from bitsandbytes' CPU ones by a float32 rounding or two; the moments' bytes are equal.
  * NaN/Inf gradients are not skipped: they spread through the block [skipped, as on the GPU].
  * Re-encoding rounds through a 65536-point table, qlora_ref's rounding="lut" [the same on a CPU].
    The table's grid has no point at 0: a zero moment is stored as the level nearest 1/65535, i.e.
    2.1e-5 * absmax for m and 1.6e-5 * absmax for v (the kernel's search keeps it 0).
On a GPU the kernel searches the sorted code (a binary search, kernels/cuda_semantics.py) and then
nudges a code of m whose level has the wrong sign one step towards the value's sign. Scalars such as
1 - beta2 are rounded as each path rounds them: float64 then float32 on the CPU (Python floats), float32
throughout in the kernel, whose fused multiply-adds for m and v we also reproduce (read in its sm_90
machine code; p's update is one fma too). So the moments' bytes equal bitsandbytes' on either device;
the parameters differ by float32 roundings (the kernel's beta^t, square root and division are fast
approximations), measured at 2e-6 after 100 steps (tests/test_optim8bit_gpu.py).

Two implementations of the 8-bit step (`backend`, qlora_ref's usual rule: "auto" is "triton" for CUDA
parameters when triton is installed, "torch" otherwise):
  * "torch": `adamw8bit_update_`, the readable one above in PyTorch: decode, `adamw_update_`, encode,
    over a hundred small kernels per parameter on a GPU (launch-bound: about 1.4 s per step for 448
    LoRA tensors on an H100). On a CPU it gives bitsandbytes' CPU bytes, on a GPU its CUDA bytes.
  * "triton": qlora_ref.kernels.adamw_8bit, the same step in one kernel launch per parameter, as
    bitsandbytes' own kernel does it (27 ms per step for those 448 tensors, bitsandbytes 24 ms): its
    CUDA bytes. On CPU tensors it runs in Triton's interpreter, equal to `adamw8bit_update_(kernel=True)`
    byte for byte; on a GPU its moments equal bitsandbytes' and so "torch"'s (tests/test_optim8bit_gpu.py).

API for subclasses (qlora_ref.paging.PagedAdamW8bit)
----------------------------------------------------
    step(): for every parameter p with a gradient, in param_groups order:
        state = self._state_for(p)        # self.state[p]; made by self._new_state(p) on first use
        self._before_update(p, state)     # no-op here (a paged subclass prefetches the state)
        ...the update of p and its state, in place (by `backend`; the tensors stay where they are)...
        self._after_update(p, state)      # no-op here
    _new_state(p) -> dict: {"step": 0, "state1": m, "state2": v}, plus "absmax1", "absmax2" for 8-bit
        moments (bitsandbytes' key names), laid out as _state_layout(p) says. Every tensor comes from
        self._allocate(shape, dtype, device), which must return a zero-filled tensor (zero codes with a
        zero absmax decode to m = v = 0):
          p.numel() >= min_8bit_size: state1, state2: uint8 codes of p.shape; absmax1, absmax2:
                                      float32 [ceil(n / blocksize)]
          otherwise:                  state1, state2: float32 of p.shape
        load_state_dict and load_optimizer_state_tensors first check every saved state against
        _state_layout (and the hyperparameters against their ranges), then go through
        self._load_state(p, saved), which makes a new state with _new_state (so through _allocate) and
        copies the saved tensors into it.
    _allocate(shape, dtype, device) -> torch.zeros(shape, dtype=dtype, device=device); override it to
        place the states elsewhere (managed / paged memory).

Inside the backward pass (`step_in_backward`): the same update per parameter, run by a hook as soon as
backward has completed its gradient, which is then freed, so the gradients never all exist at once (lesson
9 measures it). Captured in a CUDA graph (qlora_ref.cuda_graph.CapturedStep): the Triton update reads its
per-step numbers from a table on the GPU (`prepare_capture`, `begin_graph_step`, `end_graph_step`).
"""

import functools
import math
import struct
import weakref
from collections.abc import Mapping
from itertools import chain
from numbers import Real
from types import MappingProxyType

import torch

from .cuda_graph import is_capturing
from .dynamic8bit import dequantize_blockwise, quantize_blockwise, resolve_backend, shared_dynamic_map
from .kernels import cuda_semantics
from .state import QuantState
from .validation import FLOAT_DTYPES, check_blocksize

__all__ = [
    "AdamW8bit",
    "adamw8bit_update_",
    "adamw_update_",
    "bytes_per_parameter",
    "check_optimizer_state_tensors",
    "load_optimizer_state_tensors",
    "optimizer_state_bytes",
    "optimizer_state_tensors",
    "predicted_state_bytes",
    "step_scalars",
]


def _float32(x: float) -> float:
    """x rounded to the nearest float32 (struct packs a C float; no tensor, as this runs every step)."""
    return struct.unpack("f", struct.pack("f", x))[0]


@functools.lru_cache(maxsize=1024)  # every parameter of a step asks for the same ones
def step_scalars(step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 kernel: bool) -> Mapping:
    """The per-step scalars of `adamw_update_`, rounded as bitsandbytes rounds them (a read-only mapping).

    kernel=False: its CPU path, Python float64 (torch rounds each to float32 where it is applied).
    kernel=True: its CUDA kernel, float32 throughout (betas, lr and eps arrive as float32), e.g.
    1 - beta2 = 1 - 0.99900001f = 0.00099998713 instead of 0.001; 1 - lr * wd is one fused
    multiply-add there (the float64 product of two float32 numbers is exact, so rounding once is the
    same). The kernel's beta^t and square root are approximations (MUFU.LG2/EX2/SQRT, --use_fast_math);
    these are the correctly rounded values.
    """
    f = _float32 if kernel else float
    beta1, beta2, lr, eps, weight_decay = f(beta1), f(beta2), f(lr), f(eps), f(weight_decay)
    c1 = f(1.0 - f(beta1**step))
    c2 = f(math.sqrt(f(1.0 - f(beta2**step))))
    return MappingProxyType(dict(beta1=beta1, beta2=beta2, one_minus_beta1=f(1.0 - beta1),
                                 one_minus_beta2=f(1.0 - beta2), step_size=f(f(-lr * c2) / c1), eps_c2=f(c2 * eps),
                                 decay=f(1.0 - lr * weight_decay)))


@torch.no_grad()
def adamw_update_(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, skip_nonfinite=False):
    """One AdamW step of `param` (in place) with float32 moments m, v (updated in place).

        v = beta2 * v + (1 - beta2) * g^2
        m = beta1 * m + (1 - beta1) * g
        p = p + step_size * m / (sqrt(v) + eps * c2)     step_size = -lr * c2 / c1
        p = p * (1 - lr * weight_decay)                   only when weight_decay > 0
    with c1 = 1 - beta1^step, c2 = sqrt(1 - beta2^step) (bias corrections folded into the step size),
    in float32 whatever param's dtype, written back once. skip_nonfinite: where g is NaN or +-Inf,
    m = v = 0 and p is left as it was (the 8-bit kernel's rule). Scalars are rounded as bitsandbytes'
    kernel does for CUDA tensors, as its CPU path does otherwise (step_scalars).
    """
    _adamw_update_(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, skip_nonfinite, param.is_cuda)


def _adamw_update_(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, skip_nonfinite, kernel: bool):
    """adamw_update_ rounded as bitsandbytes' CUDA kernel (kernel=True: its float32 scalars and fused
    multiply-adds, IEEE square root and division) or as its CPU path (False), on any device."""
    s = step_scalars(step, lr, beta1, beta2, eps, weight_decay, kernel=kernel)
    g = grad.float()
    finite = torch.isfinite(g) if skip_nonfinite else None
    if finite is not None:
        g = torch.where(finite, g, 0.0)
    if kernel:  # the kernel's fmas, read in its sm_90 machine code (fl: one float32 rounding)
        scaled = g * s["one_minus_beta2"]
        if grad.dtype == torch.float32:
            v.copy_(_fma(g, scaled, v * s["beta2"]))  # fma(g, fl((1 - beta2) g), fl(beta2 v))
        else:
            v.copy_(_fma(v, s["beta2"], g * scaled))  # fma(v, beta2, fl(g fl((1 - beta2) g)))
        m.copy_(_fma(g, s["one_minus_beta1"], m * s["beta1"]))  # fma(g, 1 - beta1, fl(beta1 m))
    else:
        v.mul_(beta2).addcmul_(g, g, value=s["one_minus_beta2"])
        m.mul_(beta1).add_(g, alpha=s["one_minus_beta1"])
    p = param.detach().to(torch.float32, copy=True)
    if kernel:  # IEEE float32 sqrt and division: through float64, which rounds them correctly once back in
        # float32 (53 >= 2 * 24 + 2 bits); torch's own float32 sqrt on a CPU can be an ulp off
        update = (m.double() / (v.double().sqrt().float() + s["eps_c2"]).double()).float()
        p = _fma(update, s["step_size"], p)
    else:
        p.add_(m / v.sqrt().add_(s["eps_c2"]), alpha=s["step_size"])
    if weight_decay > 0:
        p.mul_(s["decay"])
    if finite is not None:
        m.masked_fill_(~finite, 0.0)
        v.masked_fill_(~finite, 0.0)
        p = torch.where(finite, p, param)
    param.copy_(p)


def _fma(a: torch.Tensor, b, c: torch.Tensor) -> torch.Tensor:
    """a * b + c in float32 rounded once, as a fused multiply-add instruction (b: a tensor or a float32 number).

    The product of two float32 numbers is exact in float64. Their sum is not always: rounding it to
    float64 and then to float32 would round twice, and differ from the fma where the float64 sum lands
    exactly halfway between two float32 numbers. So the sum is rounded to odd instead: TwoSum gives the
    float64 sum and its exact remainder; where the remainder is not 0 and the sum's last bit is 0, the
    sum steps one float64 ulp towards the remainder. Rounding that to float32 is the correct rounding of
    the exact a * b + c (24 + 2 <= 53 bits, Boldo and Melquiond, "Emulation of FMA and correctly rounded
    sums: proved algorithms using rounding to odd", 2008).
    """
    product = a.double() * (b.double() if isinstance(b, torch.Tensor) else b)
    addend = c.double()
    total = product + addend
    addend_part = total - product  # TwoSum (Knuth): remainder = product + addend - total, exactly
    remainder = (product - (total - addend_part)) + (addend - addend_part)
    even = (total.view(torch.int64) & 1) == 0
    towards = torch.where(remainder > 0, math.inf, -math.inf).to(total.dtype)
    total = torch.where((remainder != 0) & even, torch.nextafter(total, towards), total)
    return total.float()


@torch.no_grad()
def adamw8bit_update_(param, grad, state: dict, step, lr, beta1, beta2, eps, weight_decay, blocksize: int = 256,
                      kernel=None) -> None:
    """One AdamW step of `param` with 8-bit moments, in PyTorch; param and state updated in place.

    state holds m as codes state1 (uint8, param's shape) with absmax1 (float32, one per block of
    `blocksize`), v likewise as state2 and absmax2 (AdamW8bit's state). The step:
        m, v = code1[state1] * absmax1, code2[state2] * absmax2      decode (signed / unsigned dynamic map)
        adamw_update_(param, grad, m, v, ..., skip_nonfinite=True)
        absmax1, state1 = max |m| per block, the code of m / absmax1  (likewise v): encode
    kernel=True: bitsandbytes' CUDA kernel's bytes, on any device: its binary search over the code and
    its sign nudge (cuda_semantics; on a CPU the reciprocal is the correctly rounded model of the GPU's).
    kernel=False: its CPU path's bytes (the 65536-point table). None: True for CUDA tensors.
    """
    kernel = param.is_cuda if kernel is None else kernel
    m = _decode(state["state1"], state["absmax1"], True, blocksize, kernel)
    v = _decode(state["state2"], state["absmax2"], False, blocksize, kernel)
    _adamw_update_(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, True, kernel)
    for name, values, signed in (("1", m, True), ("2", v, False)):
        codes, absmax = _encode(values, signed, blocksize, kernel)
        state["state" + name].copy_(codes)
        state["absmax" + name].copy_(absmax)


def _decode(codes, absmax, signed: bool, blocksize: int, kernel: bool) -> torch.Tensor:
    state = QuantState(absmax=absmax, shape=codes.shape, code=shared_dynamic_map(signed, codes.device),
                       dtype=torch.float32, blocksize=blocksize)
    if kernel:  # ftz(code[q] * absmax): the kernel flushes denormal products
        return cuda_semantics.dequantize_blockwise(codes, state)
    return dequantize_blockwise(codes, state, backend="torch")


def _encode(values, signed: bool, blocksize: int, kernel: bool):
    """Codes and absmax of a moment: bitsandbytes' CPU rounding (kernel=False) or its CUDA search.

    The CUDA kernel then moves a code of m whose level has the other sign bit than m one step towards
    m's sign: a small negative m that rounds to the level 0.0 gets the smallest negative level.
    """
    code = shared_dynamic_map(signed, values.device)
    if not kernel:
        codes, qstate = quantize_blockwise(values, code, blocksize, backend="torch")
        return codes, qstate.absmax
    codes, absmax = cuda_semantics.quantize_blockwise_codes(values, code, blocksize)
    if signed:
        wrong_sign = torch.signbit(code[codes.long()]) != torch.signbit(values)
        nudged = (codes.to(torch.int16) + torch.where(values > 0, 1, -1)) & 0xFF
        codes = torch.where(wrong_sign, nudged, codes.to(torch.int16)).to(torch.uint8)
    return codes, absmax


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise moments, bitsandbytes' `bnb.optim.AdamW8bit` (see the module docstring).

    Same defaults as bitsandbytes; `blocksize` is fixed at 256 there, any of qlora_ref's block sizes here.
    Parameters: float32, float16 or bfloat16; gradients dense. backend: how the 8-bit step runs, "auto"
    (the Triton kernel for CUDA parameters when triton is installed, else PyTorch), "torch" or "triton".
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, blocksize=256,
                 min_8bit_size=4096, backend="auto"):
        _check_hyperparameters(lr, betas, eps, weight_decay)
        check_blocksize(blocksize)
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be a non-negative int, got {min_8bit_size!r}")
        resolve_backend(backend, None)  # a ValueError for an unknown name, an ImportError for triton without it
        self.blocksize = blocksize
        self.min_8bit_size = min_8bit_size
        self.backend = backend
        self._step_open = False  # between the first update of a step and the end of step()
        self._graph_scalars = None  # the per-step numbers of a captured CUDA graph (prepare_capture)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        for p in group["params"]:
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(f"AdamW8bit updates float32, float16 or bfloat16 parameters (as bitsandbytes' "
                                f"kernels do); got a {p.dtype} parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._open_step()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        self._step_open = False
        self._after_step()
        return loss

    def step_in_backward(self) -> list:
        """Update each parameter inside the backward pass, as soon as its gradient is complete, and free it.

        Registers a post-accumulate-grad hook on every parameter: when backward has finished a
        parameter's gradient, the hook runs the same update `step()` would run later and sets
        `p.grad = None`. The numbers are those of backward-then-step (each parameter's update reads only
        its own gradient and state), but the gradients never all exist at once: the peak of a step no
        longer holds one gradient per trainable parameter. `step()` is still called after backward; it
        updates what has a gradient left (nothing, normally) and closes the step.
        Not for gradient clipping by the global norm or for gradient accumulation, which need every
        gradient before any update. Returns the hooks' handles (`handle.remove()` undoes this).
        """
        self._index_parameters()
        optimizer = weakref.ref(self)  # a strong one would make a cycle through the parameters that gc cannot see

        def hook(p):
            if optimizer() is not None:
                optimizer()._update_in_backward(p)

        return [p.register_post_accumulate_grad_hook(hook)
                for group in self.param_groups for p in group["params"] if p.requires_grad]

    @torch.no_grad()
    def _update_in_backward(self, p) -> None:
        self._open_step()
        self._update(p, self._group_of[p])
        p.grad = None

    def _open_step(self) -> None:
        if not self._step_open:
            self._step_open = True
            self._before_step()

    def _update(self, p, group) -> None:
        """The update of one parameter from p.grad (the body of step)."""
        if p.grad.is_sparse:
            raise TypeError("AdamW8bit does not support sparse gradients (e.g. nn.Embedding(sparse=True)); "
                            "use dense gradients")
        if is_capturing(p):
            self._update_captured(p, group)
            return
        state = self._state_for(p)
        self._before_update(p, state)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        hyper = (state["step"], group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        if "absmax1" in state:
            self._update_8bit(p, state, hyper)
        else:
            adamw_update_(p, p.grad, state["state1"], state["state2"], *hyper)
        self._after_update(p, state)

    def _update_captured(self, p, group) -> None:
        """The update recorded into a CUDA graph: its numbers from the table, its step counted per replay."""
        state = self.state.get(p)
        self._check_capturable(p, state)
        self._captured.append(p)
        beta1, beta2 = group["betas"]
        hyper = (state["step"] + 1, group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
        self._update_8bit(p, state, hyper, self._graph_scalars[self._graph_rows[p], :7])

    # Subclasses hook in here, not by overriding step: torch wraps the step of every optimizer class for its
    # step hooks, so a subclass's step calling this one would run each hook twice.
    def _before_step(self) -> None:
        pass

    def _after_step(self) -> None:
        pass

    def _update_8bit(self, p, state, hyper, scalars=None) -> None:
        if resolve_backend(self.backend, p) == "triton":
            from .kernels.adamw_8bit import adamw8bit_update_triton

            adamw8bit_update_triton(p, p.grad, state, *hyper, blocksize=self.blocksize, scalars=scalars)
        else:
            adamw8bit_update_(p, p.grad, state, *hyper, blocksize=self.blocksize)

    # CUDA graphs (qlora_ref.cuda_graph.CapturedStep). A captured update is a kernel launch recorded with
    # fixed pointers, so its per-step numbers (bias corrections, learning rate) come from a table on the
    # GPU that is rewritten before every replay; Python's step counts advance per replay, not at capture.
    def prepare_capture(self) -> None:
        """Make the table of per-step numbers (one 32-byte row per parameter) that captured updates read."""
        self._index_parameters()
        self._graph_scalars = torch.zeros(len(self._group_of), 8, dtype=torch.float32,
                                          device=next(iter(self._group_of)).device)
        self._captured = []  # the parameters whose update the graph holds, filled during capture

    def begin_graph_step(self) -> None:
        """Before a replay: fill the table with the coming step's numbers (the current learning rates)."""
        from .kernels.adamw_8bit import scalar_values

        rows = [[0.0] * 8 for _ in self._group_of]
        for p in self._captured:
            group = self._group_of[p]
            beta1, beta2 = group["betas"]
            rows[self._graph_rows[p]][:7] = scalar_values(self.state[p]["step"] + 1, group["lr"], beta1, beta2,
                                                          group["eps"], group["weight_decay"])
        # Stream-ordered after the previous replay, before the next; pinned, so the host does not wait.
        self._graph_scalars.copy_(torch.tensor(rows, dtype=torch.float32).pin_memory(), non_blocking=True)

    def end_graph_step(self) -> None:
        """After a replay: count the step for every parameter the graph updated."""
        self._before_step()
        for p in self._captured:
            self.state[p]["step"] += 1
        self._after_step()

    def _check_capturable(self, p, state) -> None:
        if self._graph_scalars is None:
            raise RuntimeError("AdamW8bit is being captured in a CUDA graph without prepare_capture(): use "
                               "qlora_ref.cuda_graph.CapturedStep, which prepares the optimizer")
        if not state:
            raise RuntimeError(f"a parameter of shape {tuple(p.shape)} has no optimizer state yet: run a step before "
                               "capturing (CapturedStep warms up first)")
        if "absmax1" not in state or resolve_backend(self.backend, p) != "triton":
            why = "float32 moments (below min_8bit_size)" if "absmax1" not in state else "backend 'torch'"
            raise RuntimeError(f"only the Triton 8-bit update can be captured in a CUDA graph; a parameter of shape "
                               f"{tuple(p.shape)} has {why}")

    def _index_parameters(self) -> None:
        self._group_of = {p: group for group in self.param_groups for p in group["params"]}
        self._graph_rows = {p: i for i, p in enumerate(self._group_of)}

    def _allocate(self, shape, dtype, device) -> torch.Tensor:
        """A zero-filled tensor for an optimizer state; override to place states in other memory."""
        return torch.zeros(shape, dtype=dtype, device=device)

    def _state_for(self, p) -> dict:
        """self.state[p], made by self._new_state(p) the first time p is updated."""
        state = self.state[p]
        if not state:
            state.update(self._new_state(p))
        return state

    def _state_layout(self, p) -> dict:
        """{key: (shape, dtype)} of p's state tensors: 8-bit codes with float32 absmax, float32 below min_8bit_size."""
        if p.numel() >= self.min_8bit_size:
            blocks = (-(-p.numel() // self.blocksize),)
            return {"state1": (p.shape, torch.uint8), "absmax1": (blocks, torch.float32),
                    "state2": (p.shape, torch.uint8), "absmax2": (blocks, torch.float32)}
        return {"state1": (p.shape, torch.float32), "state2": (p.shape, torch.float32)}

    def _new_state(self, p) -> dict:
        """Zero moments for p, as _state_layout(p) lays them out."""
        state = {"step": 0}
        for key, (shape, dtype) in self._state_layout(p).items():
            state[key] = self._allocate(shape, dtype, p.device)
        return state

    def _before_update(self, p, state) -> None:
        """Called before each update of p (a paged subclass moves the state to the GPU here)."""

    def _after_update(self, p, state) -> None:
        """Called after each update of p."""

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader, except that state tensors keep their dtype (torch would cast uint8 codes and
        float32 absmax to the parameter's dtype) and are allocated through self._allocate; everything is
        checked before anything changes."""
        for g, group in enumerate(state_dict["param_groups"]):
            _check_group(group, f"param_groups[{g}]")
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        param_of = dict(zip(saved_ids, _parameters(self)))
        for index, saved in state_dict["state"].items():
            self._check_saved_state(param_of[index], saved, f"state[{index}]")
        super().load_state_dict({**state_dict, "state": {}})
        for index, saved in state_dict["state"].items():
            self._load_state(param_of[index], saved)

    def _check_saved_state(self, p, saved: dict, name: str) -> None:
        """Raise, naming `name`, unless `saved` is a state this optimizer would have made for p: its keys,
        shapes and dtypes (_state_layout), a step >= 0, and finite float values."""
        layout = self._state_layout(p)
        if set(saved) != {"step", *layout}:
            raise ValueError(f"{name}: the saved state of a parameter of shape {tuple(p.shape)} has keys "
                             f"{sorted(saved)}, this optimizer expects {sorted(['step', *layout])} (different "
                             "min_8bit_size?)")
        step = saved["step"]
        if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
            step = step.item()
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{name}.step must be an int >= 0 (the steps taken), got {saved['step']!r}")
        for key, (shape, dtype) in layout.items():
            value = saved[key]
            if not isinstance(value, torch.Tensor) or value.shape != shape or value.dtype != dtype:
                got = (f"shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, torch.Tensor)
                       else type(value).__name__)
                raise ValueError(f"{name}.{key}: saved {got}, this optimizer expects {tuple(shape)} {dtype} "
                                 "(different blocksize?)")
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name}.{key} holds NaN or Inf: the optimizer state is damaged")

    def _load_state(self, p, saved: dict) -> None:
        """Make p's state a copy of `saved` (checked by _check_saved_state) in tensors from _new_state (so from
        _allocate)."""
        state = self._new_state(p)
        for key, tensor in state.items():
            if key == "step":
                state[key] = int(saved[key])
            else:
                tensor.copy_(saved[key])
        self.state[p] = state


def _parameters(optimizer) -> list:
    """The parameters in param_groups order: torch's state_dict numbers them so."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    """Raise unless every hyperparameter is a finite number in its range: an infinite lr or weight_decay makes
    the parameters non-finite in one step, an infinite eps freezes them (m / (sqrt(v) + inf) = 0)."""

    def check(value, name, in_range, rule):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not in_range(value):
            raise ValueError(f"{name} must be a finite number {rule}, got {value!r}")

    check(lr, "lr", lambda x: x >= 0, ">= 0")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        check(beta, f"betas[{i}]", lambda x: 0 <= x < 1, "in [0, 1)")
    check(eps, "eps", lambda x: x > 0, "> 0 (it keeps m / (sqrt(v) + eps) finite)")
    check(weight_decay, "weight_decay", lambda x: x >= 0, ">= 0")


def _check_group(group: dict, name: str) -> None:
    try:
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def bytes_per_parameter(bits: int = 8, blocksize: int = 256) -> float:
    """Adam's state per parameter: 8 bytes with float32 moments, 2 + 8 / blocksize with 8-bit ones."""
    if bits == 32:
        return 8.0
    if bits != 8:
        raise ValueError(f"bits must be 8 or 32, got {bits!r}")
    check_blocksize(blocksize)
    return 2 * (1 + 4 / blocksize)


def predicted_state_bytes(params, blocksize: int = 256, min_8bit_size: int = 4096) -> int:
    """Bytes of AdamW8bit's moments for these parameters (tensors or element counts), exactly:
    2n + 2 * 4 * ceil(n / blocksize) per tensor of n >= min_8bit_size values, 8n below that."""
    check_blocksize(blocksize)
    total = 0
    for p in params:
        n = p.numel() if isinstance(p, torch.Tensor) else int(p)
        total += 2 * n + 8 * -(-n // blocksize) if n >= min_8bit_size else 8 * n
    return total


def optimizer_state_bytes(optimizer) -> int:
    """Measured: the nbytes of every tensor in optimizer.state, each storage counted once.

    bitsandbytes keeps its two code tables (2 x 256 float32) in every parameter's state, as the same
    two tensors: they count once (2048 bytes). torch's AdamW adds a 0-d float32 `step` per parameter.
    """
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                key = (value.device, value.untyped_storage().data_ptr(), value.nbytes)
                if key not in seen:
                    seen.add(key)
                    total += value.nbytes
    return total


def optimizer_state_tensors(optimizer) -> dict:
    """A flat {name: tensor} of the optimizer's state and hyperparameters, for safetensors (no pickle).

        state.{i}.{key}        the state tensors of the i-th parameter (param_groups order), and its
                               step as a 0-d int64 tensor
        param_groups.{g}.{key} lr, eps, weight_decay as 0-d float64 tensors, betas as a float64 pair
    Tensors are shared with the optimizer, not copied; load with load_optimizer_state_tensors.
    """
    tensors = {}
    for g, group in enumerate(optimizer.param_groups):
        for key, value in group.items():
            if key in ("params", "param_names"):  # the parameters themselves, and their names
                continue
            numbers = value if isinstance(value, (tuple, list)) else [value]
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
                raise ValueError(f"param_groups[{g}][{key!r}] = {value!r} is not a number or a tuple of numbers")
            tensors[f"param_groups.{g}.{key}"] = torch.tensor(value, dtype=torch.float64)
    for i, p in enumerate(_parameters(optimizer)):
        for key, value in optimizer.state.get(p, {}).items():
            name = f"state.{i}.{key}"
            tensors[name] = torch.tensor(value, dtype=torch.int64) if key == "step" else value
    return tensors


def load_optimizer_state_tensors(optimizer, tensors: dict) -> None:
    """Restore what optimizer_state_tensors saved into an AdamW8bit (or PagedAdamW8bit) over the same parameters.

    Everything is checked before anything changes (check_optimizer_state_tensors): a ValueError names the
    first tensor that is not what this optimizer would have saved."""
    groups, states = _read_state_tensors(optimizer, tensors)
    for group, values in zip(optimizer.param_groups, groups):
        group.update(values)
    params = _parameters(optimizer)
    for index, saved in states.items():
        optimizer._load_state(params[index], saved)


def check_optimizer_state_tensors(optimizer, tensors: dict) -> None:
    """Raise, naming the tensor, unless load_optimizer_state_tensors can load `tensors`: known names, finite
    hyperparameters in range, and per parameter the state's keys, shapes, dtypes, step and finite values."""
    _read_state_tensors(optimizer, tensors)


def _read_state_tensors(optimizer, tensors: dict) -> tuple:
    """([hyperparameters per param group], {parameter index: saved state}) of `tensors`, all checked."""
    if not isinstance(optimizer, AdamW8bit):
        raise TypeError(f"optimizer state tensors load into AdamW8bit or PagedAdamW8bit, got {type(optimizer).__name__}")
    params = _parameters(optimizer)
    groups = [{} for _ in optimizer.param_groups]
    states = {}
    for name, value in tensors.items():
        kind, index, key = _split_name(name)
        if kind == "param_groups":
            if index >= len(groups) or key not in optimizer.param_groups[index] or key in ("params", "param_names"):
                raise ValueError(f"{name}: this optimizer has no such hyperparameter")
            if not value.is_floating_point() or value.dim() > 1:
                raise ValueError(f"{name}: a hyperparameter is saved as a float64 number or pair, got {value.dtype} "
                                 f"of shape {tuple(value.shape)}")
            number = value.tolist()
            groups[index][key] = tuple(number) if isinstance(number, list) else number
        else:
            if index >= len(params):
                raise ValueError(f"{name}: the saved optimizer had more parameters than this one ({len(params)})")
            states.setdefault(index, {})[key] = value
    for g, (group, values) in enumerate(zip(optimizer.param_groups, groups)):
        _check_group({**group, **values}, f"param_groups.{g}")
    for index, saved in states.items():
        optimizer._check_saved_state(params[index], saved, f"state.{index}")
    return groups, states


def _split_name(name: str):
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in ("state", "param_groups") or not parts[1].isdigit():
        raise ValueError(f"{name!r} is not a name optimizer_state_tensors writes "
                         "('state.<i>.<key>' or 'param_groups.<g>.<key>')")
    return parts[0], int(parts[1]), parts[2]
