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

The step itself, and where it follows bitsandbytes' CUDA kernel or its CPU path: qlora_ref.adamw_step (read
it first). This module is the optimizer around it: the state of each parameter, the order of the updates,
and the two moments when they may run (after the backward, or inside it).

Two implementations of the 8-bit step (`backend`, qlora_ref's usual rule: "auto" is "triton" for CUDA
parameters when triton is installed, "torch" otherwise):
  * "torch": `adamw8bit_update_`, the readable one in PyTorch: decode, `adamw_update_`, encode,
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
        load_state_dict and qlora_ref.optimizer_state's loader first check every saved state against
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

import math
import weakref
from itertools import chain
from numbers import Real

import torch

from .adamw_step import adamw8bit_update_, adamw_update_
from .backend import is_capturing, resolve_backend
from .validation import FLOAT_DTYPES, check_blocksize

__all__ = ["OPTIMIZERS", "AdamW8bit", "bytes_per_parameter", "optimizer_state_bytes", "predicted_state_bytes"]

# The optimizers the course trains with and budgets for, by the names transformers' TrainingArguments(optim=...) uses:
# torch's AdamW, this module's AdamW8bit, and qlora_ref.paging.PagedAdamW8bit.
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit")


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
            check_group(group, f"param_groups[{g}]")
        saved_ids = chain.from_iterable(group["params"] for group in state_dict["param_groups"])
        param_of = dict(zip(saved_ids, parameters_in_order(self)))
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


def parameters_in_order(optimizer) -> list:
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


def check_group(group: dict, name: str) -> None:
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
