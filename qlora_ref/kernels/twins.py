"""A kernel module loaded a second time, with its kernels interpreted or compiled.

@triton.jit decides at decoration time whether a kernel is compiled or interpreted, through the
environment variable TRITON_INTERPRET. Setting it for the whole process would also turn kernels
meant for the GPU into interpreted ones; instead, whichever way a kernel module was loaded, CPU tensors
go to a copy of it loaded once with the variable set, CUDA tensors to a copy loaded with it unset (a
lesson that sets TRITON_INTERPRET=1 for its own kernels still runs the course's compiled on a GPU),
and `compile_ahead` uses the latter.
"""

import importlib.util
import os
import sys

from triton.runtime.interpreter import InterpretedFunction

_TWINS = {}


def interpreted(kernel) -> bool:
    """Whether `kernel` (a @triton.jit function) runs in Triton's interpreter: it was decorated under
    TRITON_INTERPRET=1. Each kernel module asks it once, as INTERPRETED, to know which of the twins it is."""
    return isinstance(kernel, InterpretedFunction)


def twin(name: str, path: str, interpret: bool, interpreted: bool):
    """Module `name` (file `path`) with TRITON_INTERPRET=1 (interpret=True) or =0.

    `interpreted` says how the calling module itself was loaded: asked for that, it is returned.
    """
    if interpret == interpreted:
        return sys.modules[name]
    key = (name, interpret)
    if key not in _TWINS:
        spec = importlib.util.spec_from_file_location(name + ("_interpreted" if interpret else "_compiled"), path)
        module = importlib.util.module_from_spec(spec)
        saved = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            spec.loader.exec_module(module)
        finally:
            if saved is None:
                del os.environ["TRITON_INTERPRET"]
            else:
                os.environ["TRITON_INTERPRET"] = saved
        _TWINS[key] = module
    return _TWINS[key]
