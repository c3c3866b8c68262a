"""Where the time of one nf4moe layer call goes: per-kernel CUDA times (torch.profiler) for each kernel
variant, plus the autotuner's chosen configs.  GPU only; used to write lab/NOTES-history.md.

    python -m lab.profile_layer --shape qwen3 --tokens 1,128,8192 --variants lut,select
    python -m lab.profile_layer --tokens 1,2,16 --variants gemv,gemm   # the decode kernel against the GEMM
    python -m lab.profile_layer --tokens 128,8192 --variants lut,natk  # MMA k order against natural order
    python -m lab.profile_layer --tokens 1024,8192 --variants gemm,pipe  # the K-loop hint (NOTES.md v14)
    python -m lab.profile_layer --tokens 1024,8192 --variants gemm --check --timings
    python -m lab.profile_layer --tokens 1,2,4 --variants gemm,split2,split4 --check  # opt-in split-K (NOTES v20)
    python -m lab.profile_layer --tokens 1024,8192 --variants triton,wgmma --check  # the Gluon GEMM (NOTES v23)
    python -m lab.profile_layer --tokens 8192 --variants wgmma,wgmma_nodecode,wgmma_nomma  # where its time goes
    python -m lab.profile_layer --tokens 1024,8192 --variants wgmma128,wgmma256,wgmma5 --check  # its tiles, rings
    python -m lab.profile_layer --tokens 8192 --variants wgmma,ws,ws:8:96:128:4:3 --check  # warp-specialised (v27)
    python -m lab.profile_layer --shape dsv3 --tokens 8192 --variants wgmma_nosplit,wgmma_split  # (v28)
    python -m lab.profile_layer --tokens 1024,8192 --variants wgmma,wgmma_early --check  # one bar.sync fewer (v29)
    python -m lab.profile_layer --tokens 1,2 --variants gemv,gemv_unfused,gemv_nomemset --graph  # fused combine (v33)
    python -m lab.profile_layer --tokens 1024,8192 --variants wgmma_imm,wgmma --check  # decode table in registers (v42)
    python -m lab.profile_layer --tokens 1,8 --variants gemv_noxae,gemv_xae --check --graph  # early X·Aᵀ (v45)
    python -m lab.profile_layer --tokens 1,8 --variants gemv_nopdl,gemv_pdl,gemv --graph  # PDL (v46)

``--check`` compares every variant's output with the fp32 reference backend (relative error printed);
``--timings`` prints every config the GEMM autotuner benchmarks, with its time; ``--graph`` also times each
variant captured in a CUDA graph (16 calls on different inputs per graph, per-call times), with the
per-kernel times of the replays.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch


def kernel_times(fn, iters: int = 20) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    out: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            out[ev.name[:60]] += ev.device_time_total / iters / 1e3  # ms per call
    return dict(out)


def graph_times(ours, x, idx, w, calls: int = 16, shared_counters: bool = False) -> tuple[float, dict[str, float]]:
    """(ms per call of a CUDA graph of ``calls`` layer calls on different activations and routings, the
    per-kernel ms per call of its replays).  ``shared_counters`` (variant gemv_nomemset, a measurement only):
    the graph uses the eager calls' arrival counters instead of its own zeroed ones, so it has no memset
    per call (unsafe where graphs replay concurrently on several streams)."""
    from nf4moe.kernels import grouped_gemm as gg

    from nf4moe.benchmarks.layer import graph_ms

    real = gg.split_k_counters
    if shared_counters:
        eager = real(x.device, 1 << 16)  # outside the capture: the default stream's buffer, zero
        gg.split_k_counters = lambda device, size: eager if size <= eager.numel() else real(device, size)

    gen = torch.Generator(device="cuda").manual_seed(1)
    e, k = ours.num_experts, idx.shape[1]
    sets = []
    for _ in range(calls):
        logits = torch.randn(idx.shape[0], e, device="cuda", generator=gen)
        rw, ri = torch.topk(torch.softmax(logits, -1), k, dim=-1)
        sets.append((torch.randn(x.shape, device="cuda", dtype=x.dtype, generator=gen), ri,
                     (rw / rw.sum(-1, keepdim=True)).to(w.dtype)))
    graph = []
    try:
        with torch.no_grad():
            ms = graph_ms(ours, sets, keep=graph)
    finally:
        gg.split_k_counters = real
    kt = kernel_times(graph[0].replay)
    return ms, {n: v / calls for n, v in kt.items()}


def main(argv=None) -> int:
    from nf4moe.benchmarks.layer import _bench, profile_cases

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3")
    ap.add_argument("--tokens", default="1,128,8192")
    ap.add_argument("--variants", default="lut,select")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--check", action="store_true", help="relative error of each variant against the reference")
    ap.add_argument("--timings", action="store_true", help="every config the autotuner benchmarks, with its time")
    ap.add_argument("--graph", action="store_true", help="also time CUDA-graph replays, with their kernel times")
    args = ap.parse_args(argv)
    _, ours, cases = profile_cases(args.shape, args.tokens, args.rank)
    from nf4moe.kernels.grouped_gemm import nf4_moe_gemm_kernel
    from nf4moe.kernels.grouped_gemv import nf4_moe_gemv_kernel

    if args.timings:  # report each benchmarked config (the autotuner keeps only the last key's timings)
        def printing(kern):
            bench = kern._bench

            def bench_and_print(*a, config, **kw):
                ms = bench(*a, config=config, **kw)
                print(f"   bench {kern.fn.__name__} {'up  ' if kw.get('GATED') else 'down'} bucket={a[-1] if a else '?'} "
                      f"{config}: {ms[0]:.4f} ms", flush=True)
                return ms
            return bench_and_print

        for kern in (nf4_moe_gemm_kernel, nf4_moe_gemv_kernel):
            kern._bench = printing(kern)

    for t, x, idx, w in cases:
        ref = None
        if args.check:
            with torch.no_grad():
                ours.backend = "reference"
                ref = ours(x, idx, w).float()
                ours.backend = "triton"
        for var in args.variants.split(","):
            os.environ["NF4MOE_LUT"] = "0" if var == "select" else "1"
            os.environ["NF4MOE_XA_PRE"] = {"xaloop": "0", "xapre": "1"}.get(var, "auto")
            os.environ["NF4MOE_KPERM"] = "0" if var == "natk" else "1"  # natk: K steps in natural column order
            os.environ["NF4MOE_WGMMA_PIPE"] = "1" if var == "pipe" else "0"  # pipe: the K-loop hint (NOTES v14)
            os.environ["NF4MOE_SPLIT_K"] = var[5:] if var.startswith("split") else "1"  # split2 / split4: split-K
            # gemv / gemm: force the decode GEMV or the MMA GEMM at every size; other variants: the default
            os.environ["NF4MOE_GEMV_ROWS"] = str(1 << 30) if var.startswith("gemv") else "0"
            # gemv_unfused: the GEMV's slot rows summed by the combine kernel (NF4MOE_FUSE_COMBINE=0)
            os.environ["NF4MOE_FUSE_COMBINE"] = "0" if var == "gemv_unfused" else "1"
            # wgmma: the Gluon GEMM (grouped_gemm_wgmma.py) at every size; triton: the Triton GEMM at every size
            os.environ["NF4MOE_WGMMA_ROWS"] = "1" if var.startswith(("wgmma", "ws")) else "0"
            # ..._nodecode / ..._nomma: the Gluon GEMM without its NF4 decode / its wgmmas (timing only)
            os.environ["NF4MOE_WGMMA_LEAVE_OUT"] = "1" if var.endswith("_nodecode") else "2" if var.endswith("_nomma") else "0"
            # wgmma128 / wgmma256 / ws128 / ws256: 128- / 256-row tiles; other wgmma variants: its own choice
            os.environ["NF4MOE_WGMMA_TILE"] = ("256x128" if var in ("wgmma256", "ws256") else "128x256"
                                               if var in ("wgmma128", "ws128") else "auto")
            # ws...: the warp-specialised Gluon GEMM (producer warps decode, consumer warps run the wgmmas)
            # ws:pw:regs:maxnreg:xs:ws: the warp-specialised one in that configuration (NF4MOE_WGMMA_WS)
            os.environ["NF4MOE_WGMMA_WS"] = (var[3:].replace(":", ",") if var.startswith("ws:") else "1"
                                             if var.startswith("ws") else "0")
            os.environ["NF4MOE_WGMMA_STAGES"] = "5" if var == "wgmma5" else "4"  # wgmma5: copies 3 steps ahead
            # wgmma_split / wgmma_nosplit: the 256-row tiles' remainders of <= 128 rows as 128-row tiles or
            # padded (NF4MOE_WGMMA_SPLIT); other variants: the default (split since v28; before it, padded)
            os.environ["NF4MOE_WGMMA_SPLIT"] = {"wgmma_split": "1", "wgmma_nosplit": "0"}.get(var, "1")
            # wgmma_early: the activation copies issued before the block barrier (NF4MOE_WGMMA_EARLY_COPY)
            os.environ["NF4MOE_WGMMA_EARLY_COPY"] = "1" if var == "wgmma_early" else "0"
            # ..._imm (e.g. wgmma_imm): the Gluon GEMM's decode table as immediates (NF4MOE_LUT_REGS=0; default
            # since v42: in registers)
            os.environ["NF4MOE_LUT_REGS"] = "0" if var.endswith("_imm") else "1"
            # ..._xae / ..._noxae (e.g. gemv_xae): the GEMV sums its X·Aᵀ partials early, all at once, or in its
            # epilogue (NF4MOE_GEMV_XA_EARLY=1 / 0; v45), eager and captured alike; neither: the default (auto: in
            # CUDA-graph captures only, session 19)
            # ..._pdl / ..._nopdl (e.g. gemv_pdl, gemv_xae_pdl, gemm_nopdl): programmatic dependent launches on or
            # off (NF4MOE_PDL=1 / 0; v46), with the configs tuned without them (grouped_gemm.launch_key), so an A/B
            # pair times the launches alone; neither: the default (auto: in CUDA-graph captures only)
            parts = var.split("_")
            for flag, on in (("NF4MOE_GEMV_XA_EARLY", "xae"), ("NF4MOE_PDL", "pdl")):
                os.environ[flag] = "1" if on in parts else "0" if "no" + on in parts else "auto"
            with torch.no_grad():
                ms = _bench(lambda: ours(x, idx, w))
                kt = kernel_times(lambda: ours(x, idx, w))
                err = ""
                if ref is not None:
                    err = f"rel err {((ours(x, idx, w).float() - ref).norm() / ref.norm()).item():.2e} "
            top = sorted(kt.items(), key=lambda kv: -kv[1])[:8]
            print(f"T={t:6d} variant={var:9s} total {ms:.4f} ms {err}| " + " | ".join(f"{n[:38]} {v:.4f}" for n, v in top),
                  flush=True)
            if args.graph:
                gms, gkt = graph_times(ours, x, idx, w, shared_counters=var == "gemv_nomemset")
                top = sorted(gkt.items(), key=lambda kv: -kv[1])
                print(f"T={t:6d} variant={var:9s} graph {gms:.4f} ms/call, kernels {sum(gkt.values()):.4f} | "
                      + " | ".join(f"{n[:38]} {v:.4f}" for n, v in top), flush=True)
        for kern in (nf4_moe_gemm_kernel, nf4_moe_gemv_kernel):
            for key, cfg in getattr(kern, "cache", {}).items():
                print("   config", kern.fn.__name__, key[:6], cfg, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
