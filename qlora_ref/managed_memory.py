"""Unified (managed) memory through the CUDA runtime, as bitsandbytes' paged optimizers use it (lesson 7).

cudaMallocManaged gives memory with one address valid on the CPU and on the GPU; the driver keeps each
4 KB-2 MB page where it was last touched, migrates it on a page fault, and evicts managed pages to host RAM by
itself when the GPU runs short. cudaMemPrefetchAsync migrates a whole tensor ahead of use, in one bulk copy on
the compute stream. PyTorch has no managed allocator, so this module calls the CUDA runtime that torch loaded
through ctypes and hands the memory to torch without a copy (__cuda_array_interface__).
"""

import ctypes
import functools
import glob
import os

import torch

__all__ = ["concurrent_managed_access", "cuda_runtime_version", "is_managed", "managed_empty", "prefetch"]


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
