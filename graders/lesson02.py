"""Lesson 2's checkers (graders.harness says how every checker reports). What the learner's functions take and
return:

- check_nf4_codebook(nf4_codebook)
      nf4_codebook(offset) -> 16 float32 levels, ascending, from -1.0 to 1.0
"""

import torch

from .harness import _call, _Fail, _run, _tensor

__all__ = ["check_nf4_codebook"]


def _bnb_nf4_table():
    """bitsandbytes' NF4 table (float32, CPU), or None when bitsandbytes is not installed."""
    try:
        import bitsandbytes.functional as bnbF
    except Exception:  # not installed, or it fails to load: check against qlora_ref only
        return None
    return bnbF.get_4bit_type("nf4", device="cpu").float()


def _nf4_float64(offset):
    """The NF4 formula evaluated in float64 throughout (NOT bitsandbytes' table: used to recognise it)."""
    import numpy as np
    from scipy.stats import norm

    levels = np.concatenate([norm.ppf(np.linspace(offset, 0.5, 9)[:-1]), -norm.ppf(np.linspace(offset, 0.5, 8)[:-1]), [0.0]])
    levels = np.sort(levels)
    return torch.tensor(levels / levels.max(), dtype=torch.float32)


def _bits_differ(expected, got):
    """Indices where the float32 bit patterns differ (so -0.0 is not 0.0)."""
    return (expected.view(torch.int32) != got.view(torch.int32)).nonzero().reshape(-1)


def check_nf4_codebook(nf4_codebook) -> bool:
    """Check `nf4_codebook(offset) -> 16 float32 levels` bit for bit: against bitsandbytes' NF4 table
    (get_4bit_type("nf4"), when bitsandbytes is installed) and qlora_ref.nf4_codebook at offset 0.9677083,
    and against qlora_ref.nf4_codebook at offset 0.99. Prints one line; True on success."""
    from qlora_ref.codebooks import NF4_OFFSET
    from qlora_ref.codebooks import nf4_codebook as reference

    def one(offset, expected, source):
        got = _tensor(_call(nf4_codebook, offset), "the codebook")
        label = f"offset {offset}"
        if got.numel() != 16:
            hint = "NF4 has 16 levels: 8 positive, 7 negative and an exact 0 (linspace(offset, 0.5, 9)[:-1] and linspace(offset, 0.5, 8)[:-1])"
            raise _Fail(f"expected 16 levels, got {got.numel()} ({label})", hint)
        got = got.reshape(-1)
        if got.dtype != torch.float32:
            raise _Fail(f"expected float32 levels, got {got.dtype} ({label})",
                        "bitsandbytes' table is float32: torch.tensor(levels, dtype=torch.float32) before dividing by the max")
        differ = _bits_differ(expected, got)
        if differ.numel() == 0:
            return
        idx = int(differ[0])
        line = (f"MISMATCH with {source} ({label}): {differ.numel()} of 16 levels differ, first at index {idx}: "
                f"expected {float(expected[idx]):.9g}, got {float(got[idx]):.9g}")
        if not bool((got[1:] >= got[:-1]).all()):
            hint = "sort the levels ascending: code 0 is -1.0, code 7 is 0.0, code 15 is 1.0"
        elif float(got.max()) != 1.0 or float(got.min()) != -1.0:
            hint = "normalise: divide every level by the largest one (so they span [-1, 1])"
        elif _bits_differ(_nf4_float64(offset), got).numel() == 0:
            hint = ("this is the float64 derivation, which differs from bitsandbytes' table in a few float32 steps: "
                    "take the probabilities as float32 (torch.linspace(offset, 0.5, 9)), apply norm.ppf, "
                    "convert to float32, sort, then divide by the max in float32")
        elif bool(torch.allclose(got, expected, rtol=0, atol=1e-6)):
            hint = ("close but not bit for bit: probabilities from torch.linspace (float32), norm.ppf (float64), "
                    "then a float32 tensor divided by its max in float32")
        else:
            hint = ("positives: norm.ppf(torch.linspace(offset, 0.5, 9)[:-1]), negatives: -norm.ppf(torch.linspace(offset, 0.5, 8)[:-1]), "
                    "plus 0; sort and divide by the max")
        raise _Fail(line, hint)

    def body():
        table = _bnb_nf4_table()
        if table is not None:
            one(NF4_OFFSET, table, "bitsandbytes' table")
        else:
            one(NF4_OFFSET, reference(NF4_OFFSET), "qlora_ref.nf4_codebook")
        one(0.99, reference(0.99), "qlora_ref.nf4_codebook")
        if table is None:
            return "equal to qlora_ref.nf4_codebook, bit for bit (bitsandbytes is not installed: not compared with it)"
        return "equal to bitsandbytes' table, bit for bit (and to qlora_ref at offset 0.99)"

    return _run("check_nf4_codebook", body)
