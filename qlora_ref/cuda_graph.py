"""A whole training step recorded once as a CUDA graph and replayed (lesson 11; lesson 9 keeps its result in one table).

Why
---
At batch 1 and 512 tokens a QLoRA step of a 7B model launches about 11,000 kernels: some 350 per layer
(forward, the checkpointed recompute, backward) times 32 layers. Each launch costs the host 10-30 us of
Python and driver work on the H100 machine we measure on, longer than many of those kernels run, so the
GPU waits for the host: 4 layers take 76 ms of wall time for 17 ms of GPU work
(bench/results/profile-*). A CUDA graph records every launch of one step, with its arguments, once;
each replay then issues them all with one call, and the step takes the GPU's time.

What a graph needs, and how this module provides it
---------------------------------------------------
* Fixed addresses. Every launch is replayed with the pointers it was recorded with: the inputs are copied
  into the same buffers each step, and every tensor the step makes comes from the graph's private memory
  pool, at the same address in every replay (PyTorch's `torch.cuda.graph`).
* No reading back. Nothing in the step may wait for a GPU value on the host: LlamaForCausalLM skips its
  checks of token values while capturing, and CapturedStep runs them before copying each batch in.
* No random numbers: checkpointing recomputes each layer in the backward and would need to replay the
  same draws, so a model with active dropout is refused.
* The optimizer inside the graph. `AdamW8bit.step_in_backward()` runs each parameter's update as soon
  as its gradient is complete, so the updates are recorded with the backward (and the gradients never all
  exist at once: lesson 9's memory). Their per-step numbers (bias corrections, learning rate) change
  every step, so the kernel reads them from a table on the GPU (`prepare_capture`) that is rewritten
  before each replay (`begin_graph_step`); Python's step counts advance after it (`end_graph_step`).
  Managed (paged) optimizer states are not prefetched inside the graph: they are on the GPU after the
  warm-up and stay there unless the GPU runs out of memory.

The numbers are those of the eager step with the optimizer in the backward: same kernels, same order
(tests/test_cuda_graph_gpu.py compares them).
"""

import torch
from torch import nn

from .optim8bit import AdamW8bit

__all__ = ["CapturedStep"]


class CapturedStep:
    """Forward, loss, backward and 8-bit AdamW update of `model` on one batch shape, as one CUDA graph.

        step = CapturedStep(model, optimizer, input_ids, labels)   # warms up, then captures
        loss = step(input_ids, labels)                              # one training step; loss on the GPU

    `optimizer` is a qlora_ref AdamW8bit (or PagedAdamW8bit with paging="managed") over the trainable
    parameters; CapturedStep puts its update into the backward (step_in_backward). The first
    `warmup_steps` steps run eagerly on the given batch (they train: PyTorch asks for a few eager
    iterations before capture, to set up cuBLAS and compile the Triton kernels), then the step is
    captured, which runs nothing. Every call then copies the batch in and replays.
    The batch must keep its shape and dtype; `model` must be in training mode without dropout.
    """

    def __init__(self, model: nn.Module, optimizer, input_ids: torch.Tensor, labels: torch.Tensor,
                 warmup_steps: int = 2):
        if not isinstance(optimizer, AdamW8bit):
            raise TypeError(f"CapturedStep captures qlora_ref's AdamW8bit (its update can read its per-step numbers "
                            f"from the GPU); got {type(optimizer).__name__}")
        if not model.training:
            raise ValueError("the model is in eval mode: call model.train() before capturing a training step")
        drawing = [name for name, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
        if drawing:
            raise ValueError(f"a captured step cannot draw random numbers, and {drawing[0]} is dropout with p > 0 "
                             f"({len(drawing)} such modules): build the model with dropout 0")
        if not (isinstance(input_ids, torch.Tensor) and input_ids.is_cuda):
            raise ValueError("a CUDA graph needs the model and the batch on a CUDA GPU; input_ids is not a CUDA tensor")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1 (the Triton kernels compile in it), got {warmup_steps!r}")
        self.model, self.optimizer = model, optimizer
        self.handles = optimizer.step_in_backward()
        self._check_batch(input_ids, labels, input_ids, labels)
        self.input_ids, self.labels = input_ids.clone(), labels.clone()

        # Warm-up on a side stream, as torch.cuda.graph's documentation asks, and capture on the same one: each
        # stream gets its own cuBLAS workspace, and a third stream would add a third.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_steps):
                self._eager_step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's cached blocks: the graph gets its own pool

        optimizer.prepare_capture()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            self.loss = model(self.input_ids, labels=self.labels).loss
            self.loss.backward()
        self.steps = warmup_steps

    def _eager_step(self) -> torch.Tensor:
        loss = self.model(self.input_ids, labels=self.labels).loss
        loss.backward()
        self.optimizer.step()  # updates happened in the backward; this closes the step
        return loss

    def __call__(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One training step on (input_ids, labels): the loss before the update, a tensor on the GPU (valid
        until the next call, which overwrites it)."""
        self._check_batch(input_ids, labels, self.input_ids, self.labels)
        self.input_ids.copy_(input_ids)
        self.labels.copy_(labels)
        self.optimizer.begin_graph_step()
        self.graph.replay()
        self.optimizer.end_graph_step()
        self.steps += 1
        return self.loss

    def _check_batch(self, input_ids, labels, static_ids, static_labels) -> None:
        for name, value, static in (("input_ids", input_ids, static_ids), ("labels", labels, static_labels)):
            if (not isinstance(value, torch.Tensor) or value.shape != static.shape or value.dtype != static.dtype
                    or value.device != static.device):
                found = (f"{value.dtype} {tuple(value.shape)} on {value.device}" if isinstance(value, torch.Tensor)
                         else type(value).__name__)
                raise ValueError(f"{name} must be a {static.dtype} tensor of shape {tuple(static.shape)} on "
                                 f"{static.device}, as captured; got {found}")
        check = getattr(self.model, "check_inputs", None)
        if check is not None:
            check(input_ids, labels)
