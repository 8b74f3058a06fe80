"""Lesson 6: LoRA, and the QLoRA linear layer (a frozen NF4 base plus trainable low-rank adapters).

A LoRA layer keeps the pretrained weight W0 [out, in] frozen and learns a low-rank correction:

    y = x W0^T + b + (alpha/r) · dropout(x) A^T B^T          A: [r, in], B: [out, r]

A starts random (kaiming_uniform with a = sqrt(5), PEFT's choice, so |A| <= 1/sqrt(in)) and B at zero,
so at step 0 the layer is exactly the pretrained one. With s = alpha/r, h = dropout(x) and g = dL/dy:

    dL/dx = g W0 + s · (g B A, pushed back through the dropout)
    dL/dA = s · B^T g^T h              [r, in]    (sums over every leading dimension of x)
    dL/dB = s · g^T (h A^T)            [out, r]
    dL/dW0: none, W0 is frozen

QLoRA (Dettmers et al., 2023) stores W0 only as NF4 codes with double-quantized constants (lesson 4:
about 4.127 bits per weight). `DequantizeMatmul` is the autograd function that makes this work: its
forward dequantizes W0^ to the compute dtype, multiplies, and lets the dense copy go; its backward
dequantizes again for dL/dx = g W0^ and returns no gradient for the codes. That is what
bitsandbytes' `MatMul4Bit` does. The layers themselves run `LoRAMatmul`, the same idea with the LoRA
branch inside the node, so that the low-rank product is added into the GEMM's output instead of
through [tokens, out] temporaries; its backward is the formulas above.

Names follow PEFT (`lora_A`, `lora_B`, `lora_dropout`, `scaling`) so that adapters move between the
two (see qlora_ref.adapters).
"""

import math
from numbers import Real
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backend import resolve_backend
from .fourbit import dequantize_4bit, quantize_4bit
from .state import QuantState
from .validation import FLOAT_DTYPES, check_blocksize

QUANT_TYPES = ("nf4", "fp4")


def check_lora_hyperparameters(r, alpha, dropout) -> None:
    """Raise unless r is a positive int, alpha a positive finite number and dropout in [0, 1)."""
    if isinstance(r, bool) or not isinstance(r, int):
        raise TypeError(f"r (the LoRA rank) must be an int, got {type(r).__name__} {r!r}")
    if r <= 0:
        raise ValueError(f"r (the LoRA rank) must be >= 1, got {r}")
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number (the scale is alpha/r), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")


def _check_input(x, in_features: int, dtype: torch.dtype, layer: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{layer} takes a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(
            f"{layer} expects inputs whose last dimension is in_features={in_features}, "
            f"got shape {tuple(x.shape)} (last dimension {x.shape[-1] if x.dim() else 'none'})"
        )
    if x.dtype != dtype:
        raise TypeError(
            f"{layer} computes in {dtype} but the input is {x.dtype}: convert the input with "
            f"x.to({dtype}) (or build the layer for {x.dtype})"
        )


class _LoRABranch(nn.Module):
    """The adapter part shared by both layers: lora_dropout, lora_A [r, in], lora_B [out, r], scaling."""

    def _init_lora(self, in_features, out_features, r, alpha, dropout, dtype, device):
        check_lora_hyperparameters(r, alpha, dropout)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"adapter_dtype must be a floating-point torch.dtype (the adapters are trained), got {dtype!r}")
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.dropout_p = r, alpha, float(dropout)
        self.scaling = alpha / r
        self.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(r, out_features, bias=False, dtype=dtype, device=device)
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def lora_forward(self, x: torch.Tensor, base, bias) -> torch.Tensor:
        """x W0^T + b + (alpha/r) · dropout(x) A^T B^T through LoRAMatmul (the LoRA products in the adapters'
        dtype, as PEFT: x is cast to A's dtype)."""
        h = self.lora_dropout(x)
        return LoRAMatmul.apply(x, None if h is x else h, base, bias, self.lora_A.weight, self.lora_B.weight,
                                self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) · B A in float32, the [out, in] correction that merging adds to W0."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, dropout={self.dropout_p}")


class LoRALinear(_LoRABranch):
    """A dense frozen nn.Linear plus LoRA: y = x W0^T + b + (alpha/r) · dropout(x) A^T B^T.

    Built from an nn.Linear, whose weight (and bias) it keeps, frozen, as its own `weight` and `bias`.
    The adapters are float32 unless `adapter_dtype` says otherwise.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self._init_lora(base.in_features, base.out_features, r, alpha, dropout, adapter_dtype, base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features, self.weight.dtype, "LoRALinear")
        return self.lora_forward(x, self.weight, self.bias)

    def base_weight(self) -> torch.Tensor:
        """W0 as stored (a frozen dense tensor)."""
        return self.weight.detach()


class DequantizeMatmul(torch.autograd.Function):
    """y = x W^T + b with W held as 4-bit codes; W is dequantized in the forward and again in the backward.

    Gradients: dL/dx = dL/dy W^ (dequantized anew, never saved), dL/db = dL/dy summed over the leading
    dimensions (only if the bias asks for one), and none for the codes or their state. Only the packed
    codes are saved for the backward, so no dense weight outlives either pass. This is bitsandbytes'
    MatMul4Bit written with lesson 4's dequantize_4bit.
    """

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        weight = dequantize_4bit(packed, state).to(x.dtype)  # temporary [out, in]: freed on return
        ctx.state = state
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(packed)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ dequantize_4bit(packed, ctx.state).to(grad_out.dtype)
        return grad_x, None, None, grad_bias


def _add_scaled_product(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scaling: float) -> torch.Tensor:
    """out + scaling · left @ right, with left [..., r] and right [r, n].

    Same dtype: one addmm into out, in place (the low-rank product added by the GEMM's epilogue, no
    [tokens, n] temporaries). Adapters in another dtype (float32 next to a bf16 base): computed in the
    adapters' dtype and rounded once to out's, as PEFT does.
    """
    if left.dtype == out.dtype:
        out.reshape(-1, out.shape[-1]).addmm_(left.reshape(-1, left.shape[-1]), right, alpha=scaling)
        return out
    return (out + (left @ right) * scaling).to(out.dtype)


class LoRAMatmul(torch.autograd.Function):
    """y = x W0^T + b + s · h A^T B^T as one autograd node (h = dropout(x), or x itself when h is None).

    `base` is W0 itself (a dense frozen tensor) or a pair (packed codes, QuantState) that is dequantized in
    the forward and again in the backward, as in DequantizeMatmul. With g = dL/dy (cast to the adapters'
    dtype for their products):

        forward:   xa = h A^T                         [..., r]   (saved: r numbers per token)
                   y  = x W0^T + b,  then y += s · xa B^T       (one addmm, in place)
        backward:  gB = g B                           [..., r]
                   dL/dB = s · g^T xa,   dL/dA = s · gB^T h
                   dL/dx = g W0 (+ s · gB A, added in place when h is x)

    Autograd on the plain formula would also write s · xa B^T, a [tokens, out] tensor, add it to y, and in
    the backward scale g and read it again: four extra passes over the largest tensor of the layer. This
    node makes none (see bench/results/layer-*.json). The arithmetic is the plain formula's when s is a power
    of two (alpha = 2r, PEFT's usual choice: scaling by it is exact).
    """

    @staticmethod
    def forward(ctx, x, h, base, bias, lora_A, lora_B, scaling):
        lora_in = x if h is None else h
        xa = F.linear(lora_in.to(lora_A.dtype), lora_A)
        y = _base_product(x, base, bias)
        y = _add_scaled_product(y, xa, lora_B.t(), scaling)
        # Saved: the dense W0 or the codes (their QuantState rides on ctx), never a dequantized weight.
        weight_or_codes, ctx.state = (base, None) if isinstance(base, torch.Tensor) else base
        ctx.h_is_x, ctx.scaling = h is None, scaling
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(weight_or_codes, lora_in, xa, lora_A, lora_B)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        weight_or_codes, lora_in, xa, lora_A, lora_B = ctx.saved_tensors
        base = weight_or_codes if ctx.state is None else (weight_or_codes, ctx.state)
        s = ctx.scaling
        g = grad_out.reshape(-1, grad_out.shape[-1])
        g_lora = g.to(lora_A.dtype)
        gB = g_lora @ lora_B  # [tokens, r]
        grad_x = grad_h = grad_bias = grad_A = grad_B = None
        if ctx.needs_input_grad[4]:
            grad_A = (gB.t() @ lora_in.reshape(-1, lora_in.shape[-1]).to(lora_A.dtype)).mul_(s)
        if ctx.needs_input_grad[5]:
            grad_B = (g_lora.t() @ xa.reshape(-1, xa.shape[-1])).mul_(s)
        if ctx.needs_input_grad[3]:
            grad_bias = g.sum(0).to(ctx.bias_dtype)
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ _base_weight(base, grad_out.dtype)
            if ctx.h_is_x:
                grad_x = _add_scaled_product(grad_x, gB.reshape(*grad_out.shape[:-1], -1), lora_A, s)
        if ctx.needs_input_grad[1]:
            grad_h = ((gB @ lora_A) * s).reshape(lora_in.shape).to(lora_in.dtype)
        return grad_x, grad_h, None, grad_bias, grad_A, grad_B, None


def _base_product(x: torch.Tensor, base, bias) -> torch.Tensor:
    """x W0^T + b. One token of a 4-bit W0 on a GPU (decoding) takes the fused GEMV, which reads the codes
    once and never writes W0^ (qlora_ref.kernels.gemv_4bit: 3x faster than dequantize + GEMV on 8192x28672,
    and more accurate than bitsandbytes'); everything else dequantizes W0^ and calls F.linear."""
    if (not isinstance(base, torch.Tensor) and x.numel() == x.shape[-1] and resolve_backend("auto", x) == "triton"
            and base[1].shape[-1] % base[1].blocksize == 0):  # the GEMV needs whole blocks in a row
        from .kernels.gemv_4bit import gemv_4bit_triton

        y = gemv_4bit_triton(x, *base)
        return y if bias is None else y.add_(bias)
    return F.linear(x, _base_weight(base, x.dtype), bias)


def _base_weight(base, dtype: torch.dtype) -> torch.Tensor:
    """W0 in `dtype`: the dense tensor, or a temporary dequantized from (packed, state)."""
    if isinstance(base, torch.Tensor):
        return base.to(dtype)
    packed, state = base
    return dequantize_4bit(packed, state).to(dtype)


class QLoRALinear(_LoRABranch):
    """A frozen 4-bit base (NF4 + double quantization by default) plus LoRA adapters.

    The base weight is quantized once from `base.weight` and kept only as buffers: `weight_packed`
    (uint8, two codes a byte), `absmax` (uint8 codes when double-quantized, else float32),
    `absmax_offset` and `absmax2` (the nested state), and the code tables `code` / `code2`. The layer
    holds no reference to the dense weight. Compute dtype: the input dtype the layer accepts and the
    output dtype (bf16 on Ampere+, fp16 on a T4, fp32 on a CPU); it defaults to the base's dtype.
    The bias, if any, stays dense and frozen. Adapters are float32 unless `adapter_dtype` says otherwise.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                 compute_dtype: Optional[torch.dtype] = None, blocksize: int = 64, quant_type: str = "nf4",
                 double_quant: bool = True, adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"QLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        compute_dtype = base.weight.dtype if compute_dtype is None else compute_dtype
        if compute_dtype not in FLOAT_DTYPES:
            raise ValueError(f"compute_dtype must be float32, float16 or bfloat16, got {compute_dtype}")
        if quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
        check_blocksize(blocksize)
        self.compute_dtype = compute_dtype
        self.blocksize, self.quant_type, self.double_quant = blocksize, quant_type, bool(double_quant)
        self.weight_dtype = base.weight.dtype
        with torch.no_grad():
            packed, state = quantize_4bit(base.weight.detach(), blocksize=blocksize, quant_type=quant_type,
                                          double_quant=double_quant)
        self.register_buffer("weight_packed", packed)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code", state.code)
        if state.nested:
            self.register_buffer("absmax_offset", state.offset.reshape(()))
            self.register_buffer("absmax2", state.state2.absmax)
            self.register_buffer("code2", state.state2.code)
            self.nested_blocksize = state.state2.blocksize
        self.bias = None if base.bias is None else nn.Parameter(
            base.bias.detach().to(compute_dtype), requires_grad=False)
        self._init_lora(base.in_features, base.out_features, r, alpha, dropout, adapter_dtype, base.weight.device)

    def quant_state(self) -> QuantState:
        """The QuantState of the base weight, rebuilt from the buffers (so .to(device) moves everything)."""
        state = QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                           code=self.code, dtype=self.weight_dtype, blocksize=self.blocksize,
                           quant_type=self.quant_type)
        if self.double_quant:
            state.offset = self.absmax_offset
            state.state2 = QuantState(absmax=self.absmax2, shape=self.absmax.shape, code=self.code2,
                                      dtype=torch.float32, blocksize=self.nested_blocksize)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features, self.compute_dtype, "QLoRALinear")
        return self.lora_forward(x, (self.weight_packed, self.quant_state()), self.bias)

    def base_weight(self) -> torch.Tensor:
        """W0^ dequantized, in the compute dtype: a fresh temporary, for merging and for references."""
        with torch.no_grad():
            return dequantize_4bit(self.weight_packed, self.quant_state()).to(self.compute_dtype)

    def memory_breakdown(self) -> dict:
        """Bytes of everything the layer keeps (its state_dict), by part, and their total.

        Keys: packed_weight, absmax, absmax_offset, absmax2 (the last two only when nested), code_tables,
        bias, lora_A, lora_B, total. Measured from the tensors themselves (numel * element_size).
        """
        tensors = self.state_dict()
        parts = {"packed_weight": ["weight_packed"], "absmax": ["absmax"], "absmax_offset": ["absmax_offset"],
                 "absmax2": ["absmax2"], "code_tables": ["code", "code2"], "bias": ["bias"],
                 "lora_A": ["lora_A.weight"], "lora_B": ["lora_B.weight"]}
        breakdown = {}
        for part, names in parts.items():
            present = [tensors[n] for n in names if n in tensors]
            if present:
                breakdown[part] = sum(t.numel() * t.element_size() for t in present)
        accounted = {n for names in parts.values() for n in names}
        unexpected = sorted(set(tensors) - accounted)
        assert not unexpected, f"memory_breakdown does not know the tensors {unexpected}"
        breakdown["total"] = sum(breakdown.values())
        return breakdown

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", quant_type={self.quant_type}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")
