"""Input checks shared by every quantizer (and the trainer): a learner's typo gets one sentence that names the problem."""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


def check_float_tensor(x, name: str = "x") -> None:
    """Raise unless `x` is a non-empty fp32/fp16/bf16 tensor with only finite values.

    bitsandbytes accepts NaN and Inf silently: a NaN makes its block's absmax NaN, an Inf makes it
    Inf, and either way the whole block dequantizes to NaN (NaN * code, or 0 * Inf; the Inf itself
    comes back as Inf). Neither is ever
    what a learner meant, so the reference refuses them and says where the first one is.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {x.dtype}; quantization takes float32, float16 or bfloat16 "
            f"(convert integers first, e.g. {name}.float())"
        )
    if x.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (a shape without values, e.g. a model built on device='meta'): "
                         "load its weights first")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}): there is nothing to quantize")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        flat_index = int((~finite).reshape(-1).nonzero()[0])
        bad = x.reshape(-1)[flat_index].item()
        count = int((~finite).sum())
        raise ValueError(
            f"{name} contains {count} non-finite value(s) (first: {bad} at flat index {flat_index}); "
            "an absmax scale cannot represent NaN or Inf"
        )


def check_blocksize(blocksize) -> None:
    """Raise unless `blocksize` is one of bitsandbytes' block sizes (powers of two, 32..4096)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def check_positive_int(value, name: str) -> int:
    """`value`, or a ValueError unless it is an int of at least 1 (True is not a count)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_bool(value, name: str) -> None:
    """Raise unless `value` is True or False: a string such as "False" is truthy, so it would mean the opposite."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_code_8bit(code) -> None:
    """Raise unless `code` is an 8-bit code: 256 float32 levels in ascending order (qlora_ref.dynamic_map())."""
    if not isinstance(code, torch.Tensor) or code.dtype != torch.float32 or code.shape != (256,):
        raise ValueError("code must be a float32 tensor of 256 levels (e.g. qlora_ref.dynamic_map())")
    if not bool((code[1:] >= code[:-1]).all()):
        raise ValueError("code must be sorted in ascending order")
