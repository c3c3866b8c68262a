"""One launch path for every nf4moe kernel: traced, interpreted, or a cached direct launch.

Triton's ``JITFunction.run`` rebuilds its compilation key on every call (argument binding, specialisation,
knob and hook checks): measured on an H100 host it was half of the host time of an eager layer call
(cProfile, lab/profile_host.py), and eager calls at small T are host-bound.  ``launch`` keys the compiled
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

import threading

import torch

from .host import INTERPRET

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
    key = (kernel, torch.cuda.current_device(), _spec(args), tuple(kwargs.items()))
    hit = _COMPILED.get(key)
    if hit is None:
        _check_call(kernel, args, kwargs)
        compiled = kernel[grid](*args, **kwargs)
        _COMPILED[key] = (compiled, [kwargs[n] for n in kernel.arg_names[len(args):]])
        return
    compiled, tail = hit  # tail: the parameters after ``args`` in order, constexprs too (fixed by the key)
    g = grid(kwargs) if callable(grid) else grid
    compiled[(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)](*args, *tail)


def pdl_options(pdl: bool, launcher) -> dict:
    """The ``PDL`` constexpr (the kernel's wait, common.pdl_enter) and, for direct launches, Triton's
    ``launch_pdl`` option, always together: a kernel launched with PDL that did not wait first could read its
    predecessor's outputs before they exist.  ``pdl``: the launch plan's choice (plan.LaunchPlan.pdl), which is
    never on for traced launches (``launcher`` set: Inductor launches the kernels itself)."""
    on = pdl and launcher is None
    return {"PDL": on} if launcher is not None else {"PDL": on, "launch_pdl": on}


_TUNED: dict = {}  # launch key -> the keyword arguments (meta-parameters, options) of the config chosen for it
# The autotuner reports its choice in one attribute (best_config) shared by all its keys and set before it
# compiles and launches (which can release the GIL): first launches hold this lock until it is read.
_TUNE_LOCK = threading.Lock()


def tuned(key: tuple) -> bool:
    """Whether ``launch_tuned`` has chosen a config for ``key``."""
    return _TUNED.get(key) is not None


def launch_tuned(kernel, grid, key: tuple, launcher, *args, **kwargs) -> None:
    """Launch the autotuned ``kernel``.  Once its autotuner has chosen a config for ``key``, later eager
    launches call the JIT function with that config directly: the autotuner's per-call key building (a
    pass over every argument with str() of each dtype) was about a quarter of the Triton launch time in
    the host-bound small-T layer (cProfile on an H100).  ``key`` must hold everything the autotuner keys on
    or prunes by (finer is harmless: a new key just goes through the autotuner once more, which answers
    from its own cache).  Traced launches (``launcher`` = wrap_triton) always go through the autotuner,
    which Inductor understands.
    """
    if launcher is not None:
        launcher(kernel)[grid](*args, **kwargs)
        return
    cfg = _TUNED.get(key)
    if cfg is None:
        with _TUNE_LOCK:
            kernel[grid](*args, **kwargs)
            _TUNED[key] = kernel.best_config.all_kwargs()
        return
    launch(kernel.fn, grid, None, *args, **kwargs, **cfg)


_COUNTERS: dict = {}  # (device, stream) -> int32 arrival counters (zero between launches)


def arrival_counters(device: torch.device, size: int, traced: bool = False) -> torch.Tensor:
    """Zeroed int32 arrival counters, at least ``size`` (the decode GEMV's fused combine: the last slot of a
    token to arrive sums its rows; it leaves them zero).  Kept per device and stream (launches on one stream run
    one after another and each leaves them zero; two streams must not share them); while a CUDA graph is being
    captured, a fresh zeroed buffer owned by that graph.  ``traced`` (a launch through wrap_triton, under
    torch.compile): a fresh zeroed buffer too, part of the traced graph; a cached one would hold the first
    trace's fake tensor, which Inductor's lowering, under another fake mode, refuses ("Mixing fake modes", an
    H100 run)."""
    on_gpu = device.type == "cuda"
    if traced or (on_gpu and torch.cuda.is_current_stream_capturing()):
        return torch.zeros(size, device=device, dtype=torch.int32)
    stream = torch.cuda.current_stream(device).cuda_stream if on_gpu else None
    buf = _COUNTERS.get((device, stream))
    if buf is None or buf.numel() < size:
        buf = _COUNTERS[(device, stream)] = torch.zeros(max(size, 4096), device=device, dtype=torch.int32)
    return buf
