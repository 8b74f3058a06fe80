"""The quantization state: everything besides the codes that dequantization needs.

Field names are bitsandbytes' (`bitsandbytes.functional.QuantState`) so the two can be read side
by side: absmax, shape, code, dtype, blocksize, quant_type, offset, state2 (and `nested`).
"""

from dataclasses import dataclass
from math import prod
from typing import Optional

import torch

from .validation import BLOCKSIZES, FLOAT_DTYPES


@dataclass
class QuantState:
    """absmax: one float32 per block, or uint8 codes of it when nested (double quantization).
    shape, dtype: the original tensor's. code: the table the codes index. quant_type: 'nf4', 'fp4'
    or 'int4' for 4-bit states, None for 8-bit ones. offset, state2: the mean subtracted from the
    absmax before it was quantized, and the 8-bit state of that quantization.
    """

    absmax: torch.Tensor
    shape: torch.Size
    code: torch.Tensor
    dtype: torch.dtype
    blocksize: int
    quant_type: Optional[str] = None
    offset: Optional[torch.Tensor] = None
    state2: Optional["QuantState"] = None

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def bits_per_code(self) -> int:
        return 8 if self.quant_type is None else 4

    @property
    def numel(self) -> int:
        return prod(self.shape)

    def bits_per_parameter(self) -> float:
        """Stored bits per original value: codes plus constants, the shared code tables excluded.

            plain:  b + 32/B                          (4.5 for NF4 at B = 64)
            nested: b + 8/B + (32 * ceil(n/B/256) + 32)/n  ->  b + 8/B + 32/(256 B)   (4.127)
        """
        constants = self.absmax.numel() * self.absmax.element_size() * 8
        if self.nested:
            constants += self.offset.numel() * 32
            constants += self.state2.absmax.numel() * self.state2.absmax.element_size() * 8
        return self.bits_per_code + constants / self.numel

    def check_codes(self, codes: torch.Tensor) -> None:
        """Raise if `codes` (packed 4-bit bytes or 8-bit codes) cannot belong to this state."""
        if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
            got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
            raise TypeError(f"quantized data must be a uint8 tensor, got {got}")
        for what, tensor in (("the quantized data", codes), ("state.absmax", self.absmax), ("state.code", self.code)):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
                raise ValueError(f"{what} is a meta tensor (a shape without values, e.g. from a model built on "
                                 "device='meta'): load the quantized weights first")
        levels = 2 ** self.bits_per_code
        if not isinstance(self.code, torch.Tensor) or self.code.dtype != torch.float32 or self.code.shape != (levels,):
            got = (f"{self.code.dtype} of shape {tuple(self.code.shape)}" if isinstance(self.code, torch.Tensor)
                   else type(self.code).__name__)
            raise ValueError(f"state.code must be the float32 table of the {levels} levels the {self.bits_per_code}-bit "
                             f"codes index, got {got}")
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"state.blocksize must be one of {BLOCKSIZES}, got {self.blocksize!r}")
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"state.dtype must be float32, float16 or bfloat16, got {self.dtype}")
        n = self.numel
        expected_bytes = (n + 1) // 2 if self.bits_per_code == 4 else n
        if codes.numel() != expected_bytes:
            raise ValueError(
                f"the quantized data has {codes.numel()} bytes but the state describes shape "
                f"{tuple(self.shape)}, which needs {expected_bytes}: data and state do not belong together"
            )
        blocks = -(-n // self.blocksize)
        if self.absmax.numel() != blocks:
            raise ValueError(
                f"state.absmax has {self.absmax.numel()} entries but {n} values in blocks of "
                f"{self.blocksize} need {blocks}"
            )
        if self.nested:
            if self.absmax.dtype != torch.uint8 or self.offset is None:
                raise ValueError("a nested state needs uint8 absmax codes and an offset")
            self.state2.check_codes(self.absmax)
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"state.absmax must be float32, got {self.absmax.dtype}")
