"""Imported at start-up by every Python that tools/gpu_lessons.py starts (it puts this folder on PYTHONPATH;
notebook kernels inherit it).

QLORA_PEAK_FILE=path: at exit, the process writes the most GPU memory PyTorch's allocator held
(torch.cuda.max_memory_reserved, and max_memory_allocated) to that file as JSON, if it used the GPU at all.

QLORA_T4=1: a T4's limits on a bigger GPU. A Colab T4 (sm_75) has ~14.75 GiB that PyTorch can use and no
bfloat16 arithmetic. Here:
- PyTorch's allocator is capped at 14.75 GiB (torch.cuda.set_per_process_memory_fraction): a lesson that would
  not fit a T4 fails with CUDA's out-of-memory error;
- torch.cuda.get_device_capability() answers (7, 5) and torch.cuda.is_bf16_supported() False, so the lessons
  pick float16 as a T4's learner gets it (lesson 0's two lines);
- a bfloat16 tensor made on the GPU raises: code that ignores the compute dtype would fail on a T4 too.
Triton asks the driver, not torch, which GPU it compiles for: its kernels are compiled for this GPU, and
tools/gpu_lessons.py compiles them ahead for sm_75 separately.
"""

import atexit
import json
import os

T4_BYTES = int(14.75 * 2**30)


def _write_peak(path):
    import torch

    if torch.cuda.is_initialized():
        with open(path, "w") as f:
            json.dump({"max_reserved": torch.cuda.max_memory_reserved(),
                       "max_allocated": torch.cuda.max_memory_allocated()}, f)


if os.environ.get("QLORA_PEAK_FILE"):
    atexit.register(_write_peak, os.environ["QLORA_PEAK_FILE"])

if os.environ.get("QLORA_T4") == "1":
    import torch
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    class _NoCudaBfloat16(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for leaf in tree_leaves(out):
                if isinstance(leaf, torch.Tensor) and leaf.dtype == torch.bfloat16 and leaf.is_cuda:
                    raise RuntimeError(f"{getattr(func, '__name__', func)} made a bfloat16 tensor on the GPU: "
                                       "a T4 (sm_75) has no bfloat16; use lesson 0's compute_dtype")
            return out

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, T4_BYTES / total))
        torch.cuda.get_device_capability = lambda device=None: (7, 5)
        torch.cuda.is_bf16_supported = lambda including_emulation=True: False
        _NoCudaBfloat16().__enter__()  # for the whole process: never left
