"""torch.compile's view of every kernel launch in the ops' traced bodies, without a GPU.

When torch.compile traces a ``triton_op`` on a GPU, each ``wrap_triton`` launch goes through torch's
mutation analysis (torch/_higher_order_ops/triton_kernel_wrap.py): Triton lowers the kernel to TTIR for the
current target, and torch reads which pointer arguments reach a store.  If that lowering fails, torch only
logs a warning and takes every tensor argument as written; functionalization then copies "written" graph
inputs back, and for a leaf that requires grad (the routing weights, the activations) the compiled backward
fails: "a leaf Variable that requires grad is being used in an in-place operation" (H100, torch 2.11, session
22).  torch 2.11 lowers with every scalar argument a compile-time constant (newer torch keeps the scalars as
arguments), so a kernel that needs a scalar to be a runtime value (``tl.multiple_of`` on it) fails there only.

Run as a script with TRITON_INTERPRET unset (the kernels are then real JIT functions), given a file of
recorded op calls (tests/triton_cases.training_step_calls, saved with torch.save).  Each call is replayed
through its op's body under a fake tensor mode with a launcher that, per launch:
- runs the installed torch's own analysis for an H100 (sm_90) target, noting whether it failed;
- lowers the kernel to TTIR with every scalar argument a constant (the torch 2.11 rule).

Prints one JSON list: per launch the op, the kernel, the pointer arguments torch's analysis found written,
those of them that are floating-point inputs of the op, its failure if any, and the constant lowering's
failure if any.
"""
from __future__ import annotations

import json
import logging
import sys

import torch
import triton
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import mangle_type

import torch._higher_order_ops.triton_kernel_wrap as tkw
from gpu_compile import TARGET  # (this script's directory, tests/, is on its path)
from nf4moe.kernels import ops


class _Target:
    """Stands in for Triton's active GPU driver: torch asks it for the current target."""

    def get_current_target(self):
        return TARGET


class _Failures(logging.Handler):
    """Collects torch's "Encountered an exception in identify_..." warnings (its analysis swallows them)."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        if "Encountered an exception" in record.getMessage():
            exc = record.exc_info[1] if record.exc_info else None
            self.messages.append(f"{type(exc).__name__}: {exc}" if exc else record.getMessage())


def torch_writes(kernel, kwargs: dict) -> list[str]:
    """Pointer arguments the installed torch's analysis finds written (every tensor when it fails)."""
    if hasattr(tkw, "identify_accessed_tensors"):  # torch >= 2.12
        return sorted(d.name for d in tkw.identify_accessed_tensors(kernel, dict(kwargs), {}).read_writes.writes)
    return sorted(tkw.identify_mutated_tensors(kernel, dict(kwargs), {}))


def lower_with_constant_scalars(fn, kwargs: dict) -> None:
    """Lower ``fn`` to TTIR for TARGET with every non-tensor argument a constexpr (torch 2.11's analysis)."""
    sig, constexprs = {}, {}
    for idx, name in enumerate(fn.arg_names):
        a = kwargs[name]
        if isinstance(a, torch.Tensor):
            sig[name] = mangle_type(torch.empty(2, dtype=a.dtype))
        else:
            sig[name] = "constexpr"
            constexprs[(idx,)] = a
    backend = triton.compiler.compiler.make_backend(TARGET)
    options = backend.parse_options({})
    context = triton._C.libtriton.ir.context()
    triton._C.libtriton.ir.load_dialects(context)
    backend.load_dialects(context)
    module = ASTSource(fn, sig, constexprs, {}).make_ir(TARGET, options, backend.get_codegen_implementation(options),
                                                       backend.get_module_map(), context)
    if not module.verify():
        raise RuntimeError("TTIR verification failed")


def main(path: str) -> None:
    triton.runtime.driver.set_active(_Target())
    failures = _Failures()
    tkw.log.addHandler(failures)  # the logger torch's analysis warns on
    calls = torch.load(path, weights_only=False)
    report, current = [], {}

    def launcher(kernel):
        fn = kernel.fn if isinstance(kernel, Autotuner) else kernel

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    kw = {**dict(zip(fn.arg_names, args)), **kwargs}
                    failures.messages.clear()
                    writes = torch_writes(kernel, kw)
                    inputs = current["float_inputs"]
                    written_inputs = [n for n in writes if isinstance(kw.get(n), torch.Tensor)
                                      and StorageWeakRef(kw[n].untyped_storage()) in inputs]
                    full = {**(kernel.configs[0].kwargs if isinstance(kernel, Autotuner) else {}), **kw}
                    try:
                        lower_with_constant_scalars(fn, {n: full[n] for n in fn.arg_names})
                        const_error = None
                    except triton.compiler.errors.CompilationError as e:
                        while isinstance(e.__cause__, triton.compiler.errors.CompilationError):
                            e = e.__cause__  # the innermost frame names the failing call
                        const_error = " ".join(str(e).split())[-600:]
                    report.append({"op": current["op"], "kernel": fn.__name__, "writes": writes,
                                   "written_float_inputs": written_inputs,
                                   "torch_error": "; ".join(failures.messages) or None,
                                   "constant_scalars_error": const_error})
                return launch
        return Grid()

    ops._LAUNCHER = launcher
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
        for name, args in calls:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            current["op"] = name
            current["float_inputs"] = {StorageWeakRef(a.untyped_storage()) for a in fake
                                       if isinstance(a, torch.Tensor) and a.is_floating_point()}
            ops._BODIES[name](*fake)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
