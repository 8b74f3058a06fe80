"""Lesson 7: an explicit pager. Pages of tensors move between a device pool and a host pool under a byte
budget, least recently used first, and every move is written down.

Nothing is hidden in a driver: the event log shows each page go out and come back. On a CPU both pools are
CPU memory, but the pager accounts and records every move exactly as on a GPU, so a learner without a GPU
sees the same story (qlora_ref.spike). qlora_ref.paging's PagedAdamW8bit keeps its states in one.
"""

from collections import OrderedDict
from collections.abc import MutableMapping
from dataclasses import dataclass

import torch

__all__ = ["BudgetExceededError", "PageEvent", "Pager", "resident_bounds"]


class BudgetExceededError(torch.OutOfMemoryError):
    """Raised when something must be on the device and cannot fit even after every page is evicted.

    A subclass of torch.OutOfMemoryError, so `except torch.OutOfMemoryError` catches the simulated
    device running out exactly as it catches a real one.
    """


@dataclass(frozen=True)
class PageEvent:
    """One move of one page: "in" is host -> device (a fetch), "out" is device -> host (an eviction)."""

    step: int
    page: str
    direction: str
    nbytes: int
    resident_after: int  # bytes of pages on the device once this move is done


class _Page:
    """A named group of tensors that moves as a unit. `tensors` is the caller's own mapping (an
    optimizer's state dict): moving the page swaps the tensor objects in it, so the caller always
    finds its current tensors, on the device or in host memory, under the same keys."""

    def __init__(self, tensors, host):
        self.tensors = tensors
        self.host = host  # key -> the page's home in host memory (pinned when the device is a GPU)
        self.nbytes = sum(t.numel() * t.element_size() for t in host.values())


def _tensor_keys(tensors: MutableMapping) -> list:
    return [key for key, value in tensors.items() if isinstance(value, torch.Tensor)]


class Pager:
    """Moves pages of tensors between a device pool and a host pool under a byte budget.

    Invariant (checked by the tests after every operation):
        resident_bytes + reserved_bytes <= budget_bytes
    where resident_bytes are the bytes of the pages now on the device and reserved_bytes those that
    something else holds there (activations during a forward pass, via `reserve`).

    - `add(name, tensors)` gives the pager a page; its home is host memory (pinned on a GPU, so that
      copies run at full PCIe speed and asynchronously); it starts out evicted.
    - `fetch(name)` makes it resident: while it does not fit, the least recently used resident page
      is evicted (copied home, its device copy dropped). Then its bytes are copied to the device.
    - `reserve(nbytes)` takes room for something else, evicting pages the same way; `release` gives it
      back. This is the memory spike: pages leave to make room, and come back at their next fetch.

    `device="cpu"` simulates a device: both pools are CPU memory, the device copy is a separate
    buffer (`clone`), and every byte is accounted and every move logged exactly as on a GPU.
    `step` is a label the caller sets (the optimizer's step count); each event records it.
    """

    def __init__(self, budget_bytes: int, device="cpu"):
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int):
            raise TypeError(f"budget_bytes must be an int (bytes), got {type(budget_bytes).__name__}")
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.step = 0
        self.events: list[PageEvent] = []
        self.resident_bytes = 0
        self.reserved_bytes = 0
        self.peak_resident_bytes = 0
        self._pages: dict[str, _Page] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # resident pages, least recently used first

    # -- pages ------------------------------------------------------------------------------------

    def add(self, name: str, tensors: MutableMapping) -> None:
        """Take charge of the tensors in `tensors` (non-tensor values are left alone) as page `name`.

        They are copied to host memory (kept as they are when already there and, on a GPU, pinned)
        and `tensors[key]` is set to that host copy: the page starts evicted.
        """
        if name in self._pages:
            raise ValueError(f"a page named {name!r} already exists")
        keys = _tensor_keys(tensors)
        host = {key: self._home(tensors[key]) for key in keys}
        page = _Page(tensors, host)
        if page.nbytes > self.budget_bytes:
            raise ValueError(
                f"page {name!r} needs {page.nbytes:,} bytes but the whole budget is {self.budget_bytes:,} "
                "bytes: it could never be on the device (raise budget_bytes)"
            )
        for key in keys:
            tensors[key] = host[key]
        self._pages[name] = page

    def _home(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.requires_grad:
            raise ValueError("a page holds plain tensors (optimizer states), not ones that require grad")
        pin = self.device.type == "cuda"
        if tensor.device.type == "cpu" and (tensor.is_pinned() or not pin):
            return tensor
        return tensor.to("cpu").pin_memory() if pin else tensor.to("cpu")

    def fetch(self, name: str) -> MutableMapping:
        """Make page `name` resident (most recently used) and return its mapping, now holding the
        device copies."""
        page = self._page(name)
        if name in self._lru:
            self._lru.move_to_end(name)
            return page.tensors
        self._make_room(page.nbytes, f"page {name!r}", keep=name)
        for key, home in page.host.items():
            if self.device.type == "cpu":
                page.tensors[key] = home.clone()  # a separate buffer stands for device memory
            else:
                page.tensors[key] = home.to(self.device, non_blocking=True)  # pinned: an async DMA
        self._lru[name] = None
        self.resident_bytes += page.nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        self.events.append(PageEvent(self.step, name, "in", page.nbytes, self.resident_bytes))
        return page.tensors

    def evict(self, name: str) -> None:
        """Copy page `name` home and drop its device copy (nothing happens when it is not resident).

        The caller may have replaced a tensor of the page while it was resident (an update that is
        not in place): what is in the mapping now is what goes home, so it must keep shape and dtype.
        """
        page = self._page(name)
        if name not in self._lru:
            return
        for key, home in page.host.items():
            current = page.tensors[key]
            if current.shape != home.shape or current.dtype != home.dtype:
                raise ValueError(
                    f"page {name!r}: tensor {key!r} changed from {home.dtype} {tuple(home.shape)} to "
                    f"{current.dtype} {tuple(current.shape)} while on the device; a page keeps its shapes"
                )
            home.copy_(current)
            page.tensors[key] = home
        del self._lru[name]
        self.resident_bytes -= page.nbytes
        self.events.append(PageEvent(self.step, name, "out", page.nbytes, self.resident_bytes))

    def remove(self, name: str) -> None:
        """Evict page `name` and forget it: its tensors stay, in host memory, in the caller's mapping."""
        self.evict(name)
        del self._pages[name]

    def evict_all(self) -> None:
        """Evict every resident page, least recently used first (before saving, or to free the device)."""
        for name in list(self._lru):
            self.evict(name)

    def _make_room(self, nbytes: int, what: str, keep=None) -> None:
        """Evict least recently used pages until `nbytes` more fit in the budget."""
        while self.resident_bytes + self.reserved_bytes + nbytes > self.budget_bytes:
            victim = next((name for name in self._lru if name != keep), None)
            if victim is None:
                raise BudgetExceededError(
                    f"{what} needs {nbytes:,} bytes on the device, but the budget is {self.budget_bytes:,} bytes "
                    f"and {self.reserved_bytes:,} of them are reserved by other tensors; evicting every page "
                    "does not make enough room"
                )
            self.evict(victim)

    def _page(self, name: str) -> _Page:
        if name not in self._pages:
            raise KeyError(f"no page named {name!r} (pages: {sorted(self._pages)})")
        return self._pages[name]

    # -- other users of the device ------------------------------------------------------------------

    def reserve(self, nbytes: int, what: str = "a reservation") -> None:
        """Something else (`what`: activations, say) takes `nbytes` of the device: evict pages until
        it fits."""
        if nbytes < 0:
            raise ValueError(f"cannot reserve a negative number of bytes ({nbytes})")
        self._make_room(nbytes, what)
        self.reserved_bytes += nbytes

    def release(self, nbytes: int) -> None:
        """Give back `nbytes` taken with `reserve` (pages do not come back until they are fetched)."""
        if not 0 <= nbytes <= self.reserved_bytes:
            raise ValueError(f"cannot release {nbytes:,} bytes: {self.reserved_bytes:,} are reserved")
        self.reserved_bytes -= nbytes

    # -- looking at it --------------------------------------------------------------------------------

    @property
    def pages(self) -> dict:
        """Page name -> its size in bytes, in the order the pages were added."""
        return {name: page.nbytes for name, page in self._pages.items()}

    def is_resident(self, name: str) -> bool:
        self._page(name)
        return name in self._lru


def resident_bounds(page_bytes, budget_bytes: int) -> tuple:
    """(low, high): where the peak of resident page bytes must land once every page was fetched.

    When all pages fit (sum <= budget) nothing is ever evicted and the peak is the sum exactly.
    Otherwise some fetch evicted: it evicted the least recently used pages until the new one fitted,
    so just before the last of them (size e) went out, resident + e + new > budget; afterwards
    resident + new > budget - e >= budget - (largest page). Hence budget - largest < peak <= budget.
    """
    sizes = list(page_bytes)
    total = sum(sizes)
    if total <= budget_bytes:
        return total, total
    return budget_bytes - max(sizes) + 1, budget_bytes
