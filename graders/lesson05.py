"""Lesson 5's checkers (graders.harness says how every checker reports). What the learner's functions take and
return:

- check_dequantize_kernel(kernel)
      a @triton.jit kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr)
      on the grid (cdiv((n + 1) // 2, TILE),), run in Triton's interpreter on CPU tensors (no GPU needed);
      launch_dequantize_kernel(kernel, packed, state, tile) runs it the same way on a quantize_4bit state.
"""

import torch

from .harness import _Fail, _first_mismatch, _mismatch_line, _NotImplemented, _run, _time_limit

__all__ = ["check_dequantize_kernel", "launch_dequantize_kernel"]


def _kernel_cases():
    """(label, x, quant_type, blocksize, TILE): odd counts, short last blocks, several programs, fp16 output."""
    g = torch.Generator().manual_seed(0)
    return [
        ("99 float32 values, NF4, blocks of 32, TILE 16 (4 programs)", torch.randn(99, generator=g), "nf4", 32, 16),
        ("1,000 float16 values, NF4, blocks of 64, TILE 64 (a short last block)",
         torch.randn(1000, generator=g).half(), "nf4", 64, 64),
        ("a 24x40 float32 matrix, FP4, blocks of 128, TILE 32", torch.randn(24, 40, generator=g) * 0.02, "fp4", 128, 32),
        ("333 float16 values, NF4, blocks of 64, TILE 256 (one program)", torch.randn(333, generator=g).half(), "nf4", 64, 256),
    ]


def _interpreted(kernel):
    """`kernel` as Triton's interpreter runs it (what @triton.jit gives under TRITON_INTERPRET=1)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, InterpretedFunction):
        return kernel
    if not isinstance(kernel, JITFunction):
        raise _Fail(f"expected a Triton kernel, got {type(kernel).__name__}", "decorate the kernel with @triton.jit")
    return InterpretedFunction(kernel.fn)


def _launch_guarded(kernel, packed, absmax, code, n, blocksize, dtype, tile):
    """Run the kernel in Triton's interpreter on CPU tensors with NaN past the end of the output (to see
    stores out of bounds) and spare bytes past the end of the inputs (so that an unmasked load reads
    memory that exists). Returns the output buffer, guard included."""
    from triton.runtime.errors import InterpreterError

    guard = 2 * tile
    n_bytes = (n + 1) // 2
    packed_buf = torch.cat([packed.reshape(-1), torch.full((guard,), 0xFF, dtype=torch.uint8)])
    absmax_buf = torch.cat([absmax.reshape(-1).float(), torch.zeros(guard)])
    out = torch.full((n + 2 * guard,), float("nan"), dtype=dtype)
    grid = ((n_bytes + tile - 1) // tile,)
    try:
        with _time_limit(kernel):
            _interpreted(kernel)[grid](packed_buf, absmax_buf, code.float(), out, n, BLOCKSIZE=blocksize, TILE=tile)
    except InterpreterError as err:
        cause = err.__cause__
        if isinstance(cause, NotImplementedError):
            name = getattr(getattr(kernel, "fn", kernel), "__name__", "your kernel")
            raise _NotImplemented(cause, name)
        if isinstance(cause, RuntimeError) and "outside of the scope of a kernel" in str(cause):
            raise _Fail("your kernel calls another @triton.jit function, which this checker cannot interpret",
                        "write the steps inline in the kernel (or define everything after setting TRITON_INTERPRET=1, as lesson 5 does)")
        raise
    return out


def launch_dequantize_kernel(kernel, packed, state, tile: int = 64) -> torch.Tensor:
    """Run a learner's 4-bit dequantize kernel on a qlora_ref state, in Triton's interpreter on the CPU.

    The launch: grid = (cdiv((n + 1) // 2, tile),), kernel[grid](packed, state.absmax, state.code, out, n,
    BLOCKSIZE=state.blocksize, TILE=tile), out of state.dtype; returns out in state.shape.
    """
    if state.nested:
        raise ValueError("the exercise kernel takes a plain state: quantize with double_quant=False")
    n = state.numel
    out = _launch_guarded(kernel, packed.cpu(), state.absmax.cpu(), state.code.cpu(), n, state.blocksize, state.dtype, tile)
    return out[:n].reshape(state.shape)


def _bnb_dequantize_4bit(x, quant_type, blocksize):
    """bitsandbytes' (packed, dequantized values) for x, or None when bitsandbytes is not installed. The values
    come from its portable decoder, the same on every CPU (its native one depends on the CPU: qlora_ref.bnb_cpu)."""
    try:
        import bitsandbytes.functional as bnbF
    except Exception:
        return None
    from qlora_ref.bnb_cpu import dequantize_4bit_portable

    packed, state = bnbF.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    return packed, dequantize_4bit_portable(packed, state)


def check_dequantize_kernel(kernel) -> bool:
    """Check a Triton 4-bit dequantize kernel (lesson 5) against qlora_ref.dequantize_4bit and bitsandbytes.

    kernel(packed_ptr, absmax_ptr, code_ptr, out_ptr, n, BLOCKSIZE: tl.constexpr, TILE: tl.constexpr), launched
    on grid (cdiv((n + 1) // 2, TILE),): program p turns packed bytes p*TILE .. p*TILE + TILE - 1 into values,
    out[2j] = code[byte_j >> 4] * absmax[2j // BLOCKSIZE] and out[2j + 1] = code[byte_j & 0xF] * absmax[...],
    multiplied in float32 and stored in out's dtype (float32 or float16), nothing stored at or past out[n].
    It runs in Triton's interpreter on CPU tensors (any machine, no GPU) on four inputs: odd counts, short
    last blocks, NF4 and FP4. The values must equal qlora_ref's bit for bit, and bitsandbytes' portable
    decoder's where it is installed. Prints one line; True on success.
    """
    from qlora_ref.blockwise import unpack_4bit
    from qlora_ref.fourbit import dequantize_4bit, quantize_4bit

    def body():
        bnb_seen = False
        for case, x, quant_type, blocksize, tile in _kernel_cases():
            n = x.numel()
            packed, state = quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
            expected = dequantize_4bit(packed, state).reshape(-1)
            out = _launch_guarded(kernel, packed, state.absmax, state.code, n, blocksize, x.dtype, tile)

            past = out[n:]
            if not bool(past.isnan().all()):
                first = n + int((~past.isnan()).nonzero()[0])
                raise _Fail(f"the kernel stored past the end ({case}): value index {first} of a tensor of {n}",
                            "mask the stores: 2*offs < n for the even values and 2*offs + 1 < n for the odd ones "
                            "(an odd n has no last odd value)")
            got = out[:n]
            unwritten = got.isnan()
            if bool(unwritten.any()):
                first = int(unwritten.nonzero()[0])
                hint = "store every value: the even one at out_ptr + 2*offs, the odd one at out_ptr + 2*offs + 1"
                if first >= 2 * tile:
                    hint = f"each program owns its own bytes: offs = tl.program_id(0) * TILE + tl.arange(0, TILE) (value {first} is in program {first // (2 * tile)})"
                raise _Fail(f"{int(unwritten.sum()):,} of {n:,} values were never stored ({case}), first at index {first}", hint)

            references = [("qlora_ref.dequantize_4bit", expected)]
            bnb = _bnb_dequantize_4bit(x, quant_type, blocksize)
            if bnb is not None and torch.equal(bnb[0], packed):  # the same bytes: its values are a second reference
                bnb_seen = True
                references.append(("bitsandbytes' portable dequantize_4bit", bnb[1].reshape(-1)))
            found = None
            for reference, values in references:
                found = _first_mismatch(values, got)
                if found:
                    break
            if found:
                codes = unpack_4bit(packed, n + n % 2)
                per_value = state.absmax.repeat_interleave(blocksize)[:n]
                code = state.code
                swapped = torch.stack([codes[1::2], codes[0::2]], dim=1).reshape(-1)[:n]
                # the block of byte j taken as j // BLOCKSIZE instead of 2j // BLOCKSIZE
                block_of_byte = state.absmax.repeat_interleave(blocksize)[: (n + 1) // 2].repeat_interleave(2)[:n]
                candidates = [
                    (code[swapped] * per_value,
                     "nibble order: the high nibble (byte >> 4) is the even value 2j, the low nibble (byte & 0xF) the odd one"),
                    (codes[:n].float() * per_value,
                     "the nibble is an index into the table: tl.load(code_ptr + nibble), not the nibble itself"),
                    (code[codes[:n]] * block_of_byte,
                     "byte j holds values 2j and 2j + 1: its block is (2 * offs) // BLOCKSIZE, not offs // BLOCKSIZE"),
                    (code[codes[:n]].to(x.dtype) * per_value.to(x.dtype),
                     "multiply in float32 (code and absmax are float32) and convert once, when storing"),
                ]
                hint = ("out[2j] = code[byte_j >> 4] * absmax[2j // BLOCKSIZE], out[2j + 1] = code[byte_j & 0xF] * the same "
                        "absmax, in float32")
                for candidate, candidate_hint in candidates:
                    if torch.equal(candidate.to(x.dtype).float(), got.float()):
                        hint = candidate_hint
                        break
                raise _Fail(_mismatch_line(f"the values vs {reference}", case, found, n), hint)
        versus = "qlora_ref.dequantize_4bit and bitsandbytes' portable dequantize_4bit" if bnb_seen else "qlora_ref.dequantize_4bit"
        return f"equal to {versus}, exactly (4 cases: odd counts, short last blocks, NF4 and FP4, float32 and float16)"

    return _run("check_dequantize_kernel", body)
