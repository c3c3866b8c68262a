"""nf4moe's own host (Python) time per eager layer call, measured on a machine without a GPU.

An eager call at small T is host-bound (RESULTS.md), and most of its host time is nf4moe's Python between
the module's forward and Triton's launcher: input checks, routing, launch keys, argument lists.  This
script runs that path on CPU tensors with Triton's launch itself replaced by a no-op (every launch goes
through the cached direct-launch path of ``nf4moe.kernels.launch``, as on the GPU after the first call), so
its time is nf4moe's share alone; Triton's launcher and torch's allocations on the GPU come on top
(``lab/profile_host.py`` measures the whole on the GPU).

    python -m lab.host_cpu [--tokens 1,16] [--rank 16] [--profile] [--wgmma] [--xa-in-routing {0,1}]

``--wgmma``: the projections that would run the MMA GEMM take the Gluon GEMM's path instead (its tile tables,
X·Aᵀ precompute and launches; ``use_wgmma`` forced), to compare the two paths' host time at the same T.
``--xa-in-routing 0``: as ``NF4MOE_XA_IN_ROUTING=0`` (the up projection's X·Aᵀ in a lora_xa launch of its own
instead of the routing launch, v39's default; 1, the default, takes the routing launch).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from unittest import mock

import torch


class _NoLaunch:
    """Stands in for a compiled kernel: ``k[grid](*args)`` does nothing, but the routing kernels' stand-ins
    zero the expert offsets they write (routing_kernel's argument 2, routing_scatter_kernel's 4: the chunked
    path from 1024 pairs), which the layer then checks."""

    OFFSETS = {"routing_kernel": 2, "routing_xa_kernel": 2, "routing_scatter_kernel": 4}

    def __init__(self, kernel):
        self.offsets = self.OFFSETS.get(kernel.__name__)

    def __getitem__(self, grid):
        if self.offsets is None:
            return lambda *args: None
        return lambda *args: args[self.offsets].zero_()


class _Always(dict):
    """A cache that answers every lookup (the launch caches, as after the first call of each key)."""

    def __init__(self, value_of):
        super().__init__()
        self._value_of = value_of

    def get(self, key, default=None):
        hit = dict.get(self, key)
        if hit is None:
            hit = self[key] = self._value_of(key)
        return hit


def _compiled(key):
    """launch's cache entry for ``key`` = (kernel, device, argument spec, keyword items): (stand-in, the
    parameters after the positional arguments, in order)."""
    kernel, _, spec, items = key
    kw = dict(items)
    return _NoLaunch(kernel), [kw[n] for n in kernel.arg_names[len(spec):]]


def host_us(fn, iters: int, blocks: int = 10) -> float:
    """The fastest of ``blocks`` blocks' mean time per call (a shared CPU's noise only adds time)."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(blocks):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - t0) / iters)
    return 1e6 * best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="1,16")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="print the cProfile functions that cost the most")
    ap.add_argument("--sort", default="tottime", help="cProfile sort key (tottime, cumulative)")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--wgmma", action="store_true", help="the Gluon GEMM's path wherever the MMA GEMM would run")
    ap.add_argument("--xa-in-routing", type=int, choices=(0, 1), default=1,
                    help="NF4MOE_XA_IN_ROUTING's path (v39; default 1)")
    args = ap.parse_args(argv)

    import nf4moe
    from nf4moe.kernels import configs, grouped_gemm, grouped_gemv, launch, routing

    e, h, i, k = 128, 256, 128, 8  # the host path does not depend on the weight sizes
    g = torch.Generator().manual_seed(0)
    mod = nf4moe.QuantGroupedExperts.from_weights(torch.randn(e, 2 * i, h, generator=g), torch.randn(e, h, i, generator=g),
                                                  lora_rank=args.rank, lora_alpha=2 * args.rank, backend="triton")
    gemv = next(c for c in grouped_gemv.gemv_configs() if c.kwargs["BLOCK_M"] == 1)  # fits the fused combine too
    first = {"gemm": grouped_gemm.gemm_configs()[0], "gemv": gemv, "gemv_combine": gemv}
    patches = [
        mock.patch.object(torch.cuda, "current_device", lambda: 0),
        mock.patch.object(routing, "_INTERPRET", True),  # take the Triton routing path on CPU tensors
        mock.patch.object(launch, "_INTERPRET", False),
        mock.patch.object(launch, "_COMPILED", _Always(_compiled)),
        mock.patch.object(configs, "_TUNED", _Always(lambda key: first[key[0]].all_kwargs())),
    ]
    if args.wgmma:
        patches.append(mock.patch.object(grouped_gemm, "use_wgmma", lambda *a: True))
    from nf4moe.moe_layers import triton_backend

    patches.append(mock.patch.object(triton_backend, "_XA_IN_ROUTING", bool(args.xa_in_routing)))
    for p in patches:
        p.start()
    try:
        for t in [int(v) for v in args.tokens.split(",")]:
            x = torch.randn(t, h, dtype=torch.bfloat16, generator=g)
            idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
            w = torch.rand(t, k, generator=g).to(torch.bfloat16)
            with torch.no_grad():
                call = lambda: mod(x, idx, w)  # noqa: E731
                print(f"T={t}: nf4moe host {host_us(call, args.iters):.1f} us per eager call (launches excluded)")
                if args.profile:
                    prof = cProfile.Profile()
                    prof.runcall(lambda: [call() for _ in range(200)])
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats(args.sort).print_stats(args.top)
                    print(buf.getvalue())
    finally:
        for p in patches:
            p.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
