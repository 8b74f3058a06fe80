"""Paged optimizer states (lesson 7): keep Adam's states off the GPU until the moment they are needed.

Adam keeps two numbers per weight (m and v). In 8 bits that is 2 bytes per weight, in fp32 8: for a 7B
model, 14 or 56 GB that sit on the GPU the whole time although each parameter's states are touched
once per step, for a few microseconds, in `optimizer.step()`. A memory spike (one long sequence, a big
batch of activations) then finds the card full of bytes that nobody is using right now. Paging moves
those bytes to CPU memory while the GPU needs the room and brings them back just before each
parameter's update. It moves bytes, never changes them: a paged optimizer computes exactly what the
unpaged one does.

Two ways to do it, both here:

- `paging="managed"`, what bitsandbytes' paged optimizers do (CUDA only). The states are allocated
  with `cudaMallocManaged` (qlora_ref.managed_memory): unified memory, one address valid on the CPU and
  on the GPU. The driver keeps each 4 KB-2 MB page where it was last touched and migrates it on a page
  fault; when the GPU runs short, it evicts managed pages to host RAM by itself. Before each parameter's
  update, `cudaMemPrefetchAsync` migrates that parameter's states to the GPU in one bulk copy on the
  compute stream, so the update kernel does not fault page by page. bitsandbytes prefetches only where
  the device reports concurrent managed access (Pascal and later on Linux); elsewhere the GPU cannot
  fault-migrate and prefetching is not allowed, so we do the same.
- `paging="pager"`: an explicit `Pager` (qlora_ref.pager) that moves whole pages (one parameter's
  states) between GPU memory and pinned CPU memory under a byte budget, least recently used first, and
  writes down every move. On a CPU both pools are CPU memory, and the pager accounts and records every
  move exactly as on a GPU: qlora_ref.spike shows a memory spike on such a simulated device.

Why this survives a spike under `torch.cuda.set_per_process_memory_fraction`: the fraction caps
PyTorch's caching allocator only. Managed memory (cudaMallocManaged) and pinned host memory
(cudaHostAlloc) are not allocated through it, so states kept there do not count against the cap;
the pager's resident pages do count, and are at most `budget_bytes`.
"""

import torch

from .managed_memory import is_managed, managed_empty, prefetch
from .optim8bit import AdamW8bit
from .pager import Pager

__all__ = ["MANAGED_MIN_NUMEL", "PAGING_MODES", "PagedAdamW8bit"]

PAGING_MODES = ("managed", "pager")
MANAGED_MIN_NUMEL = 100_000  # bitsandbytes pages only states of tensors this large (about 1e5 values)


class PagedAdamW8bit(AdamW8bit):
    """AdamW8bit whose states live off the GPU except while they are needed; same results, bit for bit.

    paging="managed" (CUDA only, bitsandbytes' PagedAdamW8bit): the states of parameters with at least
        100,000 values go to unified memory (managed_empty) and are prefetched to the GPU before each
        parameter's update; the driver evicts them to host RAM when the GPU needs the room. Their
        residency is the driver's business, so there is no budget.
    paging="pager": one page per parameter (all its state tensors), homed in CPU memory (pinned on a
        GPU) and fetched to the parameters' device before its update by a `Pager` with
        `budget_bytes`; least recently used pages are evicted when the next one does not fit. The
        device-resident state bytes never exceed the budget; `self.pager.events` logs every move.
        Works on a CPU, where the device pool is simulated.

    Parameters given as `model.named_parameters()` name their pages; otherwise pages are "param0", ...
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, blocksize=256,
                 min_8bit_size=4096, *, paging: str = "managed", budget_bytes=None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, blocksize=blocksize,
                         min_8bit_size=min_8bit_size)
        if paging not in PAGING_MODES:
            raise ValueError(f"paging must be one of {PAGING_MODES}, got {paging!r}")
        self.paging = paging
        parameters = [p for group in self.param_groups for p in group["params"]]
        devices = {p.device for p in parameters}
        if len(devices) != 1:
            raise ValueError(f"all parameters must be on one device to page their states, "
                             f"got {sorted(map(str, devices))}")
        (self.device,) = devices
        names = [name for group in self.param_groups for name in group.get("param_names", ())]
        if len(names) != len(parameters):
            names = [f"param{i}" for i in range(len(parameters))]
        self._page_names = {p: name for p, name in zip(parameters, names)}
        self.steps_done = 0
        if paging == "managed":
            if budget_bytes is not None:
                raise ValueError("paging='managed' has no budget (the driver decides what stays on the GPU); "
                                 "use paging='pager' for a byte budget")
            if self.device.type != "cuda":
                raise ValueError(
                    f"paging='managed' puts states in CUDA unified memory and needs CUDA parameters, "
                    f"got {self.device}; on a CPU use paging='pager' with budget_bytes (a simulated device)"
                )
            self.pager = None
        else:
            if budget_bytes is None:
                raise ValueError("paging='pager' needs budget_bytes: how many bytes of state may be on the device")
            self.pager = Pager(budget_bytes, self.device)

    def _allocate(self, shape, dtype, device) -> torch.Tensor:
        """Where a new state tensor is born: in the pager's host pool (pinned on a GPU), or in
        unified memory when it is as large as bitsandbytes pages, else on the device as usual."""
        device = torch.device(device)
        if self.paging == "pager":
            return torch.zeros(shape, dtype=dtype, pin_memory=device.type == "cuda")
        if torch.Size(shape).numel() >= MANAGED_MIN_NUMEL:
            return managed_empty(shape, dtype, device).zero_()
        return torch.zeros(shape, dtype=dtype, device=device)

    def _before_step(self) -> None:
        if self.pager is not None:
            self.pager.step = self.steps_done

    def _after_step(self) -> None:
        self.steps_done += 1

    def _before_update(self, p, state) -> None:
        if self.pager is not None:
            name = self._page_names[p]
            if name not in self.pager.pages:
                self.pager.add(name, state)
            self.pager.fetch(name)
            return
        for value in state.values():
            if isinstance(value, torch.Tensor) and is_managed(value):
                prefetch(value)

    def _check_capturable(self, p, state) -> None:
        if self.pager is not None:
            raise RuntimeError("paging='pager' moves states between host and GPU in Python, which a CUDA graph cannot "
                               "replay: capture with paging='managed'")
        super()._check_capturable(p, state)  # managed states are not prefetched in a graph: they stay resident

    def _load_state(self, p, saved) -> None:
        """Loading replaces p's state dict (allocated through _allocate, so in the right memory):
        the pager forgets the old page and makes a new one at the next update."""
        if self.pager is not None and self._page_names[p] in self.pager.pages:
            self.pager.remove(self._page_names[p])
        super()._load_state(p, saved)
