"""Where the library's code runs: which implementation (PyTorch or the Triton kernels), and whether a CUDA graph
is being captured. Every module that chooses asks here, so the rule is written once.

    resolve_backend("auto", tensor)   "triton" for a CUDA tensor when the triton package is installed, else "torch"
    is_capturing(tensor)              True while a CUDA graph records the work on `tensor`'s GPU

"torch" is this package's PyTorch code, which gives bitsandbytes' CPU bytes; "triton" the kernels of
qlora_ref.kernels, which give its CUDA bytes (CPU tensors run them in Triton's interpreter).
"""

import functools
import importlib.util

import torch

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(backend: str, tensor) -> str:
    """'torch' or 'triton' for `backend` and the tensor to work on ("auto": Triton for a CUDA tensor when the
    triton package is installed, else torch)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if not (isinstance(tensor, torch.Tensor) and tensor.is_cuda):
            return "torch"
        backend = "triton" if triton_available() else "torch"
    elif backend == "triton" and not triton_available():
        raise ImportError("backend='triton' needs the triton package (pip install triton; Linux), "
                          "or use backend='torch'")
    return backend


@functools.lru_cache(maxsize=None)  # asked on every call of a layer's forward and backward
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def is_capturing(tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream and `tensor` is a CUDA tensor: the
    moment when code must neither read GPU values back (checks) nor do anything a replay would not repeat
    (qlora_ref.cuda_graph)."""
    return isinstance(tensor, torch.Tensor) and tensor.is_cuda and torch.cuda.is_current_stream_capturing()
