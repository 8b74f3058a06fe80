"""Measured tensor memory on any device, a CPU included (lessons 8 and 9).

On a GPU, `torch.cuda.max_memory_allocated()` is the measured peak of a training step. A CPU has no such
counter, so this module keeps one: `PeakMemory` watches every tensor that the operators inside it create
(a TorchDispatchMode sees each operator's outputs, backward and optimizer steps included) and counts each
storage once, from its creation until Python frees it:

    live(t)  = bytes of the storages that exist at time t (those there before, plus those created since
               and not yet freed)
    peak     = max over the block of live(t)

Storages that exist before the block (the model, an optimizer's state) are counted by `tensor_bytes`
of the objects you pass in. What is measured is the tensors' bytes, as `memory_allocated` is on a GPU;
the allocator's rounding and caching (`memory_reserved`) and kernels' private scratch buffers are not in it.
"""

import weakref
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_key(t: torch.Tensor) -> tuple:
    storage = t.untyped_storage()
    return t.device, storage.data_ptr(), storage.nbytes()


def tensor_bytes(*objects) -> int:
    """Bytes of the distinct storages of the tensors in objects: tensors, modules (parameters, buffers and
    gradients), or lists/tuples/dicts of them. A shared storage counts once. (An optimizer's state:
    qlora_ref.optim8bit.optimizer_state_bytes.)"""
    seen = {}

    def visit(obj):
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "meta":
                key = _storage_key(obj)
                seen[key] = key[2]
        elif isinstance(obj, nn.Module):
            visit([(t, t.grad) for t in obj.parameters()] + list(obj.buffers()))
        elif isinstance(obj, dict):
            visit(list(obj.values()))
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    for obj in objects:
        visit(obj)
    return sum(seen.values())


class PeakMemory(TorchDispatchMode):
    """Peak bytes of the tensors created inside a `with` block, on one device type.

        with PeakMemory("cpu", baseline=tensor_bytes(model) + optimizer_state_bytes(optimizer)) as memory:
            loss = model(ids, labels=labels).loss; loss.backward(); optimizer.step()
        memory.peak      # baseline + the most bytes the block's new tensors held at one moment
        memory.current   # baseline + what they hold at the end

    device_type: count tensors on this kind of device only ("cpu", "cuda"); None counts them all.
    baseline: bytes that exist before and stay through the block (see tensor_bytes). A storage created
    in the block is counted from the operator that creates it until it is freed.
    """

    def __init__(self, device_type: Optional[str] = None, baseline: int = 0):
        super().__init__()
        if isinstance(baseline, bool) or not isinstance(baseline, int) or baseline < 0:
            raise ValueError(f"baseline must be a number of bytes >= 0, got {baseline!r}")
        self.device_type = device_type
        self.baseline = baseline
        self.live = {}
        self.current = self.peak = baseline

    def _freed(self, key) -> None:
        self.current -= self.live.pop(key)

    def _track(self, t: torch.Tensor) -> None:
        if self.device_type is not None and t.device.type != self.device_type:
            return
        key = _storage_key(t)
        if key in self.live or key[2] == 0:
            return
        self.live[key] = key[2]
        self.current += key[2]
        self.peak = max(self.peak, self.current)
        weakref.finalize(t.untyped_storage(), self._freed, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # An output the schema marks as aliasing an input (a view, an in-place or out= result) is memory
        # that already existed; only the others are new storages.
        returns = func._schema.returns
        outputs = out if isinstance(out, (tuple, list)) else (out,)
        for index, value in enumerate(outputs):
            aliased = index < len(returns) and returns[index].alias_info is not None
            for t in tree_flatten(value)[0]:
                if isinstance(t, torch.Tensor) and not aliased:
                    self._track(t)
        return out
