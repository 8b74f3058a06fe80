"""The fused training path's loss: cross-entropy without the full float32 logits. With the fused kernels
(kernels/rmsnorm.py, kernels/rope.py, kernels/swiglu.py) it is what LlamaForCausalLM.fused_kernels_enable() switches on.

The unfused loss computes logits = h W^T for every position ([N, V] in the compute dtype), a float32 copy, its
log-softmax and, in the backward, a float32 gradient of the same size: at 2,048 tokens and Llama-3's V = 128,256
that is 2 GiB at a time. `linear_cross_entropy` walks the positions in chunks of `chunk` rows and, while it has a
chunk's logits, also computes what the backward needs, so only one chunk's logits ever exist:

    per chunk   z = (h_c W^T).float()      lse = logsumexp(z)      loss += sum over valid rows of lse - z[target]
                p = (softmax(z) - onehot(target)) / n_valid   (0 on ignored rows), in the compute dtype
                dh_c = p W                 dW += p^T h_c  (float32; only when W trains)
    backward    dh * grad_loss, dW * grad_loss

The same arithmetic as the unfused path (logits in the compute dtype, softmax in float32, its gradient cast back
before the products), summed in another order: tests/test_fused.py holds the loss and gradients within rounding.
"""

import torch

__all__ = ["DEFAULT_CHUNK", "linear_cross_entropy"]

DEFAULT_CHUNK = 256  # rows of logits alive at once: chunk * V float32 values (128 MiB at V = 128,256)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk, ignore_index):
        valid = targets != ignore_index
        n_valid = valid.sum()  # a tensor: no copy to the host, so a CUDA graph can capture the step
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if ctx.needs_input_grad[1] else None
        for start in range(0, h.shape[0], chunk):
            h_c, t_c, v_c = h[start:start + chunk], targets[start:start + chunk], valid[start:start + chunk]
            z = (h_c @ weight.T).float()  # the chunk's logits: the one [chunk, V] float32 tensor, reused in place
            lse = torch.logsumexp(z, dim=-1)
            safe = torch.where(v_c, t_c, 0)
            loss += torch.where(v_c, lse - z.gather(1, safe[:, None])[:, 0], 0.0).sum()
            p = z.sub_(lse[:, None]).exp_()  # softmax
            p.scatter_add_(1, safe[:, None], -v_c[:, None].float())  # - onehot(target)
            p = p.mul_(v_c[:, None] / n_valid).to(h.dtype)
            dh[start:start + chunk] = p @ weight
            if dw is not None:
                dw.addmm_(p.T.float(), h_c.float())
        ctx.save_for_backward(dh, dw if dw is not None else torch.empty(0))
        ctx.weight_trains = dw is not None
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad):
        dh, dw = ctx.saved_tensors
        return dh * grad.to(dh.dtype), (dw * grad).to(dh.dtype) if ctx.weight_trains else None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = DEFAULT_CHUNK,
                         ignore_index: int = -100) -> torch.Tensor:
    """mean over targets != ignore_index of -log softmax(h W^T)[target], float32, never holding more than `chunk`
    rows of logits. h: [N, d] (the final norm's output), weight: [V, d] (lm_head's), targets: [N] long."""
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h must be [N, d] and weight [V, d]; got {tuple(h.shape)} and {tuple(weight.shape)}")
    if targets.shape != h.shape[:1] or targets.dtype != torch.long:
        raise ValueError(f"targets must be a long tensor of shape ({h.shape[0]},), got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return _LinearCrossEntropy.apply(h, weight.to(h.dtype), targets, chunk, ignore_index)
