"""Lesson 4: double quantization, quantizing the quantization constants (QLoRA, section 3).

    offset = mean(absmax)
    (qabsmax, state2) = 8-bit blockwise quantization of (absmax - offset), dynamic map, blocks of 256
    absmax^ = code2[qabsmax] * absmax2 + offset

The absmax values are all positive, so subtracting their mean centres them and lets the signed map
use both halves. Constants then cost 8/B + 32/(256 B) bits per parameter instead of 32/B:
0.127 instead of 0.5 at B = 64, a saving of 0.373.
"""

import torch

from .dynamic8bit import dequantize_blockwise, quantize_blockwise

NESTED_BLOCKSIZE = 256


def compress_absmax(absmax: torch.Tensor):
    """(qabsmax uint8, offset float32 scalar, state2): absmax minus its mean, quantized to 8 bits.

    Always the PyTorch code (bitsandbytes' CPU bytes), also for a CUDA tensor, so that a state made
    by the PyTorch path is PyTorch all the way down; qlora_ref.kernels has the Triton counterpart.
    """
    offset = absmax.mean()
    if not torch.isfinite(offset):
        raise ValueError(
            f"double quantization overflowed: the mean of the absmax values is {offset.item()} in float32 "
            "(the weights are near float32's limit of 3.4e38); quantize with double_quant=False"
        )
    qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE, backend="torch")
    return qabsmax, offset, state2


def decompress_absmax(qabsmax: torch.Tensor, offset: torch.Tensor, state2) -> torch.Tensor:
    """absmax^ = dequantize(qabsmax) + offset, float32: a product, then a separate sum."""
    return dequantize_blockwise(qabsmax, state2, backend="torch") + offset


def constant_bits_per_parameter(blocksize: int = 64, double_quant: bool = False) -> float:
    """Bits of quantization constants per parameter: 32/B, or 8/B + 32/(256 B) when nested."""
    if double_quant:
        return 8 / blocksize + 32 / (blocksize * NESTED_BLOCKSIZE)
    return 32 / blocksize


def constants_memory_table(parameters=(7e9, 13e9, 65e9, 70e9), blocksize: int = 64):
    """Rows of (parameters, GB of constants plain, GB nested, GB saved), 1 GB = 1e9 bytes."""
    plain = constant_bits_per_parameter(blocksize, double_quant=False)
    nested = constant_bits_per_parameter(blocksize, double_quant=True)
    return [(p, p * plain / 8e9, p * nested / 8e9, p * (plain - nested) / 8e9) for p in parameters]
