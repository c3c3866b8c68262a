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


def _spec(v):
    if isinstance(v, torch.Tensor):
        return v.dtype, v.data_ptr() % 16 == 0
    if isinstance(v, bool):
        return "b"
    if isinstance(v, int):
        return v == 1, v % 16 == 0, -(1 << 31) <= v < (1 << 31)
    if isinstance(v, float):
        return "f"
    if v is None:
        return None
    raise TypeError(f"nf4moe.kernels.launch: no specialisation rule for a {type(v).__name__} argument")


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
    key = (kernel, torch.cuda.current_device(), tuple(_spec(a) for a in args), tuple(kwargs.items()))
    compiled = _COMPILED.get(key)
    if compiled is None:
        _COMPILED[key] = kernel[grid](*args, **kwargs)
        return
    names = kernel.arg_names
    full = list(args) + [kwargs[n] for n in names[len(args):]]  # every parameter in order, constexprs too
    g = grid(kwargs) if callable(grid) else grid
    compiled[(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)](*full)
