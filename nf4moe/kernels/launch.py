"""One launch path for every nf4moe kernel: traced, interpreted, or a cached direct launch.

Triton's ``JITFunction.run`` rebuilds its compilation key on every call (argument binding, specialisation,
knob and hook checks): measured on an H100 host it was half of the host time of an eager layer call
(cProfile, bench/profile_host.py), and eager calls at small T are host-bound.  ``launch`` keys the compiled
kernel by everything Triton specialises a launch on, computed here from the arguments, and launches that
compiled kernel directly on later calls:

- a tensor: its dtype and whether its address is a multiple of 16 (Triton's pointer divisibility hint);
- an int: whether it equals 1 (then a compile-time constant), is a multiple of 16 (divisibility hint), and
  fits in int32 (else an int64 argument); a bool and a float: their type; None: itself;
- keyword arguments (constexprs and compile options such as num_warps): their values;
- the current CUDA device (a loaded kernel belongs to one device).

This is at least as fine as Triton's own key, so a cached kernel is only reused where Triton would reuse it.
The first launch of a key goes through Triton (which compiles or finds the kernel and returns it).
"""
from __future__ import annotations

import torch

from .configs import interpreting

_COMPILED: dict = {}  # (kernel, device, argument specialisation, keyword arguments) -> compiled kernel


_I32 = range(-(1 << 31), 1 << 31)


def _spec(args) -> tuple:
    """Triton's specialisation of positional ``args`` (module docstring); one loop, no call per argument."""
    out = []
    for v in args:
        t = type(v)
        if t is int:
            out.append((v == 1, v % 16 == 0, v in _I32))
        elif t is float:
            out.append("f")
        elif isinstance(v, torch.Tensor):
            out.append((v.dtype, v.data_ptr() % 16 == 0))
        elif t is bool:
            out.append("b")
        elif v is None:
            out.append(None)
        else:
            raise TypeError(f"nf4moe.kernels.launch: no specialisation rule for a {t.__name__} argument")
    return tuple(out)


def launch(kernel, grid, launcher, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: through ``launcher`` (``wrap_triton``) when traced, plainly under
    the interpreter, else from the compiled-kernel cache.  ``kernel`` is a plain ``triton.jit`` function
    (not an autotuner: configs.launch_tuned resolves the config first); ``grid`` a tuple or a function of
    the keyword arguments (Triton's meta dict)."""
    if launcher is not None:
        launcher(kernel)[grid](*args, **kwargs)
        return
    if interpreting():
        kernel[grid](*args, **kwargs)
        return
    key = (kernel, torch.cuda.current_device(), _spec(args), tuple(kwargs.items()))
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = kernel[grid](*args, **kwargs)
        return
    names = kernel.arg_names
    full = list(args) + [kwargs[n] for n in names[len(args):]]  # every parameter in order, constexprs too
    g = grid(kwargs) if callable(grid) else grid
    compiled[(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)](*full)
