"""Lesson 10: a 4-bit weight that FSDP2 can shard, all-gather and free, bit-exact.

FSDP2 (`torch.distributed.fsdp.fully_shard`) keeps each parameter as a DTensor cut along dim 0: rank k of
N holds rows [k R/N, (k+1) R/N) of an [R, C] weight. Before a layer's forward it all-gathers the rows,
after the forward it frees them, and before the backward it gathers them again. For a dense weight the
rows are the bytes. A 4-bit weight is three byte streams of different lengths and dtypes (lessons 3, 4):

    codes    uint8,   n / 2            two 4-bit codes a byte, row-major
    absmax   float32, n / B            one per block of B values    (uint8 codes of it when nested)
    absmax2  float32, n / (256 B)      one per 256 absmax values     (nested only)
    offset   float32, 1                the mean of all absmax        (nested only)

`Weight4bit` is a tensor subclass that looks like the [R, C] weight (its dtype is the weight's) and holds
those streams. Cutting it along dim 0 cuts every stream at the same rows, so a shard of R/N rows is
itself a whole quantization of its rows: its codes, its blocks' absmax and its nested blocks' absmax2.
That needs every cut to fall on a nested block (256 B values) and the shard to be whole rows:

    (R / N) * C  must be a multiple of  B          plain absmax
                                        256 * B    nested (16384 at B = 64)

The offset is one number for the whole weight (4 bytes), so every rank keeps a copy. FSDP2's hooks
`fsdp_pre_all_gather` (hand over the local streams) and `fsdp_post_all_gather` (wrap the gathered streams
as the whole Weight4bit) are the whole interface; the gathered streams are the concatenation of the
shards, so they equal the single-process quantization byte for byte. torchao's NF4Tensor uses the same
hooks; its double quantization is its own, this one is bitsandbytes' (qlora_ref.fourbit).

FSDP2 builds the shards itself (torch.chunk, new_zeros, narrow, copy_, and views of the same values), so
Weight4bit implements those few aten operations on the streams (`_OPS`, each one FSDP2 was seen to call) and
refuses every other one with the name of the operation.
`ShardableQLoRALinear` is lesson 6's QLoRALinear with its base held as one such parameter, `weight`.
"""

from math import prod

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from .double_quant import NESTED_BLOCKSIZE
from .fourbit import dequantize_4bit, quantize_4bit
from .lora import QLoRALinear, _check_input
from .state import QuantState

aten = torch.ops.aten
STREAMS = ("codes", "absmax", "absmax2")  # what is sharded and all-gathered, in this order


def values_per_unit(blocksize: int, nested: bool) -> int:
    """The fewest values a shard boundary may fall after: a block, or a nested block of 256 blocks."""
    return blocksize * NESTED_BLOCKSIZE if nested else blocksize


def check_rows_shardable(shape, blocksize: int, nested: bool, world_size: int, name: str = "the weight") -> None:
    """Raise a ValueError, naming `name`, unless an [R, C] weight cuts into `world_size` shards of whole rows
    that each hold whole (nested) blocks: R % N == 0 and (R / N) * C % values_per_unit == 0."""
    rows, cols = shape[0], prod(shape[1:])
    unit = values_per_unit(blocksize, nested)
    per_rank = rows // world_size
    if rows % world_size or (per_rank * cols) % unit:
        what = f"nested blocks of {NESTED_BLOCKSIZE} x {blocksize}" if nested else f"blocks of {blocksize}"
        fits = [n for n in range(1, rows + 1) if rows % n == 0 and (rows // n * cols) % unit == 0]
        raise ValueError(
            f"{name} of shape {tuple(shape)} cannot be sharded over {world_size} ranks: each rank would hold "
            f"{rows / world_size:g} rows = {rows * cols / world_size:g} values, and a shard must be whole rows "
            f"and whole {what} ({unit} values); world sizes that divide it: {fits[:8] or 'none'}"
            + (" (double_quant=False needs only whole blocks)" if nested else ""))


class Weight4bit(torch.Tensor):
    """A 4-bit quantized weight as a tensor of its original shape and dtype, holding only the quantized streams.

    Only what dequantization and FSDP2 need works on it: `dequantize()`, `quant_state()`, `packed()`, and the
    sharding operations; any other torch operation raises (a 4-bit weight must never silently become dense).
    """

    @staticmethod
    def __new__(cls, shape, dtype, codes, absmax, code, blocksize, quant_type, absmax2=None, code2=None, offset=None):
        return torch.Tensor._make_wrapper_subclass(cls, torch.Size(shape), dtype=dtype, device=codes.device,
                                                   requires_grad=False)

    def __init__(self, shape, dtype, codes, absmax, code, blocksize, quant_type, absmax2=None, code2=None,
                 offset=None):
        self.codes, self.absmax, self.absmax2 = codes, absmax, absmax2
        self.code, self.code2, self.offset = code, code2, offset
        self.blocksize, self.quant_type = blocksize, quant_type

    __torch_function__ = torch._C._disabled_torch_function_impl  # every operation goes to __torch_dispatch__

    @classmethod
    def from_quantized(cls, packed: torch.Tensor, state: QuantState) -> "Weight4bit":
        """Wrap quantize_4bit's output (the bytes are kept, not copied)."""
        state.check_codes(packed)
        if state.numel % 2:
            raise ValueError(f"a Weight4bit holds whole bytes: shape {tuple(state.shape)} has an odd number of values")
        nested = state.nested
        return cls(state.shape, state.dtype, packed.reshape(-1), state.absmax, state.code, state.blocksize,
                   state.quant_type, absmax2=state.state2.absmax if nested else None,
                   code2=state.state2.code if nested else None,
                   offset=state.offset.reshape(()) if nested else None)

    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                 double_quant: bool = True) -> "Weight4bit":
        """quantize_4bit(weight, ...) as a Weight4bit: the whole weight, on one process."""
        return cls.from_quantized(*quantize_4bit(weight, blocksize, quant_type, double_quant))

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def streams(self) -> tuple:
        """The sharded byte streams: (codes, absmax) or (codes, absmax, absmax2)."""
        return (self.codes, self.absmax, self.absmax2) if self.nested else (self.codes, self.absmax)

    def packed(self) -> torch.Tensor:
        """The codes in bitsandbytes' shape [n / 2, 1]."""
        return self.codes.view(-1, 1)

    def quant_state(self) -> QuantState:
        state = QuantState(absmax=self.absmax, shape=self.shape, code=self.code, dtype=self.dtype,
                           blocksize=self.blocksize, quant_type=self.quant_type)
        if self.nested:
            state.offset = self.offset
            state.state2 = QuantState(absmax=self.absmax2, shape=self.absmax.shape, code=self.code2,
                                      dtype=torch.float32, blocksize=NESTED_BLOCKSIZE)
        return state

    def dequantize(self) -> torch.Tensor:
        """W^ in this tensor's shape and dtype (for a shard: its own rows, from its own streams)."""
        return dequantize_4bit(self.packed(), self.quant_state())

    def __repr__(self) -> str:
        kind = f"{self.quant_type}, blocksize {self.blocksize}" + (", nested" if self.nested else "")
        return f"Weight4bit(shape={tuple(self.shape)}, dtype={self.dtype}, {kind})"

    def _with(self, shape=None, **streams) -> "Weight4bit":
        """A Weight4bit of the same kind with another shape and/or other streams (the rest shared)."""
        fields = dict(codes=self.codes, absmax=self.absmax, absmax2=self.absmax2, code2=self.code2,
                      offset=self.offset)
        fields.update(streams)
        return Weight4bit(self.shape if shape is None else shape, self.dtype, code=self.code,
                          blocksize=self.blocksize, quant_type=self.quant_type, **fields)

    def _rows(self, start: int, stop: int) -> "Weight4bit":
        """Rows [start, stop) as views of the streams; every cut must fall on a (nested) block boundary."""
        cols = prod(self.shape[1:])
        unit = values_per_unit(self.blocksize, self.nested)
        for cut in (start, stop):
            if (cut * cols) % unit and cut != self.shape[0]:
                raise ValueError(f"cutting the 4-bit weight of shape {tuple(self.shape)} after row {cut} would split "
                                 f"a block of {unit} values (check_rows_shardable says which world sizes fit)")
        first, last = start * cols, stop * cols
        streams = {"codes": self.codes[first // 2:last // 2],
                   "absmax": self.absmax[first // self.blocksize:-(-last // self.blocksize)]}
        if self.nested:
            unit2 = self.blocksize * NESTED_BLOCKSIZE
            streams["absmax2"] = self.absmax2[first // unit2:-(-last // unit2)]
        return self._with((stop - start, *self.shape[1:]), **streams)

    # -- FSDP2's extension hooks --------------------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """The local streams to all-gather, and what post needs besides them (the replicated offset and tables).

        With one rank FSDP2 skips the all-gather and copies only the first input (torch 2.13,
        FSDPParamGroup.wait_for_unshard), so then the streams travel as one byte tensor, cut apart again by post."""
        streams = self.streams()
        metadata = (tuple(outer_size), self.dtype, self.code, self.code2, self.offset, self.blocksize, self.quant_type,
                    [(t.dtype, t.numel()) for t in streams])
        if mesh.size() == 1:
            return (torch.cat([t.view(torch.uint8) for t in streams]),), metadata
        return streams, metadata

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        """Wrap the gathered streams (rank 0's bytes, then rank 1's, ...) as the whole weight.

        FSDP2 calls this once with out=None and keeps what it returns; afterwards it refills the same output
        tensors in place before each forward and backward, and frees them after (reshard_after_forward)."""
        shape, dtype, code, code2, offset, blocksize, quant_type, layout = metadata
        buffers = tuple(outputs)  # what FSDP2 frees and reallocates: for one rank the byte tensor, not its views
        if len(outputs) < len(layout):  # one rank: one byte tensor, views of it cut at the streams' byte lengths
            streams, start = [], 0
            for stream_dtype, numel in layout:
                length = numel * stream_dtype.itemsize
                streams.append(outputs[0][start:start + length].view(stream_dtype))
                start += length
            outputs = tuple(streams)
        if out is not None:
            if any(o.untyped_storage().data_ptr() != s.untyped_storage().data_ptr()
                   for o, s in zip(outputs, out.streams())):
                raise RuntimeError("FSDP2 all-gathered into other buffers than the Weight4bit it was given")
            return None
        gathered = Weight4bit(shape, dtype, outputs[0], outputs[1], code, blocksize, quant_type,
                              outputs[2] if len(outputs) > 2 else None, code2, offset)
        return gathered, buffers

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        handler = _OPS.get(func)
        if handler is None:
            raise NotImplementedError(
                f"{func} is not defined on a Weight4bit (a 4-bit weight held as its quantized bytes): dequantize() "
                "it first. Only FSDP2's sharding operations and dequantization work on it")
        return handler(*args, **(kwargs or {}))


def _split(weight: Weight4bit, split_size: int, dim: int = 0):
    """torch.chunk along the rows: split_size rows a piece, the last may have fewer."""
    if dim != 0:
        raise NotImplementedError(f"a Weight4bit is sharded along dim 0 (rows), not dim {dim}")
    rows = weight.shape[0]
    return [weight._rows(start, min(start + split_size, rows)) for start in range(0, rows, split_size)]


def _slice(weight: Weight4bit, dim: int = 0, start=None, end=None, step: int = 1):
    rows = weight.shape[0]
    start, end = max(0, start or 0), min(rows, rows if end is None else end)
    if dim != 0 or step != 1:
        raise NotImplementedError(f"a Weight4bit is cut along dim 0 in steps of 1, not dim {dim} step {step}")
    return weight._rows(start, end)


def _new_zeros(weight: Weight4bit, size, **kwargs):
    """An all-zero Weight4bit of `size` rows (FSDP2 pads a shard with it before copying the shard in)."""
    cols = prod(weight.shape[1:])
    n = prod(size)
    if n % cols or (size and prod(size[1:]) != cols):
        raise NotImplementedError(f"new_zeros({list(size)}) of a Weight4bit of shape {tuple(weight.shape)}: only "
                                  "whole rows")
    streams = {"codes": weight.codes.new_zeros(n // 2),
               "absmax": weight.absmax.new_zeros(-(-n // weight.blocksize))}
    if weight.nested:
        streams["absmax2"] = weight.absmax2.new_zeros(-(-n // (weight.blocksize * NESTED_BLOCKSIZE)))
        streams["offset"] = weight.offset.clone()
    return weight._with(tuple(size), **streams)


def _copy_(dest: Weight4bit, source, non_blocking: bool = False):
    if not isinstance(source, Weight4bit) or source.shape != dest.shape or source.nested != dest.nested:
        raise NotImplementedError("a Weight4bit copies only from a Weight4bit of its shape and kind (quantize the "
                                  "dense weight with Weight4bit.quantize instead)")
    for d, s in zip(dest.streams(), source.streams()):
        d.copy_(s)
    if dest.nested:
        dest.offset.copy_(source.offset)
    return dest


def _view(weight: Weight4bit, size):
    size = list(size)
    if -1 in size:
        size[size.index(-1)] = weight.numel() // max(1, -prod(size))
    if prod(size) != weight.numel():
        raise RuntimeError(f"cannot view a Weight4bit of shape {tuple(weight.shape)} as {size}")
    return weight._with(tuple(size))


def _as_strided(weight: Weight4bit, size, stride, storage_offset=0):
    """Only the contiguous view of the same values under another shape (FSDP2's unsharded parameter)."""
    contiguous = [prod(size[i + 1:]) for i in range(len(size))]
    if prod(size) != weight.numel() or list(stride) != contiguous or storage_offset:
        raise NotImplementedError(f"as_strided({list(size)}, {list(stride)}, {storage_offset}) of a Weight4bit: "
                                  "only contiguous views of all its values")
    return weight._with(tuple(size))


_OPS = {
    aten.split.Tensor: _split,
    aten.slice.Tensor: _slice,
    aten.new_zeros.default: _new_zeros,
    aten.copy_.default: _copy_,
    aten.view.default: _view,
    aten.as_strided.default: _as_strided,
    aten.detach.default: lambda w: w._with(),
}


class ShardableQLoRALinear(QLoRALinear):
    """QLoRALinear whose frozen 4-bit base is one parameter, `weight`, a Weight4bit: FSDP2 shards it by rows.

    Same forward and backward as QLoRALinear (LoRAMatmul, dequantizing in both passes); the base comes from
    whatever `self.weight` is when the forward runs: the whole Weight4bit, which FSDP2 has just all-gathered
    (or which was never sharded). The LoRA adapters and the bias are ordinary parameters that FSDP2 shards
    like any other.
    """

    @classmethod
    def from_qlora(cls, layer: QLoRALinear) -> "ShardableQLoRALinear":
        """Move a QLoRALinear's quantized buffers into one Weight4bit parameter, in place; returns the layer.

        In place (the class is switched), so the adapters, their initial values and every setting stay those of
        the layer that prepare_model made: a sharded run starts from the single-process run's exact numbers."""
        if type(layer) is not QLoRALinear:
            raise TypeError(f"from_qlora takes a QLoRALinear, got {type(layer).__name__}")
        weight = Weight4bit.from_quantized(layer.weight_packed, layer.quant_state())
        for name in ("weight_packed", "absmax", "code", "absmax_offset", "absmax2", "code2"):
            layer._buffers.pop(name, None)
        layer.__class__ = cls
        layer.weight = nn.Parameter(weight, requires_grad=False)
        return layer

    def quant_state(self) -> QuantState:
        return self._whole_weight().quant_state()

    def _whole_weight(self) -> Weight4bit:
        weight = self.weight
        if not isinstance(weight, Weight4bit):  # a DTensor shard: FSDP2 did not all-gather before this call
            raise RuntimeError(f"{type(self).__name__}.weight is {type(weight).__name__}, a shard: run the layer inside "
                               "its fully_shard-ed module's forward (or call module.unshard() first)")
        return weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features, self.compute_dtype, type(self).__name__)
        weight = self._whole_weight()
        return self.lora_forward(x, (weight.packed(), weight.quant_state()), self.bias)

    def base_weight(self) -> torch.Tensor:
        with torch.no_grad():
            return self._whole_weight().dequantize().to(self.compute_dtype)

    def memory_breakdown(self) -> dict:
        """Bytes this process holds for the layer, by part (QLoRALinear's keys): a shard's, once sharded."""
        weight = _local(self.weight)
        parts = {"packed_weight": weight.codes, "absmax": weight.absmax, "absmax_offset": weight.offset,
                 "absmax2": weight.absmax2, "code_tables": [weight.code, weight.code2], "bias": self.bias,
                 "lora_A": self.lora_A.weight, "lora_B": self.lora_B.weight}
        breakdown = {}
        for part, tensors in parts.items():
            tensors = [_local(t) for t in (tensors if isinstance(tensors, list) else [tensors]) if t is not None]
            if tensors:
                breakdown[part] = sum(t.numel() * t.element_size() for t in tensors)
        breakdown["total"] = sum(breakdown.values())
        return breakdown


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor: the local shard of a DTensor, the tensor itself otherwise."""
    return tensor._local_tensor if isinstance(tensor, DTensor) else tensor


def make_shardable(model: nn.Module) -> list:
    """Turn every QLoRALinear of a prepared model into a ShardableQLoRALinear, in place; returns their names."""
    names = [n for n, m in model.named_modules() if type(m) is QLoRALinear]
    for name in names:
        ShardableQLoRALinear.from_qlora(model.get_submodule(name))
    return names
