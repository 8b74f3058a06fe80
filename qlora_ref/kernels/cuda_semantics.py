"""What bitsandbytes' CUDA quantize kernels compute, written in PyTorch: the spec of the Triton kernels.

bitsandbytes 0.50.2 makes different bytes on a CPU and on a CUDA GPU. `qlora_ref.quantize_4bit` and
`qlora_ref.quantize_blockwise` reproduce the CPU bytes; this module reproduces the GPU bytes, step by
step as csrc/kernels.cu does them (kQuantizeBlockwise, kQuantizeBlockwiseSmall, dQuantizeNF4,
dQuantizeFP4, dQuantize<0>), compiled as bitsandbytes compiles them: with `--use_fast_math`. Read
from the sm_90 machine code of libbitsandbytes_cuda130.so (nvdisasm): every float operation is
`.FTZ`, and 1.0f / absmax is one `MUFU.RCP`.

The CUDA recipe, per block of B values (the last block padded with zeros)
-------------------------------------------------------------------------
    ftz(v)     = v, or a zero of v's sign when |v| < 2^-126             (flush to zero: denormals are 0)
    absmax     = max_i ftz(|x_i|)                                        FMNMX.FTZ; an all-zero block gives 0
    inv        = rcp(absmax)                                             MUFU.RCP: 1/0 = inf
    u_i        = ftz(ftz(x_i) * inv)                                     FMUL.FTZ; no clamp to [-1, 1]
    4-bit:       q_i = dQuantizeNF4(u_i) / dQuantizeFP4(u_i)            `x > t` decision trees, float32 t
    8-bit:       q_i = dQuantize<0>(code, u_i)                           binary search over the 256 levels
    byte_j     = q_{2j} << 4 | q_{2j+1}                                  odd n: the pad nibble is q(0 * inv)

Where the two flavours of bitsandbytes part (the CPU path in parentheses):
  * An all-zero block: 0 * inf = NaN, and every tree sends NaN to code 0 (NF4 -1.0, FP4 +0.0; the
    8-bit search ends at index 0). (CPU: the code of 0.0.) The pad nibble of an odd n in such a block: 0 too.
  * The short last block: multiplied by the reciprocal like every block, absmax stored as it is.
    (CPU: divided, and its absmax stored after a clamp to 1e-38.)
  * Thresholds: the trees' hard-coded float literals. nvcc rounds each decimal literal straight to
    float32; four NF4 literals lie so close to halfway between two float32 numbers that going through
    float64 first (Python's float) would round them the other way. NF4_THRESHOLDS below are the float32
    values found in the machine code. They are not all the float32 midpoints of the NF4 table. (CPU:
    torch.bucketize on the float32 midpoints.)
  * 8-bit: the binary search's own midpoints (upper + val) * 0.5 and its tie rules (CPU: a 65536-point table).
  * Denormals are flushed (CPU: not).
  * The reciprocal: MUFU.RCP is an approximation (PTX promises 1 ulp). On an H100 it differs from the
    correctly rounded 1/x for 1,108,522 of the 2^23 float32 significands (13%), always by one ulp.
    `reciprocal` below computes the correctly rounded 1/x on the CPU; on a CUDA tensor it runs the GPU's
    own instruction (through a one-line Triton kernel), so the model is exact there. The CPU model still
    gave bitsandbytes' CUDA bytes for all 4.2M NF4/FP4 codes of a random 1024 x 4096 weight (and its
    nested absmax codes); 2 of its 4.2M 8-bit codes differed.
  * Double quantization: offset = absmax.mean() is torch's mean on the GPU (a different summation order
    from the CPU's), then the 8-bit CUDA quantizer with blocksize 256.
"""

import torch

from ..backend import triton_available
from ..codebooks import codebook_4bit, dynamic_map
from ..state import QuantState

FLT_MIN = 2.0**-126  # the smallest normal float32

# The thresholds of dQuantizeNF4's tree, sorted, as float32 (from the sm_90 machine code). The tree
# returns how many of them lie strictly below u. bitsandbytes writes them as float literals, e.g.
# `0.8614784181118011f`: nvcc's float32 is 0.86147838830947875977; float(0.8614784181118011) rounded
# again to float32 would be 0.86147844791412353516.
NF4_THRESHOLDS = (
    -0.84809643030166625977, -0.61063289642333984375, -0.459995269775390625, -0.33967941999435424805,
    -0.23460739850997924805, -0.13791173696517944336, -0.045525018125772476196, 0.039790149778127670288,
    0.12025525420904159546, 0.20352125167846679688, 0.29201376438140869141, 0.38931253552436828613,
    0.50166338682174682617, 0.64278692007064819336, 0.86147838830947875977,
)
# dQuantizeFP4 compares |u| with these (sorted) and maps the rank r = #{t < |u|} to bits 0-2 by
# FP4_RANK_TO_BITS; bit 3 is the sign (u < 0, after the flush: -0.0 counts as positive).
FP4_THRESHOLDS = (
    0.0026041700039058923721, 0.0859375, 0.20833332836627960205, 0.2916666567325592041,
    0.4166666865348815918, 0.58333301544189453125, 0.8333333134651184082,
)
FP4_RANK_TO_BITS = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)  # = r ^ ((r & 2) << 1)


def ftz(v: torch.Tensor) -> torch.Tensor:
    """Flush to zero: float32 denormals become a zero of the same sign (what every .FTZ instruction does)."""
    return torch.where(v.abs() < FLT_MIN, v * 0.0, v)


def reciprocal(absmax: torch.Tensor, hardware=None) -> torch.Tensor:
    """1.0f / absmax as the kernels compute it (MUFU.RCP, flush to zero): 1/0 = inf, a denormal result 0.

    hardware=None: the GPU's rcp.approx.ftz.f32 for CUDA tensors (when Triton is installed), the correctly
    rounded 1/x otherwise. The two can differ in the last bit (PTX only promises 1 ulp); on the CPU this
    function is a model of the instruction, exact wherever MUFU.RCP rounds correctly.
    """
    if hardware is None:
        hardware = absmax.is_cuda and triton_available()
    if hardware:
        from .quantize_4bit import hardware_reciprocal

        return hardware_reciprocal(absmax)
    absmax = ftz(absmax.float())
    return ftz(torch.where(absmax == 0, torch.full_like(absmax, float("inf")), 1.0 / absmax))


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |x| per block with denormals flushed (fmaxf(-FLT_MAX, fabsf(x)) over the block, .FTZ)."""
    return _blocks(ftz(flat.float()), blocksize).abs().amax(dim=1)


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """[blocks, blocksize] view of `flat`, the last block padded with zeros (as BlockLoad pads it)."""
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize)


def scale(flat: torch.Tensor, blocksize: int):
    """(u [blocks, blocksize], absmax): u = ftz(ftz(x) * rcp(absmax)), the zero padding included."""
    x = _blocks(ftz(flat.float()), blocksize)
    absmax = x.abs().amax(dim=1)
    return ftz(x * reciprocal(absmax)[:, None]), absmax


def nf4_tree(u: torch.Tensor) -> torch.Tensor:
    """dQuantizeNF4, transcribed: a binary tree of `u > t` tests (NaN fails each one: code 0)."""
    t = NF4_THRESHOLDS
    w = torch.where

    def leaf(i):  # the last test of a path: code 2i+1 if u > t[2i] else 2i
        return w(u > t[2 * i], 2 * i + 1, 2 * i)

    high = w(u > t[11], w(u > t[13], leaf(7), leaf(6)), w(u > t[9], leaf(5), leaf(4)))
    low = w(u > t[3], w(u > t[5], leaf(3), leaf(2)), w(u > t[1], leaf(1), leaf(0)))
    return w(u > t[7], high, low).to(torch.uint8)


def fp4_tree(u: torch.Tensor) -> torch.Tensor:
    """dQuantizeFP4, transcribed: sign bit (u < 0), then a tree on |u| (NaN: code 0)."""
    t = FP4_THRESHOLDS
    w = torch.where
    a = u.abs()
    bits = w(a > t[3],
             w(a > t[5], w(a > t[6], 0b011, 0b010), w(a > t[4], 0b101, 0b100)),
             w(a > t[1], w(a > t[2], 0b111, 0b110), w(a > t[0], 0b001, 0b000)))
    return (bits + w(u < 0, 0b1000, 0)).to(torch.uint8)


def pivot_search(u: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """dQuantize<0>: bitsandbytes' 8-bit rounding, a 7-step binary search and a midpoint test.

        pivot = 127, lower = -1, upper = 1; for i in 64, 32, ..., 1:
            if u > code[pivot]: lower = code[pivot], lower_pivot = pivot, pivot += i
            else:               upper = code[pivot], upper_pivot = pivot, pivot -= i
        val = code[pivot]  (the index ends in 0..254; 255 is only reached as upper_pivot)
        u > val:  upper_pivot if u > (upper + val) * 0.5 else pivot      a tie goes down
        u <= val: lower_pivot if u < (lower + val) * 0.5 else pivot      a tie goes up
    A NaN goes left every time and ends at 0. All float32, as on the GPU.
    """
    code = code.to(u.device, torch.float32)
    pivot = torch.full(u.shape, 127, dtype=torch.int64, device=u.device)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(u, -1.0), torch.full_like(u, 1.0)
    val = code[pivot]
    for i in (64, 32, 16, 8, 4, 2, 1):
        right = u > val
        lower_pivot, lower = torch.where(right, pivot, lower_pivot), torch.where(right, val, lower)
        upper_pivot, upper = torch.where(right, upper_pivot, pivot), torch.where(right, upper, val)
        pivot = torch.where(right, pivot + i, pivot - i)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    right = u > val
    up = torch.where(u > (upper + val) * 0.5, upper_pivot, pivot)
    down = torch.where(u < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(right, up, down).to(torch.uint8)


def quantize_4bit_codes(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """(packed [(n + 1) // 2, 1] uint8, absmax float32): bitsandbytes' CUDA 4-bit quantize of x."""
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"bitsandbytes' CUDA kernels quantize 'nf4' or 'fp4', got {quant_type!r}")
    flat = x.contiguous().reshape(-1)
    n = flat.numel()
    u, absmax = scale(flat, blocksize)
    codes = (nf4_tree if quant_type == "nf4" else fp4_tree)(u).reshape(-1)[: n + n % 2]  # pad nibble kept
    packed = ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)
    return packed, absmax


def quantize_blockwise_codes(x: torch.Tensor, code=None, blocksize: int = 256):
    """(codes uint8 in x's shape, absmax float32): bitsandbytes' CUDA 8-bit blockwise quantize of x."""
    code = dynamic_map() if code is None else code
    flat = x.contiguous().reshape(-1)
    u, absmax = scale(flat, blocksize)
    q = pivot_search(u.reshape(-1)[: flat.numel()], code)
    return q.reshape(x.shape), absmax


def quantize_blockwise(x: torch.Tensor, code=None, blocksize: int = 256):
    """(codes, QuantState) as bitsandbytes.functional.quantize_blockwise(x, code, blocksize) on a GPU."""
    code = dynamic_map() if code is None else code
    q, absmax = quantize_blockwise_codes(x, code, blocksize)
    state = QuantState(absmax=absmax, shape=x.shape, code=code.to(x.device, torch.float32), dtype=x.dtype,
                       blocksize=blocksize)
    return q, state


def dequantize_blockwise(q: torch.Tensor, state: QuantState) -> torch.Tensor:
    """bitsandbytes' CUDA 8-bit dequantize: ftz(code[q] * absmax) in float32 (FMUL.FTZ), cast to state.dtype."""
    flat = q.reshape(-1).long()
    absmax = state.absmax.to(q.device).repeat_interleave(state.blocksize)[: flat.numel()]
    return ftz(state.code.to(q.device)[flat] * absmax).to(state.dtype).reshape(q.shape)


def compress_absmax(absmax: torch.Tensor):
    """bitsandbytes' double quantization: offset = absmax.mean() (torch, on absmax's device), then the
    CUDA 8-bit quantize of absmax - offset in blocks of 256 with the signed dynamic map."""
    offset = absmax.mean()
    qabsmax, state2 = quantize_blockwise(absmax - offset, blocksize=256)
    return qabsmax, offset, state2


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4", double_quant: bool = False):
    """(packed, QuantState): what bitsandbytes.functional.quantize_4bit(x, blocksize, double_quant, quant_type)
    returns on a CUDA GPU, computed with torch on x's device (the CPU too)."""
    packed, absmax = quantize_4bit_codes(x, blocksize, quant_type)
    state = QuantState(absmax=absmax, shape=x.shape, code=codebook_4bit(quant_type).to(x.device), dtype=x.dtype,
                       blocksize=blocksize, quant_type=quant_type)
    if double_quant:
        state.absmax, state.offset, state.state2 = compress_absmax(absmax)
    return packed, state
