"""The ways of fine-tuning that lessons 8-10 run and budget, and the layers LoRA adapts: defined once.

The trainer (qlora_ref.train) runs three methods: "qlora" (a frozen NF4 base with LoRA adapters), "lora" (the
same adapters over a frozen 16-bit base) and "full" (every weight trains). The VRAM budget (qlora_ref.vram) tells
five recipes apart, because the bytes depend on how the base is stored and in which dtype the step computes:

    recipe         base stored as                          computes in   trains the base   trainer method
    full_fp32      float32                                 fp32 (4 B)    yes               full, dtype float32
    full_bf16      bfloat16 (weights, gradients, moments)  bf16 (2 B)    yes               (pure bf16: not run)
    lora_bf16      bfloat16, frozen                        bf16          no                lora
    qlora_nf4      NF4 codes, float32 absmax               bf16          no                qlora, double_quant off
    qlora_nf4_dq   NF4 codes, double-quantized absmax      bf16          no                qlora (the default)
"""

from typing import NamedTuple

__all__ = ["LORA_TARGETS", "METHODS", "RECIPES", "Recipe", "check_lora_targets", "recipe"]


class Recipe(NamedTuple):
    base: str  # how the base's weights are stored: "fp32", "bf16", "nf4" or "nf4_dq"
    compute_bytes: int  # bytes of the dtype the step computes in
    trains_base: bool
    method: str  # the trainer's method that runs it


RECIPES = {
    "full_fp32": Recipe("fp32", 4, True, "full"),
    "full_bf16": Recipe("bf16", 2, True, "full"),
    "lora_bf16": Recipe("bf16", 2, False, "lora"),
    "qlora_nf4": Recipe("nf4", 2, False, "qlora"),
    "qlora_nf4_dq": Recipe("nf4_dq", 2, False, "qlora"),
}

# The trainer's methods, in the order lesson 8 compares them.
METHODS = ("qlora", "lora", "full")

# A Llama decoder layer's seven linears: what PEFT's target_modules="all-linear" adapts (the output head aside).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def recipe(name: str) -> Recipe:
    """The Recipe called `name` (a key of RECIPES), or a ValueError that lists them."""
    if name not in RECIPES:
        raise ValueError(f"method must be one of {list(RECIPES)}, got {name!r}")
    return RECIPES[name]


def check_lora_targets(lora_targets) -> tuple:
    """lora_targets as a tuple, or a ValueError unless it is a non-empty subset of LORA_TARGETS."""
    targets = tuple(lora_targets)
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if not targets or unknown:
        raise ValueError(f"lora_targets must be a non-empty subset of {LORA_TARGETS}, got {lora_targets!r}")
    return targets
