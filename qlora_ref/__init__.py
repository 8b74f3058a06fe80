"""qlora_ref: QLoRA from first principles, checked byte for byte against bitsandbytes.

One module per lesson: linear (1), codebooks (2), blockwise (3), dynamic8bit and double_quant (4),
kernels (5), lora and adapters (6), optim8bit and paging (7); fourbit puts lessons 3 and 4 together
behind bitsandbytes' API.
"""

from .codebooks import codebook_4bit, dynamic_map, fp4_codebook, fp4_e3m0_codebook, int4_codebook, nf4_codebook
from .double_quant import constant_bits_per_parameter, constants_memory_table
from .dynamic8bit import dequantize_blockwise, quantize_blockwise
from .fourbit import dequantize_4bit, quantize_4bit
from .linear import LinearQuantized, quantization_error, quantize_absmax, quantize_zeropoint
from .state import QuantState
from .lora import DequantizeMatmul, LoRALinear, QLoRALinear
from .adapters import TrainableSummary, load_adapters, merge_adapters, prepare_model, save_adapters, trainable_summary
from .optim8bit import AdamW8bit, optimizer_state_bytes, predicted_state_bytes
from .pager import Pager
from .paging import PagedAdamW8bit

__all__ = [
    "QuantState",
    "LinearQuantized",
    "codebook_4bit",
    "constant_bits_per_parameter",
    "constants_memory_table",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dynamic_map",
    "fp4_codebook",
    "fp4_e3m0_codebook",
    "int4_codebook",
    "nf4_codebook",
    "quantization_error",
    "quantize_4bit",
    "quantize_absmax",
    "quantize_blockwise",
    "quantize_zeropoint",
    "DequantizeMatmul",
    "LoRALinear",
    "QLoRALinear",
    "TrainableSummary",
    "load_adapters",
    "merge_adapters",
    "prepare_model",
    "save_adapters",
    "trainable_summary",
    "AdamW8bit",
    "PagedAdamW8bit",
    "Pager",
    "optimizer_state_bytes",
    "predicted_state_bytes",
]
