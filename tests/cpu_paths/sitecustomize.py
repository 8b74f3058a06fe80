"""Imported at start-up by every Python that `make test CPU_PATHS=avx2|scalar` starts (the Makefile puts this folder
on PYTHONPATH; notebook kernels inherit it): bitsandbytes' Python check for AVX512-BF16 answers no, as on a CPU
without it, so bitsandbytes neither registers its fused bfloat16 CPU kernel nor tries to fetch one from the hub.

The check is read once, when bitsandbytes.backends.cpu.ops is imported (`from bitsandbytes.functional import
has_avx512bf16`); bitsandbytes.functional is already loaded by then. Its C++ library's own CPUID checks cannot be
switched from Python: tests/test_bnb_cpu.py runs those paths under qemu instead.
"""

import importlib.abc
import sys


class _NoAVX512BF16(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "bitsandbytes.backends.cpu.ops":
            sys.modules["bitsandbytes.functional"].has_avx512bf16 = lambda: False
        return None  # the import itself proceeds as usual


sys.meta_path.insert(0, _NoAVX512BF16())
