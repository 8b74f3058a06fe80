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
  with `cudaMallocManaged`: unified memory, one address valid on the CPU and on the GPU. The driver
  keeps each 4 KB-2 MB page where it was last touched and migrates it on a page fault; when the GPU
  runs short, it evicts managed pages to host RAM by itself. Before each parameter's update,
  `cudaMemPrefetchAsync` migrates that parameter's states to the GPU in one bulk copy on the compute
  stream, so the update kernel does not fault page by page. bitsandbytes prefetches only where the
  device reports concurrent managed access (Pascal and later on Linux); elsewhere the GPU cannot
  fault-migrate and prefetching is not allowed, so we do the same.
- `paging="pager"`: an explicit `Pager` that moves whole pages (one parameter's states) between GPU
  memory and pinned CPU memory under a byte budget, least recently used first, and writes down every
  move. Nothing is hidden in a driver: the event log shows each page go out and come back. On a CPU
  both pools are CPU memory, but the pager accounts and records every move exactly as on a GPU, so a
  learner without a GPU sees the same story (`simulate_spike`).

Why this survives a spike under `torch.cuda.set_per_process_memory_fraction`: the fraction caps
PyTorch's caching allocator only. Managed memory (cudaMallocManaged) and pinned host memory
(cudaHostAlloc) are not allocated through it, so states kept there do not count against the cap;
the pager's resident pages do count, and are at most `budget_bytes`.
"""

import ctypes
import functools
import glob
import os
from collections import OrderedDict
from collections.abc import MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .optim8bit import AdamW8bit, optimizer_state_bytes, predicted_state_bytes

__all__ = [
    "PagedAdamW8bit",
    "BudgetExceededError",
    "PageEvent",
    "Pager",
    "managed_empty",
    "prefetch",
    "is_managed",
    "concurrent_managed_access",
    "cuda_runtime_version",
    "resident_bounds",
    "SpikeRun",
    "TimelinePoint",
    "simulate_spike",
    "spike_model",
]


# ---------------------------------------------------------------------------------------------------
# The explicit pager
# ---------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------
# Unified (managed) memory through the CUDA runtime, as bitsandbytes does it
# ---------------------------------------------------------------------------------------------------

# Values from CUDA's driver_types.h (the same in CUDA 12 and 13).
_ATTR_CONCURRENT_MANAGED_ACCESS = 89  # cudaDevAttrConcurrentManagedAccess
# cudaMemAttachGlobal: any stream on any device may access the allocation. bitsandbytes passes
# cudaMemAttachHost (2), which is the same on devices with concurrent managed access (the only ones
# it prefetches on) but needs cudaStreamAttachMemAsync before a kernel may touch it on the others.
_MEM_ATTACH_GLOBAL = 1
_LOCATION_DEVICE, _LOCATION_HOST = 1, 2  # cudaMemLocationType (CUDA 13's prefetch target)
_CPU_DEVICE_ID = -1  # cudaCpuDeviceId (CUDA 12's prefetch target for the host)


class _MemLocation(ctypes.Structure):
    """struct cudaMemLocation { enum cudaMemLocationType type; int id; } (passed by value)."""

    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def _find_cudart() -> str:
    """The libcudart that torch loaded: it is mapped into this process once CUDA is initialised.
    Failing that (a static build), the copy in the nvidia-* wheels torch depends on."""
    torch.cuda.init()
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith("libcudart.so"):
                return path
    site = os.path.dirname(os.path.dirname(torch.__file__))
    candidates = sorted(glob.glob(os.path.join(site, "nvidia", "**", "libcudart.so*"), recursive=True))
    if not candidates:
        raise RuntimeError("could not find the CUDA runtime library (libcudart) that torch uses")
    return candidates[-1]


@functools.cache
def _cudart() -> ctypes.CDLL:
    if not torch.cuda.is_available():
        raise RuntimeError("managed memory needs a CUDA GPU (torch.cuda.is_available() is False)")
    lib = ctypes.CDLL(_find_cudart())
    lib.cudaGetErrorString.restype = ctypes.c_char_p
    lib.cudaMallocManaged.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
    lib.cudaFree.argtypes = [ctypes.c_void_p]
    lib.cudaDeviceGetAttribute.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]
    version = ctypes.c_int()
    _check(lib, lib.cudaRuntimeGetVersion(ctypes.byref(version)), "cudaRuntimeGetVersion")
    lib.version = version.value
    # CUDA 13 changed the signature (CUDA 12.2 had the new one as cudaMemPrefetchAsync_v2):
    #   12: cudaMemPrefetchAsync(const void* ptr, size_t count, int dstDevice, cudaStream_t stream)
    #   13: cudaMemPrefetchAsync(const void* ptr, size_t count, cudaMemLocation location,
    #                            unsigned int flags, cudaStream_t stream)
    if lib.version >= 13000:
        lib.cudaMemPrefetchAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, _MemLocation, ctypes.c_uint,
                                             ctypes.c_void_p]
    else:
        lib.cudaMemPrefetchAsync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return lib


def _check(lib, error: int, what: str) -> None:
    if error != 0:
        raise RuntimeError(f"{what} failed: CUDA error {error} ({lib.cudaGetErrorString(error).decode()})")


def cuda_runtime_version() -> int:
    """The CUDA runtime's version as an int: 13000 for 13.0, 12080 for 12.8."""
    return _cudart().version


@functools.cache
def concurrent_managed_access(device_index: int) -> bool:
    """Whether the GPU can migrate managed pages on demand while the CPU uses others
    (cudaDevAttrConcurrentManagedAccess: Pascal or later, on Linux). Only then may we prefetch."""
    lib, value = _cudart(), ctypes.c_int()
    _check(lib, lib.cudaDeviceGetAttribute(ctypes.byref(value), _ATTR_CONCURRENT_MANAGED_ACCESS, device_index),
           "cudaDeviceGetAttribute")
    return bool(value.value)


class _ManagedBuffer:
    """`nbytes` of unified memory from cudaMallocManaged, shaped for torch.as_tensor.

    torch.as_tensor reads `__cuda_array_interface__` (the protocol CuPy and Numba use), wraps the
    pointer without copying, and holds a reference to this object for as long as any tensor views
    the memory; when the last one dies, this object goes too and `__del__` calls cudaFree.
    """

    live_bytes = 0  # managed bytes this module has allocated and not yet freed

    def __init__(self, nbytes: int):
        self._lib, self.nbytes = _cudart(), 0  # __del__ runs even when cudaMallocManaged fails
        pointer = ctypes.c_void_p()
        _check(self._lib, self._lib.cudaMallocManaged(ctypes.byref(pointer), nbytes, _MEM_ATTACH_GLOBAL),
               "cudaMallocManaged")
        self.pointer, self.nbytes = pointer.value, nbytes
        _ManagedBuffer.live_bytes += nbytes
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (self.pointer, False),
                                         "version": 2}

    def __del__(self):
        if self.nbytes:
            _ManagedBuffer.live_bytes -= self.nbytes
            self._lib.cudaFree(self.pointer)


def managed_empty(shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """An uninitialised tensor in unified memory (cudaMallocManaged), usable by CUDA kernels and by
    the CPU alike; the driver migrates its pages to wherever they are used.

    We never ask for more managed memory than the GPU has free (torch.cuda.mem_get_info), counting
    what this module already holds: oversubscribing unified memory is legal CUDA, but on shared or
    virtualised machines it can stall the whole GPU, and the lesson does not need it.
    """
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        raise ValueError(f"managed memory lives on a CUDA device, got device={device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    shape = torch.Size(shape)
    nbytes = shape.numel() * dtype.itemsize
    free, _ = torch.cuda.mem_get_info(index)
    if _ManagedBuffer.live_bytes + nbytes > free:
        raise RuntimeError(
            f"asking for {nbytes:,} bytes of managed memory with {_ManagedBuffer.live_bytes:,} already held, but "
            f"GPU {index} has only {free:,} bytes free: refusing to oversubscribe unified memory"
        )
    with torch.cuda.device(index):
        buffer = _ManagedBuffer(max(nbytes, 1))  # cudaMallocManaged refuses 0 bytes
    raw = torch.as_tensor(buffer, device=torch.device("cuda", index))
    tensor = raw[:nbytes].view(dtype).view(shape)
    tensor.is_managed = True
    return tensor


def is_managed(tensor: torch.Tensor) -> bool:
    """Whether `tensor` was made by managed_empty (bitsandbytes marks its paged tensors the same way)."""
    return getattr(tensor, "is_managed", False)


def prefetch(tensor: torch.Tensor, to_cpu: bool = False) -> bool:
    """Migrate a managed tensor's pages to its GPU (or to host RAM with to_cpu=True) ahead of use.

    cudaMemPrefetchAsync queues the migration on the current stream, so the kernels queued after it
    find the pages already there instead of faulting them in one by one. It returns at once; stream
    order makes it safe. Returns False (and does nothing) where the device lacks concurrent managed
    access, as bitsandbytes' cprefetch does.
    """
    if not is_managed(tensor):
        raise ValueError("prefetch takes a tensor made by managed_empty")
    lib, index = _cudart(), tensor.device.index
    if not concurrent_managed_access(index):
        return False
    stream = ctypes.c_void_p(torch.cuda.current_stream(index).cuda_stream)
    nbytes = tensor.numel() * tensor.element_size()
    if lib.version >= 13000:
        location = _MemLocation(_LOCATION_HOST, 0) if to_cpu else _MemLocation(_LOCATION_DEVICE, index)
        error = lib.cudaMemPrefetchAsync(tensor.data_ptr(), nbytes, location, 0, stream)
    else:
        error = lib.cudaMemPrefetchAsync(tensor.data_ptr(), nbytes, _CPU_DEVICE_ID if to_cpu else index, stream)
    _check(lib, error, "cudaMemPrefetchAsync")
    return True


# ---------------------------------------------------------------------------------------------------
# The paged optimizer
# ---------------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------------
# A memory spike on a simulated device (lesson 7's CPU demonstration)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelinePoint:
    """The simulated device's memory at one moment of training."""

    step: int
    phase: str  # "forward": an activation was saved; "backward": activations freed; "update": a page came in
    activation_bytes: int
    state_bytes: int  # optimizer-state bytes on the device
    evictions: int  # pages evicted to make room for this moment


@dataclass
class SpikeRun:
    """What simulate_spike returns: the timeline, the pager's event log, and the trained weights."""

    points: list
    events: list
    budget_bytes: int
    fixed_bytes: int  # weights and gradients, on the device throughout
    page_bytes: dict  # page (parameter) name -> bytes of its optimizer state
    spike_step: int
    parameters: dict  # parameter name -> its value after the last step


def spike_model(seed: int = 0) -> torch.nn.Module:
    """The small MLP of the simulation: 4 Linear layers, 8 parameters (so 8 pages), about 90k weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(
            torch.nn.Linear(64, 192), torch.nn.ReLU(),
            torch.nn.Linear(192, 192), torch.nn.ReLU(),
            torch.nn.Linear(192, 192), torch.nn.ReLU(),
            torch.nn.Linear(192, 16),
        )


@contextmanager
def _saved_activations(model, on_new):
    """Call on_new(nbytes) for every new storage autograd saves for backward (activations): what a
    forward pass adds to device memory. Parameters are not activations; a storage saved twice (a ReLU's
    output is also the next layer's input) is counted once."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = set()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            on_new(storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield


def _batch(step: int, rows: int, seed: int):
    generator = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randn(rows, 64, generator=generator), torch.randn(rows, 16, generator=generator)


def simulate_spike(steps: int = 5, spike_step: int = 2, rows: int = 16, spike_factor: int = 16,
                   budget_bytes=None, paging: bool = True, lr: float = 1e-2, seed: int = 0) -> SpikeRun:
    """Train spike_model for `steps` steps on a simulated device of `budget_bytes`, with a batch
    `spike_factor` times longer at `spike_step` (the memory spike), and record the device's memory.

    The device holds weights and gradients (reserved throughout), the activations of the current
    forward pass (reserved as autograd saves them, released after backward) and the optimizer's
    states. With paging=True the states are PagedAdamW8bit's pages: during the spike the pager evicts
    the least recently used ones to make room for activations, and the update brings them back.
    With paging=False they are AdamW8bit's, fixed on the device once made, and the spike raises
    BudgetExceededError (out of memory), as it would on a real GPU.

    By default the budget leaves room for the spike's activations and half of the states: ordinary
    steps keep every page resident, the spike must evict about half of them.
    """
    if not 0 <= spike_step < steps:
        raise ValueError(f"spike_step must be one of the steps 0..{steps - 1}, got {spike_step}")
    model = spike_model(seed)
    fixed_bytes = 2 * sum(p.numel() * p.element_size() for p in model.parameters())  # weights + gradients
    state_bytes = predicted_state_bytes(model.parameters())
    if budget_bytes is None:
        spike_activations = []
        with _saved_activations(model, spike_activations.append):
            model(_batch(spike_step, rows * spike_factor, seed)[0])
        budget_bytes = fixed_bytes + sum(spike_activations) + state_bytes // 2

    if paging:
        optimizer = PagedAdamW8bit(model.named_parameters(), lr=lr, paging="pager", budget_bytes=budget_bytes)
        pager = optimizer.pager
    else:
        optimizer = AdamW8bit(model.parameters(), lr=lr)
        pager = Pager(budget_bytes)
    pager.reserve(fixed_bytes, "the weights and gradients")

    points, activation, seen_events, fixed_states = [], 0, 0, 0

    def record(step, phase):
        nonlocal seen_events
        evictions = sum(event.direction == "out" for event in pager.events[seen_events:])
        seen_events = len(pager.events)
        states = pager.resident_bytes if paging else fixed_states
        points.append(TimelinePoint(step, phase, activation, states, evictions))

    for step in range(steps):
        pager.step = step
        x, y = _batch(step, rows * (spike_factor if step == spike_step else 1), seed)

        def on_new(nbytes):
            nonlocal activation
            pager.reserve(nbytes, f"an activation of step {step}")
            activation += nbytes
            record(step, "forward")

        with _saved_activations(model, on_new):
            loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        pager.release(activation)
        activation = 0
        record(step, "backward")
        optimizer.step()
        if paging:  # one point per page brought in for an update
            evictions = 0
            for event in pager.events[seen_events:]:
                if event.direction == "out":
                    evictions += 1
                else:
                    points.append(TimelinePoint(step, "update", 0, event.resident_after, evictions))
                    evictions = 0
            seen_events = len(pager.events)
        elif not fixed_states:
            fixed_states = optimizer_state_bytes(optimizer)
            pager.reserve(fixed_states, "the optimizer states")
            record(step, "update")

    page_bytes = pager.pages if paging else {name: predicted_state_bytes([p]) for name, p in model.named_parameters()}
    return SpikeRun(points, list(pager.events), budget_bytes, fixed_bytes, page_bytes, spike_step,
                    {name: p.detach().clone() for name, p in model.named_parameters()})
