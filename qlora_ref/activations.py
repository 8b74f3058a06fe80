"""Lesson 9: activation memory, what autograd keeps from the forward pass for the backward, in bytes.

`activations(model, method, batch, seq_len, r)` predicts it term by term for qlora_ref.llama's model (formulas in
its docstring); `measure_saved_bytes` measures what autograd saves in a forward pass, on any device, and
`measure_peak_bytes` every tensor alive during a forward and backward pass. tests/test_vram.py holds the
prediction equal to the measurement, to the byte, on small models of every method.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch

from .memory import PeakMemory
from .methods import LORA_TARGETS, check_lora_targets, recipe
from .model_shapes import ModelShape, resolve_model
from .validation import check_positive_int

__all__ = ["Activations", "activations", "measure_peak_bytes", "measure_saved_bytes"]


@dataclass(frozen=True)
class Activations:
    """Bytes of activation memory in one training step (forward, then backward).

    `saved` (layers + rope + embedding + head + loss) is what autograd keeps at the end of the forward
    pass: measure_saved_bytes measures exactly that. The backward pass then peaks at one of two moments:
    the loss's backward (its saved log-probabilities plus two float32 [positions, V] gradients) or a
    layer's backward (with checkpointing the layer's rebuilt tensors, plus the gradients in flight).
    `peak` is the larger, on top of what stays: measure_peak_bytes measures it on a CPU.
    """

    layers: int  # saved by the decoder layers; with checkpointing, each layer's input only
    rope: int  # the cos and sin tables [seq, head_dim], shared by every layer
    embedding: int  # the input ids (int64), saved only when the embeddings train
    head: int  # the final norm's tensors, and lm_head's input when lm_head trains
    loss: int  # float32 log-probabilities [batch (seq - 1), V], the int64 targets and a 0-d float32
    logits: int  # the logits the forward returns [batch, seq, V]: alive until the output is dropped
    loss_transient: int  # two float32 [batch (seq - 1), V] tensors in the loss's backward
    recomputed_layer: int  # checkpointing: one layer's saved tensors, rebuilt for its backward
    backward_working_set: int  # gradients in flight in a layer's backward (see _working_set)
    per_layer: tuple = field(default=())  # bytes each layer saves without checkpointing

    @property
    def saved(self) -> int:
        return self.layers + self.rope + self.embedding + self.head + self.loss

    @property
    def loss_moment(self) -> int:
        """The backward of the head: the final norm's and the loss's saved tensors, the loss's gradients."""
        return self.head + self.loss + self.loss_transient

    @property
    def layer_moment(self) -> int:
        """The backward of a layer, once the head's tensors are gone."""
        return self.recomputed_layer + self.backward_working_set

    @property
    def peak(self) -> int:
        """What stays through the backward (the layers' tensors, rope, the logits) + the larger moment."""
        return self.layers + self.rope + self.embedding + self.logits + max(self.loss_moment, self.layer_moment)


def _norm(x_grad: bool, trains: bool, d: int, c: int):
    """RMSNorm as written (x32 = x.float(); x32 * rsqrt(mean(x32^2) + eps); weight * that.to(dtype)).
    Saves, per token: x32 (4d bytes: a float32 copy in bf16, the input itself in fp32) and the rsqrt
    (4 bytes) when x needs a gradient; the normalized c*d when the weight trains. -> (bytes, out_grad)"""
    return (4 * d + 4 if x_grad else 0) + (c * d if trains else 0), x_grad or trains


def _linears(x_grad: bool, names, in_features: int, targets, trains: bool, c: int, a: int, r: int,
             input_saved: bool = False):
    """Linears reading one input x of `in_features`. Saved per token: x (c * in bytes) once if any of
    them is adapted (LoRAMatmul keeps it for dA) or trains (its weight's gradient needs it) and nobody
    saved it already; a * r for each adapter's x A^T. -> (bytes, {name: out_grad})"""
    adapted = [n for n in names if n in targets]
    saved = c * in_features if (adapted or trains) and not input_saved else 0
    saved += a * r * len(adapted)
    return saved, {n: x_grad or trains or n in targets for n in names}


def _layer(shape: ModelShape, x_grad: bool, targets, trains: bool, c: int, a: int, r: int):
    """Bytes per token one decoder layer saves, whether its output needs a gradient, and whether its
    rotary embedding saved cos and sin (when q or k needs a gradient)."""
    d, f, H = shape.hidden_size, shape.intermediate_size, shape.num_attention_heads
    q_width = H * shape.head_dim
    saved, n1_grad = _norm(x_grad, trains, d, c)
    part, grads = _linears(n1_grad, ("q_proj", "k_proj", "v_proj"), d, targets, trains, c, a, r)
    saved += part
    rope_saved = grads["q_proj"] or grads["k_proj"]
    attention_grad = any(grads.values())
    # SDPA (flash / memory-efficient kernels) saves q, k and v after repeat_interleave (all H heads), its
    # output and the float32 logsumexp [H] per token: O(seq), never the seq x seq probabilities.
    saved += (4 * c * q_width + 4 * H) if attention_grad else 0
    # o_proj reads the attention output through a view of the same storage: saved already when SDPA saved it.
    part, grads = _linears(attention_grad, ("o_proj",), q_width, targets, trains, c, a, r,
                           input_saved=attention_grad)
    saved += part
    h_grad = x_grad or grads["o_proj"]
    part, n2_grad = _norm(h_grad, trains, d, c)
    saved += part
    part, grads = _linears(n2_grad, ("gate_proj", "up_proj"), d, targets, trains, c, a, r)
    saved += part
    gate_grad, up_grad = grads["gate_proj"], grads["up_proj"]
    # silu(gate) saves gate; silu(gate) * up saves each factor for the other's gradient
    saved += c * f * (gate_grad + up_grad + gate_grad)
    part, grads = _linears(gate_grad or up_grad, ("down_proj",), f, targets, trains, c, a, r)
    saved += part
    return saved, h_grad or grads["down_proj"], rope_saved


def _working_set(shape: ModelShape, targets, trains: bool, c: int, a: int) -> int:
    """Bytes per token of gradients alive at once in a layer's backward, at its widest point:

        the residual stream's gradient        c d, throughout
        + the larger of
          SwiGLU's backward                   2 c f: the product's gradient and one factor's
          an adapted linear (in, out)         c in (dL/dx), and with adapters in another dtype than the
                                              compute (float32 next to bf16), LoRAMatmul's a out (the
                                              incoming gradient cast to their dtype) + 2 a in (dL/dx's
                                              low-rank part s (g B) A and its scaled copy, before the cast)
          a trained linear (full fine-tuning) c in (dL/dx; dL/dW is the gradient itself)
    """
    d, f = shape.hidden_size, shape.intermediate_size
    sites = [2 * c * f]
    for name, (i, o) in shape.linear_shapes().items():
        if name in targets and a != c:
            sites.append(a * o + c * i + 2 * a * i)
        elif name in targets or trains:
            sites.append(c * i)
    return c * d + max(sites)


def activations(model, method: str = "qlora_nf4_dq", batch: int = 1, seq_len: int = 512, r: int = 64,
                gradient_checkpointing: bool = True, lora_targets=LORA_TARGETS, adapter_bytes: int = 4) -> Activations:
    """Activation memory of one training step of qlora_ref.llama, per term (see Activations).

    With c the compute dtype's bytes (2 for bf16, 4 for fp32), a the adapters' (4: float32), N = batch *
    seq tokens, per token and per layer whose input needs a gradient, with every linear adapted:

        input_layernorm            4d + 4          x in float32, rsqrt (+ c d normalized if the norm trains)
        q/k/v input                c d             one tensor, read by three linears
        LoRA x A^T                 7 a r           one per adapted linear
        SDPA                       4 c H d_h + 4H  q, k, v (repeated to H heads), output, logsumexp
        post_attention_layernorm   4d + 4
        gate/up input              c d
        MLP                        4 c f           gate (silu's input), silu(gate), up, their product

    so 20 d + 8 f + 28 r + 4 H + 8 bytes for Llama's bf16 QLoRA (H d_h = d). The first layer saves
    4d + 4 less: its input, the frozen embeddings' output, needs no gradient, so input_layernorm saves
    nothing. A linear without an adapter saves no input unless its weight trains (requires_grad decides
    what autograd keeps: `_layer` walks it). Full fine-tuning also saves each norm's normalized input and
    lm_head's input (c d), and the embedding's input ids (8 N).
    With gradient checkpointing a layer keeps only its input, c d per token, and one layer's tensors are
    rebuilt at a time in the backward (recomputed_layer). Shared by all layers: cos and sin, 2 c seq d_h.
    The head: the final norm (4d + 4 per token), the loss: 4 V + 8 bytes per predicted position
    (batch (seq - 1); for batch 1 the targets are a view of all seq labels) + 4, and the returned
    logits c V N.
    """
    shape = resolve_model(model)
    c, trains = recipe(method).compute_bytes, recipe(method).trains_base
    check_positive_int(batch, "batch")
    if check_positive_int(seq_len, "seq_len") < 2:
        raise ValueError("seq_len must be at least 2: the loss predicts each token from the ones before it")
    targets = () if trains else check_lora_targets(lora_targets)
    if not trains:
        check_positive_int(r, "r")
        if adapter_bytes not in (2, 4):
            raise ValueError(f"adapter_bytes must be 2 (bf16 adapters) or 4 (float32), got {adapter_bytes!r}")
    tokens, positions = batch * seq_len, batch * (seq_len - 1)
    # the loss flattens labels[:, 1:]: a copy of the targets, or for batch 1 a view of all of labels
    targets_kept = tokens if batch == 1 else positions
    d, V, L = shape.hidden_size, shape.vocab_size, shape.num_hidden_layers

    per_layer, x_grad, rope_saved = [], trains, False
    for _ in range(L):
        saved, x_grad, rope = _layer(shape, x_grad, targets, trains, c, adapter_bytes, r)
        per_layer.append(saved * tokens)
        rope_saved = rope_saved or rope
    if gradient_checkpointing:
        # checkpoint(layer, h, cos, sin) keeps its inputs, whether or not they need a gradient
        layers, rope_saved, recomputed = L * c * d * tokens, True, max(per_layer)
    else:
        layers, recomputed = sum(per_layer), 0
    head, head_grad = _norm(x_grad, trains, d, c)
    head += c * d if trains else 0  # lm_head's input, for its weight's gradient
    return Activations(
        layers=layers,
        rope=2 * c * seq_len * shape.head_dim if rope_saved else 0,
        embedding=8 * tokens if trains else 0,
        head=head * tokens,
        loss=(4 * V * positions + 8 * targets_kept + 4) if head_grad else 0,
        logits=c * V * tokens,
        loss_transient=2 * 4 * V * positions,
        recomputed_layer=recomputed,
        backward_working_set=_working_set(shape, targets, trains, c, adapter_bytes) * tokens,
        per_layer=tuple(per_layer),
    )


def measure_saved_bytes(model: torch.nn.Module, input_ids: torch.Tensor, labels: Optional[torch.Tensor] = None) -> int:
    """Bytes autograd saves for backward in one forward pass of `model(input_ids, labels=labels)`.

    Every tensor saved for backward goes through torch.autograd.graph.saved_tensors_hooks' pack hook;
    the sum of their storages' sizes, each storage once, leaving out the model's parameters and buffers
    (they are weights, not activations). Runs on any device; the graph is freed on return.
    """
    weights = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    seen = set()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen.add((storage.data_ptr(), storage.nbytes()))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids, labels=labels)
    return sum(nbytes for _, nbytes in seen)


def measure_peak_bytes(model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> int:
    """Peak bytes of the tensors made in one forward and backward pass, `model(input_ids, labels=labels)
    .loss.backward()`: activations, temporaries, and the parameters' gradients as they appear.

    What a GPU's torch.cuda.max_memory_allocated would add on top of the weights, measured on any device
    by following every tensor PyTorch creates (a TorchDispatchMode) and when it is freed. The
    returned output is dropped only after the backward, as in a training loop that keeps `out`.
    """
    with PeakMemory() as tracker:
        out = model(input_ids, labels=labels)
        out.loss.backward()
        del out
    return tracker.peak
