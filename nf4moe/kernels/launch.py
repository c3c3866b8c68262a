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

import functools

import torch

from .configs import INTERPRET, current_device, graph_flag

_COMPILED: dict = {}  # (kernel, device, argument specialisation, keyword arguments) -> (compiled kernel, tail)


_U64 = 1 << 63  # Triton types ints in [2**63, 2**64) as u64, other ints beyond int32 as i64
_INTERPRET = INTERPRET  # fixed at import, as Triton's own choice of the interpreter (tests patch this name)
_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _spec(args) -> tuple:
    """Triton's specialisation of positional ``args`` (module docstring); one loop, no call per argument.
    Exact type tests first: ``isinstance`` against torch.Tensor goes through a metaclass hook (~0.3 us)."""
    out = []
    for v in args:
        t = type(v)
        if t is int:
            out.append((v == 1, not v % 16, -0x80000000 <= v <= 0x7FFFFFFF, v >= _U64))
        elif t in _TENSORS or isinstance(v, torch.Tensor):
            out.append((v.dtype, not v.data_ptr() % 16))
        elif t is float:
            out.append("f")
        elif t is bool:
            out.append("b")
        elif v is None:
            out.append(None)
        else:
            raise TypeError(f"nf4moe.kernels.launch: no specialisation rule for a {t.__name__} argument")
    return tuple(out)


def _check_call(kernel, args, kwargs) -> None:
    """What the key relies on (checked once per key, off the hot path): constexprs arrive by keyword (a
    positional one would be keyed as a runtime value), keyword values are plain scalars keyed by value (bool
    and int kept apart), and every parameter is given (later launches list them from ``kwargs``)."""
    names = kernel.arg_names
    constexprs = {p.name for p in kernel.params if p.is_constexpr}
    for name in names[:len(args)]:
        if name in constexprs:
            raise TypeError(f"nf4moe.kernels.launch: constexpr {name!r} of {kernel.__name__} passed positionally; "
                            "pass constexprs by keyword")
    for name, v in kwargs.items():
        if not (v is None or type(v) in (bool, int, float, str)):
            raise TypeError(f"nf4moe.kernels.launch: keyword argument {name!r} is a {type(v).__name__}; "
                            "keyword arguments must be constexpr scalars or compile options")
    missing = [n for n in names[len(args):] if n not in kwargs]
    if missing:
        raise TypeError(f"nf4moe.kernels.launch: {kernel.__name__} needs {missing} (defaults are not used)")
    flags = {n for n, v in kwargs.items() if type(v) is bool}
    if _FLAGS.setdefault(kernel, flags) != flags:
        raise TypeError(f"nf4moe.kernels.launch: {kernel.__name__} gets bool keyword arguments {sorted(flags)} here "
                        f"and {sorted(_FLAGS[kernel])} elsewhere (True and 1 share a key)")


_FLAGS: dict = {}  # kernel -> the keyword arguments it gets as bools (checked consistent across keys)


def launch(kernel, grid, launcher, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``: through ``launcher`` (``wrap_triton``) when traced, plainly under
    the interpreter, else from the compiled-kernel cache.  ``kernel`` is a plain ``triton.jit`` function
    (not an autotuner: configs.launch_tuned resolves the config first); runtime arguments come positionally,
    every constexpr and option by keyword (``_check_call``); ``grid`` is a tuple or a function of the keyword
    arguments only (not Triton's full meta dict)."""
    if launcher is not None:
        launcher(kernel)[grid](*args, **kwargs)
        return
    if _INTERPRET:
        kernel[grid](*args, **kwargs)
        return
    key = (kernel, current_device(), _spec(args), tuple(kwargs.items()))
    hit = _COMPILED.get(key)
    if hit is None:
        _check_call(kernel, args, kwargs)
        compiled = kernel[grid](*args, **kwargs)
        _COMPILED[key] = (compiled, [kwargs[n] for n in kernel.arg_names[len(args):]])
        return
    compiled, tail = hit  # tail: the parameters after ``args`` in order, constexprs too (fixed by the key)
    g = grid(kwargs) if callable(grid) else grid
    compiled[(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)](*args, *tail)


@functools.cache
def _pdl_capable(device_index: int) -> bool:
    """Programmatic dependent launch (griddepcontrol) needs sm_90 or newer (cached: a capability query per
    launch would cost host time)."""
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(t: torch.Tensor, launcher) -> bool:
    """``NF4MOE_PDL`` (default ``auto``: launches captured into a CUDA graph; 1: eager launches too; 0: none;
    configs.graph_flag; bench/NOTES.md v46, measured in session 19): direct launches on a CUDA device of sm_90 or
    newer of the kernels that take a ``PDL`` constexpr are programmatic dependent launches.  Measured on an H100
    (Qwen3-30B-A3B, CUDA-graph replays): T=1 0.0320 -> 0.0312 ms, T=16 0.2029 -> 0.1994, T=128 0.3094 -> 0.3060;
    eager calls, host-bound at these sizes, gained nothing and varied more, so they keep plain launches by
    default.  Not under the interpreter (no griddepcontrol) and not traced (``launcher``: Inductor launches the
    kernels itself)."""
    return (launcher is None and not _INTERPRET and t.is_cuda and graph_flag("NF4MOE_PDL", t)
            and _pdl_capable(t.device.index))


def pdl_options(t: torch.Tensor, launcher) -> dict:
    """The ``PDL`` constexpr (the kernel's wait, common.pdl_enter) and, for direct launches, Triton's
    ``launch_pdl`` option, always together: a kernel launched with PDL that did not wait first could read its
    predecessor's outputs before they exist.  ``t``: a tensor on the launch's device."""
    on = use_pdl(t, launcher)
    return {"PDL": on} if launcher is not None else {"PDL": on, "launch_pdl": on}
