import os

import pytest

# bitsandbytes wraps its CPU fallback in torch.compile, which recompiles for every new shape (tens of
# seconds per test run). Eager mode runs the same float32 operations; the lessons compare with it compiled.
os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")


def pytest_collection_modifyitems(config, items):
    """Skip tests marked `gpu` when there is no CUDA GPU (CI, most laptops)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch  # only when a gpu test was collected: importing torch takes a second or two

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in gpu_items:
        item.add_marker(skip)
