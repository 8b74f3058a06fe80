"""Lesson 9: the VRAM budget of fine-tuning a Llama-shaped model, term by term, in bytes.

    b = estimate("Llama-2-7B", method="qlora_nf4_dq", optimizer="paged_adamw_8bit", batch=1, seq_len=512, r=64)
    print(b.table("T4 (14.75 GiB)")); b.fits("T4 (14.75 GiB)")

The model is a preset (PRESETS) or any Llama-family config.json (from_hf_config). Its parameters are
counted exactly from the architecture: V = vocab_size, d = hidden_size, f = intermediate_size, L layers,
H heads and K key/value heads of d_h = head_dim numbers each:

    per layer   q_proj d x H d_h, k_proj and v_proj d x K d_h, o_proj H d_h x d,
                gate_proj and up_proj d x f, down_proj f x d, two RMSNorm weights of d
    the rest    embeddings V x d, lm_head V x d (none when tied to the embeddings), a final norm of d

A training step's memory is what stays (weights, gradients, optimizer states) plus the activations at
the worst moment of the step. The terms (the keys of MemoryBreakdown.parts):

    4-bit weights            QLoRA: the seven linears of every layer as NF4 codes, n/2 bytes
    quantization constants   n * constant_bits_per_parameter(64, double_quant) / 8 (0.5 or ~0.127 bits a
                             weight, lesson 4) plus each layer's code tables: what QLoRALinear stores
    16-bit weights           frozen bf16: the whole base of 16-bit LoRA; for QLoRA the embeddings, lm_head
                             and the norms, which stay unquantized (as transformers + bitsandbytes leave them)
    trainable weights        full fine-tuning: every parameter (fp32 or bf16); LoRA: r (in + out) per adapted
                             linear, in the adapters' dtype (float32 by default, as PEFT and qlora_ref)
    gradients                one per trainable parameter, in its dtype (all of them: an upper bound, since
                             they appear during the backward pass); with the optimizer in the backward
                             (optimizer_in_backward) only the largest adapted linear's, freed by its update
    optimizer states         "adamw" (torch.optim.AdamW): two moments in the parameter's dtype, so 8 B per
                             fp32 parameter and 4 per bf16 one; "adamw_8bit": optim8bit.predicted_state_bytes,
                             2 + 8/256 B per parameter (float32 below 4096 values); "paged_adamw_8bit": the
                             same bytes, but each state tensor of >= 100,000 values lives in unified memory
                             and must be on the GPU only while its parameter is updated: the GPU term is the
                             unpaged states plus the largest paged parameter's (the rest: optimizer_host_bytes)
    gathered layers (FSDP2)  n_gpus > 1 only (lesson 10): what FSDP2 holds whole for a while, a layer and the
                             next one it prefetches, lm_head at the head's backward (`_fsdp_per_gpu`)
    activations (saved)      what autograd keeps through the backward pass: `activations` has the formulas
    logits                   the logits the forward returns, held until the output is dropped
    then the larger of two moments of the backward pass (the other part(s) are 0, see `moments`):
    head and loss backward   the final norm's and the loss's saved tensors plus two float32 [tokens, V]
                             gradients
    recomputed layer         gradient checkpointing: one layer's saved tensors, rebuilt for its backward
    backward working set     the gradients in flight inside a layer's backward
    dequantization workspace QLoRA: the largest linear weight dequantized to bf16 (2 in out bytes), one at a
                             time (counted at the layer's backward, although it is briefly freed there)
    CUDA context             CUDA_CONTEXT_BYTES, a constant of the GPU and its software, measured on an H100
    allocator overhead       ALLOCATOR_OVERHEAD times the step's activations and temporaries (TRANSIENT_PARTS, and
                             across GPUs the gathered layers):
                             the caching allocator's rounding and fragmentation, measured on an H100 too.
                             These two are DEVICE_PARTS: not derived from the model.

The code modelled is qlora_ref's: qlora_ref.llama's model with QLoRALinear / LoRALinear layers
(LoRAMatmul), bf16 compute (fp32 for full fp32 training), PyTorch's scaled_dot_product_attention, no
dropout. On a CPU `measure_saved_bytes` (what autograd saves) equals the prediction to the byte and
`measure_peak_bytes` (every tensor alive during a step) is within 10% of it: tests/test_vram.py.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .adapters import read_json_object
from .double_quant import NESTED_BLOCKSIZE
from .memory import PeakMemory
from .optim8bit import OPTIMIZERS, predicted_state_bytes
from .paging import MANAGED_MIN_NUMEL
from .results import SETUP_KEYS
from .validation import check_blocksize

__all__ = [
    "ALLOCATOR_OVERHEAD",
    "CUDA_CONTEXT_BYTES",
    "DEVICE_PARTS",
    "GPUS",
    "LORA_TARGETS",
    "METHODS",
    "PARTS",
    "PRESETS",
    "TRANSIENT_PARTS",
    "Activations",
    "MemoryBreakdown",
    "ModelShape",
    "activations",
    "estimate",
    "estimate_for",
    "from_hf_config",
    "gpu_memory",
    "matching_run",
    "measurement_line",
    "measure_peak_bytes",
    "measure_saved_bytes",
    "quantized_linear_bytes",
]

GIB = 2**30
MIB = 2**20

# Two constants of the GPU and its software, not of the model, measured once: the median of the 12 runs of
# bench/results/memory-nvidia-h100-80gb-hbm3.json (H100 80GB HBM3, torch 2.11, CUDA 13.0, 2026-11-22).
# The context: device memory in use beyond PyTorch's reservation, less the paged optimizer states then on
# the GPU (806-1042 MiB over the runs); it holds the driver's context and the loaded kernels' code.
CUDA_CONTEXT_BYTES = 937 * MIB
# The caching allocator's overhead: reserved - allocated at the peak, per byte of the step's activations and
# temporaries (TRANSIENT_PARTS: the peak less the model and the gradients; 0.41-1.05 over the runs). The
# weights sit in a few large blocks and the gradients come back at the same sizes every step, while the
# activations come and go in many sizes and leave blocks that fit no later one. These runs capture the step
# as a CUDA graph, whose private pool keeps its blocks; an eager step may waste less.
ALLOCATOR_OVERHEAD = 0.717

# Memory each card offers PyTorch, in GiB: the T4 as Colab reports it (torch.cuda.get_device_properties(0).
# total_memory: 14.75 GiB of its 16 with ECC on), the others as sold (their "GB" are GiB; a card reports slightly
# less). The RTX 3060/4060, 3090/4090, A6000 and A100 80GB are the hardware column of the course's source
# (seed 000), which lesson 9 checks row by row.
GPUS = {
    "T4 (14.75 GiB)": 14.75 * GIB,
    "RTX 4060 (8 GiB)": 8 * GIB,
    "RTX 3060 (12 GiB)": 12 * GIB,
    "RTX 3090 (24 GiB)": 24 * GIB,
    "RTX 4090 (24 GiB)": 24 * GIB,
    "A100 (40 GiB)": 40 * GIB,
    "A6000 (48 GiB)": 48 * GIB,
    "A100 (80 GiB)": 80 * GIB,
    "H100 (80 GiB)": 80 * GIB,
}

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # "all-linear"

# method -> (base storage, compute bytes, trains the base): the five ways of fine-tuning the issue compares
METHODS = {
    "full_fp32": ("fp32", 4, True),  # every weight, gradient and activation in float32
    "full_bf16": ("bf16", 2, True),  # pure bf16: weights, gradients (and torch AdamW's moments) in bfloat16
    "lora_bf16": ("bf16", 2, False),  # frozen bf16 base + LoRA adapters
    "qlora_nf4": ("nf4", 2, False),  # frozen NF4 base, float32 constants, + LoRA adapters
    "qlora_nf4_dq": ("nf4_dq", 2, False),  # the same with double-quantized constants (QLoRA's default)
}

PARTS = (
    "4-bit weights",
    "quantization constants",
    "16-bit weights",
    "trainable weights",
    "gradients",
    "optimizer states",
    "gathered layers (FSDP2)",
    "activations (saved)",
    "logits",
    "head and loss backward",
    "recomputed layer",
    "backward working set",
    "dequantization workspace",
    "CUDA context",
    "allocator overhead",
)
DEVICE_PARTS = ("CUDA context", "allocator overhead")
TRANSIENT_PARTS = ("activations (saved)", "logits", "head and loss backward", "recomputed layer",
                   "backward working set", "dequantization workspace")

def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------
# The architecture and its parameters
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder's shape: everything the budget needs from a config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    name: str = "custom"

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim"):
            _positive_int(getattr(self, f), f)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    def linear_shapes(self) -> dict:
        """{name: (in_features, out_features)} of the seven linears of one decoder layer."""
        d, f = self.hidden_size, self.intermediate_size
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return {"q_proj": (d, q), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (q, d),
                "gate_proj": (d, f), "up_proj": (d, f), "down_proj": (f, d)}

    def parameter_counts(self) -> dict:
        """Parameters by kind: linear (the layers' seven linears), embeddings, lm_head, norms."""
        d, V, L = self.hidden_size, self.vocab_size, self.num_hidden_layers
        return {"linear": L * sum(i * o for i, o in self.linear_shapes().values()), "embeddings": V * d,
                "lm_head": 0 if self.tie_word_embeddings else V * d, "norms": (2 * L + 1) * d}

    @property
    def parameter_count(self) -> int:
        return sum(self.parameter_counts().values())

    def parameter_tensors(self) -> list:
        """Element counts of every parameter tensor, in model order (the optimizer keeps state per tensor)."""
        V, d, L = self.vocab_size, self.hidden_size, self.num_hidden_layers
        layer = [i * o for i, o in self.linear_shapes().values()] + [d, d]
        return [V * d] + layer * L + [d] + ([] if self.tie_word_embeddings else [V * d])


PRESETS = {
    "Llama-2-7B": ModelShape(32000, 4096, 11008, 32, 32, 32, 128, name="Llama-2-7B"),
    "Llama-2-13B": ModelShape(32000, 5120, 13824, 40, 40, 40, 128, name="Llama-2-13B"),
    "Llama-2-70B": ModelShape(32000, 8192, 28672, 80, 64, 8, 128, name="Llama-2-70B"),
    "Llama-3-8B": ModelShape(128256, 4096, 14336, 32, 32, 8, 128, name="Llama-3-8B"),
    "Llama-3-70B": ModelShape(128256, 8192, 28672, 80, 64, 8, 128, name="Llama-3-70B"),
}

_LLAMA_LIKE = ("llama", "mistral")  # the same tensors; other families add biases or other blocks


def from_hf_config(path_or_dict, name: Optional[str] = None) -> ModelShape:
    """The ModelShape of a Hugging Face config.json (a path to the file or its folder, or the dict).

    Defaults are transformers' LlamaConfig's: num_key_value_heads = num_attention_heads,
    head_dim = hidden_size / num_attention_heads, tie_word_embeddings = False.
    """
    if isinstance(path_or_dict, dict):
        config, source = path_or_dict, "the config"
    else:
        path = Path(path_or_dict)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (give a config.json, its folder, or a dict)")
        config, source = read_json_object(path, "the model config"), str(path)
    model_type = config.get("model_type")
    if model_type not in _LLAMA_LIKE:
        raise ValueError(f"{source} has model_type {model_type!r}; this estimator models the Llama layout "
                         f"({', '.join(_LLAMA_LIKE)})")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            raise ValueError(f"{source} sets {flag}; the estimator models Llama's linears without biases")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in config]
    if missing:
        raise ValueError(f"{source} lacks {missing}: the parameter count needs them")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim")
    if head_dim is None:
        _positive_int(hidden, "hidden_size")
        _positive_int(heads, "num_attention_heads")
        if hidden % heads:
            raise ValueError(f"{source} has no head_dim and hidden_size {hidden} is not a multiple of "
                             f"num_attention_heads {heads}")
        head_dim = hidden // heads
    tied = config.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ValueError(f"{source}: tie_word_embeddings must be true or false, got {tied!r}")
    kv_heads = config.get("num_key_value_heads")
    try:
        return ModelShape(config["vocab_size"], hidden, config["intermediate_size"], config["num_hidden_layers"],
                          heads, heads if kv_heads is None else kv_heads, head_dim, tied,
                          name or config.get("_name_or_path") or "custom")
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def _resolve_model(model) -> ModelShape:
    if isinstance(model, ModelShape):
        return model
    if isinstance(model, str) and model in PRESETS:
        return PRESETS[model]
    if isinstance(model, (dict, Path)) or (isinstance(model, str) and Path(model).exists()):
        return from_hf_config(model)
    raise ValueError(f"model must be one of the presets {list(PRESETS)}, a ModelShape, a config.json "
                     f"dict or path; got {model!r}")


def quantized_linear_bytes(in_features: int, out_features: int, blocksize: int = 64,
                           double_quant: bool = True) -> tuple:
    """(codes, constants) bytes of one linear weight as QLoRALinear stores it (exactly its memory_breakdown).

    codes: ceil(n / 2) bytes, two 4-bit codes a byte (n = in * out).
    constants: one absmax per block of B: float32 (4 bytes), or with double quantization a uint8 code
    plus, per 256 of them, a float32 second-level absmax and one float32 offset; and the code tables
    (16 float32 NF4 levels, 256 float32 dynamic-map levels when nested). When B * 256 divides n this is
    n * constant_bits_per_parameter(B, double_quant) / 8 plus the tables.
    """
    _positive_int(in_features, "in_features")
    _positive_int(out_features, "out_features")
    check_blocksize(blocksize)
    n = in_features * out_features
    blocks = -(-n // blocksize)
    if double_quant:
        constants = blocks + 4 + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 * (16 + 256)
    else:
        constants = 4 * blocks + 4 * 16
    return -(-n // 2), constants


# ---------------------------------------------------------------------------------------------------
# Activations: what autograd saves for the backward pass
# ---------------------------------------------------------------------------------------------------


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


def _method(method: str):
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return METHODS[method]


def _check_targets(lora_targets) -> tuple:
    targets = tuple(lora_targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if not targets or unknown:
        raise ValueError(f"lora_targets must be a non-empty subset of {LORA_TARGETS}, got {lora_targets!r}")
    return targets


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
    shape = _resolve_model(model)
    _, c, trains = _method(method)
    _positive_int(batch, "batch")
    if _positive_int(seq_len, "seq_len") < 2:
        raise ValueError("seq_len must be at least 2: the loss predicts each token from the ones before it")
    targets = () if trains else _check_targets(lora_targets)
    if not trains:
        _positive_int(r, "r")
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


# ---------------------------------------------------------------------------------------------------
# The budget
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes by part (PARTS order) at the peak of one training step; `total` is their sum.

    moments: the transient bytes of each candidate peak moment of the backward pass (the larger one
    is in `parts`). allocated: what PyTorch's allocator holds at the peak (all but DEVICE_PARTS),
    the number torch.cuda.max_memory_allocated measures (but for one paged optimizer state, which lives
    in unified memory, outside the allocator).
    """

    setup: dict
    parts: dict
    moments: dict
    optimizer_host_bytes: int = 0  # paged optimizer states that may sit in host RAM instead

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def allocated(self) -> int:
        return self.total - sum(self.parts[p] for p in DEVICE_PARTS)

    @property
    def resident_total(self) -> int:
        """total with every paged optimizer state on the GPU: what a run's reserved + context measures on a GPU
        with room for them (the driver keeps managed memory resident, and context_bytes counts it)."""
        return self.total + self.optimizer_host_bytes

    @property
    def peak_moment(self) -> str:
        return max(self.moments, key=self.moments.get)

    def fits(self, gpu) -> bool:
        """Whether the total fits a GPU of GPUS (by name) or of `gpu` bytes."""
        return self.total <= gpu_memory(gpu)

    def table(self, gpu=None) -> str:
        """One line per non-zero part, in GiB, the total, and (given a GPU) whether it fits."""
        width = max(map(len, PARTS)) + 3
        lines = [f"{part + (' *' if part in DEVICE_PARTS else ''):<{width}}{value / GIB:8.3f} GiB"
                 for part, value in self.parts.items() if value]
        lines.append(f"{'total':<{width}}{self.total / GIB:8.3f} GiB")
        other = min(self.moments, key=self.moments.get)
        lines.append(f"peak at the {self.peak_moment} ({self.moments[self.peak_moment] / GIB:.3f} GiB of "
                     f"transients; the {other}: {self.moments[other] / GIB:.3f} GiB)")
        if self.optimizer_host_bytes:
            lines.append(f"paged: {self.optimizer_host_bytes / GIB:.3f} GiB of optimizer states may stay in host RAM")
        lines.append("* a constant of the GPU and its software (measured on an H100), not derived from the model")
        if gpu is not None:
            room = gpu_memory(gpu) - self.total
            verdict = f"fits, {room / GIB:.2f} GiB to spare" if room >= 0 else \
                f"does NOT fit, {-room / GIB:.2f} GiB short"
            lines.append(f"{gpu}: {verdict}")
        return "\n".join(lines)


def gpu_memory(gpu) -> int:
    """Bytes of a GPU named in GPUS, or `gpu` itself when it is a number of bytes."""
    if isinstance(gpu, str):
        if gpu not in GPUS:
            raise ValueError(f"unknown GPU {gpu!r}; known: {list(GPUS)} (or give its memory in bytes)")
        return GPUS[gpu]
    return _positive_int(gpu, "gpu (bytes)")


def _optimizer_bytes(optimizer: str, tensors, dtype_bytes: int) -> tuple:
    """(bytes on the GPU, bytes that may stay in host RAM) of the optimizer's states for these tensors."""
    if optimizer == "adamw":
        return 2 * dtype_bytes * sum(tensors), 0
    if optimizer == "adamw_8bit":
        return predicted_state_bytes(tensors), 0
    if optimizer != "paged_adamw_8bit":
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    resident, paged = 0, []
    for n in tensors:
        # AdamW8bit's states of n values: two uint8 [n] and two float32 [ceil(n / 256)], or two float32 [n]
        states = [n, n, 4 * -(-n // 256), 4 * -(-n // 256)] if n >= 4096 else [4 * n, 4 * n]
        elements = [n, n, -(-n // 256), -(-n // 256)] if n >= 4096 else [n, n]
        big = sum(b for b, e in zip(states, elements) if e >= MANAGED_MIN_NUMEL)
        resident += sum(states) - big
        paged.append(big)
    largest = max(paged, default=0)
    return resident + largest, sum(paged) - largest


def estimate(model="Llama-2-7B", method: str = "qlora_nf4_dq", optimizer: str = "paged_adamw_8bit",
             batch: int = 1, seq_len: int = 512, r: int = 64, gradient_checkpointing: bool = True,
             lora_targets=LORA_TARGETS, adapter_bytes: int = 4, blocksize: int = 64,
             optimizer_in_backward: bool = False, context_bytes: int = CUDA_CONTEXT_BYTES,
             allocator_overhead: float = ALLOCATOR_OVERHEAD, n_gpus: int = 1) -> MemoryBreakdown:
    """The VRAM of one training step (its peak), by part: see the module docstring for each term.

    model: a PRESETS name, a ModelShape, or a config.json (dict or path). r and lora_targets matter for
    the LoRA methods only. adapter_bytes: 4 for float32 adapters (qlora_ref's and PEFT's default), 2 for bf16.
    optimizer_in_backward: the update runs inside the backward as each gradient is complete and frees it
    (AdamW8bit.step_in_backward), so the gradients term is the largest adapted linear's two (or, training the
    whole model, the largest parameter's), not all of them.
    n_gpus > 1: the bytes on each of n_gpus GPUs under FSDP2 (lesson 10, `_fsdp_per_gpu`), batch per GPU.
    """
    shape = _resolve_model(model)
    base, c, trains = _method(method)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    check_blocksize(blocksize)
    if not (isinstance(allocator_overhead, (int, float)) and 0 <= allocator_overhead <= 2):
        raise ValueError(f"allocator_overhead must be a number in [0, 2] (bytes per transient byte), "
                         f"got {allocator_overhead!r}")
    if isinstance(context_bytes, bool) or not isinstance(context_bytes, int) or context_bytes < 0:
        raise ValueError(f"context_bytes must be an int >= 0, got {context_bytes!r}")
    act = activations(shape, method, batch, seq_len, r, gradient_checkpointing, lora_targets, adapter_bytes)
    counts = shape.parameter_counts()
    linears = shape.linear_shapes()
    parts, dequantize = dict.fromkeys(PARTS, 0), 0
    if trains:
        trainable, dtype_bytes = shape.parameter_tensors(), 4 if base == "fp32" else 2
    else:
        targets = _check_targets(lora_targets)
        trainable = [r * n for name in targets for n in linears[name]] * shape.num_hidden_layers
        dtype_bytes = adapter_bytes
        if base == "bf16":
            parts["16-bit weights"] = 2 * shape.parameter_count
        else:
            for i, o in linears.values():
                codes, constants = quantized_linear_bytes(i, o, blocksize, base == "nf4_dq")
                parts["4-bit weights"] += codes * shape.num_hidden_layers
                parts["quantization constants"] += constants * shape.num_hidden_layers
            parts["16-bit weights"] = 2 * (shape.parameter_count - counts["linear"])
            dequantize = 2 * max(i * o for i, o in linears.values())
    parts["trainable weights"] = dtype_bytes * sum(trainable)
    if not optimizer_in_backward:
        parts["gradients"] = dtype_bytes * sum(trainable)
    elif trains:
        parts["gradients"] = dtype_bytes * max(trainable)
    else:
        parts["gradients"] = dtype_bytes * r * max(sum(linears[name]) for name in targets)
    parts["optimizer states"], host = _optimizer_bytes(optimizer, trainable, dtype_bytes)
    parts["activations (saved)"] = act.layers + act.rope + act.embedding
    parts["logits"] = act.logits
    moments = {"head and loss backward": act.loss_moment, "layer backward": act.layer_moment + dequantize}
    if n_gpus != 1:  # lesson 10
        gathered = _fsdp_per_gpu(parts, shape, trainable, _positive_int(n_gpus, "n_gpus"), method, optimizer,
                                 optimizer_in_backward, r, adapter_bytes, blocksize, base == "nf4_dq")
        moments = {moment: value + gathered[moment] for moment, value in moments.items()}
        parts["gathered layers (FSDP2)"] = gathered[max(moments, key=moments.get)]
    if moments["head and loss backward"] >= moments["layer backward"]:
        parts["head and loss backward"] = act.loss_moment
    else:
        parts["recomputed layer"] = act.recomputed_layer
        parts["backward working set"] = act.backward_working_set
        parts["dequantization workspace"] = dequantize
    # FSDP2's gathered layers come and go like the activations: the same overhead per byte (lesson 10)
    transient = sum(parts[p] for p in TRANSIENT_PARTS) + parts["gathered layers (FSDP2)"]
    parts["allocator overhead"] = math.ceil(allocator_overhead * transient)
    parts["CUDA context"] = context_bytes
    setup = {"model": shape.name, "method": method, "optimizer": optimizer, "batch": batch, "seq_len": seq_len,
             "r": None if trains else r, "gradient_checkpointing": bool(gradient_checkpointing),
             "optimizer_in_backward": bool(optimizer_in_backward)}
    if n_gpus != 1:
        setup["n_gpus"] = n_gpus
    return MemoryBreakdown(setup=setup, parts=parts, moments=moments, optimizer_host_bytes=host)


# ---------------------------------------------------------------------------------------------------
# Across GPUs: FSDP2 (lesson 10, qlora_ref.distributed)
# ---------------------------------------------------------------------------------------------------


def _fsdp_per_gpu(parts: dict, shape: ModelShape, trainable: list, n: int, method: str, optimizer: str,
                  optimizer_in_backward: bool, r: int, adapter_bytes: int, blocksize: int, nested: bool) -> dict:
    """Turn `parts` (one GPU's persistent terms) into one of n GPUs' under FSDP2, in place; return what is
    gathered at each moment of the backward.

    Sharded n ways (each GPU holds ceil(1/n) of every tensor): the 4-bit codes and their constants (but the
    offset and the code tables, which every rank keeps: 4 + 1088 bytes a linear), the 16-bit weights, the
    adapters, their gradients (reduce-scattered) and the 8-bit optimizer's moments (ShardedAdamW8bit: 8-bit
    or float32 as for the whole tensor). Gathered for a while: a decoder layer whole (its 4-bit weights and
    constants, norms and adapters) while it computes and, FSDP2 prefetching, the next one with it; in a
    layer's backward also its adapters' whole gradients before they are reduce-scattered; at the head's
    backward lm_head whole (its own unit when untied; tied, the embeddings stay gathered in the root)."""
    if method not in ("lora_bf16", "qlora_nf4", "qlora_nf4_dq"):
        raise ValueError(f"n_gpus > 1 models FSDP2 over LoRA or QLoRA (qlora_ref.distributed); got {method!r}")
    if optimizer == "paged_adamw_8bit" or optimizer_in_backward:
        raise ValueError("under FSDP2 each GPU updates its shard after the reduce-scatter: optimizer 'adamw_8bit' or "
                         "'adamw', without optimizer_in_backward (the paged optimizer pages whole tensors)")
    linears = shape.linear_shapes().values()
    replicated = (4 + 4 * (16 + 256) if nested else 4 * 16) * len(linears) * shape.num_hidden_layers
    layer = 2 * 2 * shape.hidden_size + adapter_bytes * r * sum(i + o for i, o in linears)
    if method != "lora_bf16":
        layer += sum(sum(quantized_linear_bytes(i, o, blocksize, nested)) for i, o in linears)
        parts["4-bit weights"] = -(-parts["4-bit weights"] // n)
        parts["quantization constants"] = -(-(parts["quantization constants"] - replicated) // n) + replicated
    else:
        layer += 2 * sum(i * o for i, o in linears)
    for part in ("16-bit weights", "trainable weights", "gradients"):
        parts[part] = -(-parts[part] // n)
    shards = [-(-t // n) for t in trainable]
    if optimizer == "adamw":
        parts["optimizer states"] = 2 * adapter_bytes * sum(shards)
    else:  # 8-bit when the whole tensor has >= 4096 values: two uint8 moments and a float32 absmax per 256 each
        parts["optimizer states"] = sum(2 * s + 8 * -(-s // 256) if t >= 4096 else 8 * s
                                        for t, s in zip(trainable, shards))
    head = 2 * shape.vocab_size * shape.hidden_size  # lm_head, or the tied embeddings, whole in bf16
    layer_grads = adapter_bytes * r * sum(i + o for i, o in linears)
    return {"head and loss backward": layer + head, "layer backward": 2 * layer + layer_grads
            + (head if shape.tie_word_embeddings else 0)}


def estimate_for(run: dict) -> MemoryBreakdown:
    """estimate() of the setting a GPU run (load_measurements) was measured in: its SETUP_KEYS."""
    return estimate(**{key: run[key] for key in SETUP_KEYS})


def matching_run(breakdown: MemoryBreakdown, runs: list) -> Optional[dict]:
    """The last of `runs` (load_measurements) measured with breakdown's setup, or None."""
    found = [run for run in runs if all(run[k] == breakdown.setup[k] for k in SETUP_KEYS)]
    return found[-1] if found else None


def measurement_line(breakdown: MemoryBreakdown, run: dict) -> str:
    """Estimate against a GPU run (load_measurements), in GiB: what PyTorch allocated at the peak, and
    the allocator's reservation plus the CUDA context when the run measured the context (with every paged
    optimizer state on the GPU, where the run's context_bytes counts them)."""
    def pair(what, estimated, measured):
        return (f"{what}: estimated {estimated / GIB:.2f} GiB, measured {measured / GIB:.2f} GiB "
                f"({(estimated - measured) / measured:+.1%})")

    line = pair("allocated", breakdown.allocated, run["peak_allocated"])
    if "context_bytes" in run:
        return line + "; " + pair("reserved + context", breakdown.resident_total,
                                  run["peak_reserved"] + run["context_bytes"])
    return line + f"; reserved {run['peak_reserved'] / GIB:.2f} GiB (context not measured)"
