"""Lesson 9: the VRAM budget of fine-tuning a Llama-shaped model, term by term, in bytes.

    b = estimate("Llama-2-7B", method="qlora_nf4_dq", optimizer="paged_adamw_8bit", batch=1, seq_len=512, r=64)
    print(b.table("T4 (14.75 GiB)")); b.fits("T4 (14.75 GiB)")

Read qlora_ref.model_shapes first (the model's shape and its parameters, counted exactly), then
qlora_ref.activations (what autograd keeps), then this module, which adds everything up. The methods are
qlora_ref.methods' RECIPES.

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
    activations (saved)      what autograd keeps through the backward pass: qlora_ref.activations has the formulas
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

import math
from dataclasses import dataclass
from typing import Optional

from .activations import activations
from .double_quant import NESTED_BLOCKSIZE
from .methods import LORA_TARGETS, check_lora_targets, recipe
from .model_shapes import ModelShape, resolve_model
from .optim8bit import OPTIMIZERS, predicted_state_bytes
from .paging import MANAGED_MIN_NUMEL
from .results import SETUP_KEYS
from .validation import check_blocksize, check_positive_int

__all__ = [
    "ALLOCATOR_OVERHEAD",
    "CUDA_CONTEXT_BYTES",
    "DEVICE_PARTS",
    "GPUS",
    "PARTS",
    "TRANSIENT_PARTS",
    "MemoryBreakdown",
    "estimate",
    "estimate_for",
    "gpu_memory",
    "matching_run",
    "measurement_line",
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



def quantized_linear_bytes(in_features: int, out_features: int, blocksize: int = 64,
                           double_quant: bool = True) -> tuple:
    """(codes, constants) bytes of one linear weight as QLoRALinear stores it (exactly its memory_breakdown).

    codes: ceil(n / 2) bytes, two 4-bit codes a byte (n = in * out).
    constants: one absmax per block of B: float32 (4 bytes), or with double quantization a uint8 code
    plus, per 256 of them, a float32 second-level absmax and one float32 offset; and the code tables
    (16 float32 NF4 levels, 256 float32 dynamic-map levels when nested). When B * 256 divides n this is
    n * constant_bits_per_parameter(B, double_quant) / 8 plus the tables.
    """
    check_positive_int(in_features, "in_features")
    check_positive_int(out_features, "out_features")
    check_blocksize(blocksize)
    n = in_features * out_features
    blocks = -(-n // blocksize)
    if double_quant:
        constants = blocks + 4 + 4 * -(-blocks // NESTED_BLOCKSIZE) + 4 * (16 + 256)
    else:
        constants = 4 * blocks + 4 * 16
    return -(-n // 2), constants


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
    return check_positive_int(gpu, "gpu (bytes)")


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
    shape = resolve_model(model)
    base, _, trains, _ = recipe(method)
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
        targets = check_lora_targets(lora_targets)
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
        gathered = _fsdp_per_gpu(parts, shape, trainable, check_positive_int(n_gpus, "n_gpus"), method, optimizer,
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
