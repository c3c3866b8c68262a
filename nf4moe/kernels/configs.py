"""Autotune configurations for the NF4 grouped GEMM, generated per weight shape and token bucket, and the
autotuners' CUDA-graph timer.

Configs are keyed on the weight dims (N, K) and a bucketed row count (not the exact token count, so a
new T does not re-tune), pruned by shared-memory size, and cached by Triton's autotuner after the first
call.  ``NF4MOE_CONFIG="BLOCK_M=16,BLOCK_N=64,BLOCK_K=64,num_warps=4,num_stages=3"`` (the one environment
variable nf4moe reads) pins one config, for debugging and for GPU test runs.  Under the Triton interpreter
a single small config is used (the interpreter cannot benchmark).
"""
from __future__ import annotations

import os

import torch
import triton

from .host import interpreting, pow2

_SMEM_BYTES = 227 * 1024  # Hopper's per-block limit; configs that would exceed it are pruned


def graph_bench(kernel_call, quantiles=None, *, launches: int = 32, rounds: int = 7):
    """Time of one ``kernel_call`` (ms) with a cold L2, measured without the host in the loop; the Autotuner's
    ``do_bench`` interface (``quantiles`` given: the time at each, in their order; else the median).

    Why (measured on an H200): Triton's do_bench records an event pair per launch after an L2-flush memset; for
    the decode GEMV (12-20 us) the host's work per launch (the memset, two events and the Autotuner's Python
    launch, ~60 us) is close to the GPU's (~90 us), so a slow stretch on the host shows up as GPU time: one
    candidate timed 17.0 us in one run and 39.8 us in the next, and the chosen configs differed.  Here two
    CUDA graphs are captured once, ``launches`` x (flush, kernel) and ``launches`` x (flush), and replayed
    alternately ``rounds`` times; each round gives (t_both - t_flush) / launches.  The flush writes twice the
    L2 (as the weights of a real layer call are not in L2: other layers ran in between).
    """
    dev = torch.cuda.current_device()
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or (64 << 20)
    # per call, as Triton's do_bench (not held: the layer's users need the memory; the allocator caches it)
    flush = torch.empty(2 * l2, dtype=torch.int8, device=f"cuda:{dev}")
    kernel_call()  # compiles outside the capture, and warms the launch path
    torch.cuda.synchronize()
    both, only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(both):
        for _ in range(launches):
            flush.zero_()
            kernel_call()
    with torch.cuda.graph(only):
        for _ in range(launches):
            flush.zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def replay(g) -> float:
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    replay(both), replay(only)  # first replays upload the graphs
    times = sorted(max(replay(both) - replay(only), 0.0) / launches for _ in range(rounds))
    del both, only

    def pick(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    if quantiles is None:
        return pick(0.5)
    return [pick(q) for q in quantiles]


def row_bucket(rows: int) -> int:
    """Bucket the number of (token, slot) rows so tuning is per regime, not per exact T."""
    for bound in (64, 256, 1024, 4096, 16384):
        if rows <= bound:
            return bound
    return 1 << 20


def pinned() -> list[triton.Config] | None:
    """The config ``NF4MOE_CONFIG`` pins, or None."""
    spec = os.environ.get("NF4MOE_CONFIG")
    if not spec:
        return None
    kv = dict(item.split("=") for item in spec.split(","))
    meta = {k: int(v) for k, v in kv.items() if k.startswith("BLOCK")}
    return [triton.Config(meta, num_warps=int(kv.get("num_warps", 4)), num_stages=int(kv.get("num_stages", 3)))]


def gemm_configs() -> list[triton.Config]:
    """All candidates; the pruner below keeps those that fit the shape, the NF4 blocksize and the bucket."""
    # A single candidate would skip the pruner (and its K-step checks): pinned and interpreter lists
    # carry fallbacks, and the pruner keeps exactly one there (so the interpreter never benchmarks).
    pin = pinned()
    if pin:
        return pin + [_fallback()]
    if interpreting():  # 64-wide: half the interpreted programs of 32 (the GPU tests pin 32-wide tiles)
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1), _fallback()]
    out = []
    # decode: few rows per expert, bandwidth-bound: many programs over N
    for bn, w, st in ((16, 4, 4), (32, 4, 3), (32, 4, 5), (64, 4, 4), (64, 4, 6)):
        out.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=st))
    # mid / prefill
    for bm, bn, w, st in ((32, 64, 4, 4), (64, 64, 4, 3), (64, 128, 8, 4), (128, 128, 8, 3), (128, 64, 4, 3),
                          (256, 128, 8, 3)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=st))
    # K steps spanning two NF4 blocks (of 64): twice the bytes in flight per program, half the loop trips
    for bm, bn, w, st in ((16, 32, 4, 4), (16, 64, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3),
                          (128, 128, 8, 3), (128, 64, 8, 3), (256, 64, 8, 3)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128}, num_warps=w, num_stages=st))
    # (8 warps on 128 weight rows, 16 resident warps per SM instead of 8, measured 1.7x slower at Qwen3's up
    # projection: NOTES v40)
    # decode with a register cap: 4 programs per SM instead of 2-3 (no spills at 128 registers, ptxas for sm_90)
    for bm, bn, st in ((16, 32, 4), (16, 64, 3), (16, 64, 4), (32, 64, 3)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128}, num_warps=4, num_stages=st,
                                 maxnreg=128))
    # prefill: 256 rows per weight tile halve the decode per FLOP of 128-row tiles (natural K order there)
    out.append(triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3))
    return out + [_fallback()]


def _fallback() -> triton.Config:
    """Valid for every shape: a K step of 32 divides any NF4 blocksize (>= 32) and so any K."""
    return triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4,
                         num_stages=1 if interpreting() else 3)


def prune_configs(configs, named_args, **kwargs):
    """Keep configs suited to the row bucket and shape: the K step must divide K and either divide the NF4
    blocksize (one absmax per tile row) or be a multiple of it (one per block); drop those over the
    shared-memory limit."""
    def arg(name):
        return named_args[name] if name in named_args else kwargs[name]

    k_dim, bs, bucket, n = arg("K_DIM"), arg("BS"), arg("ROW_BUCKET"), arg("N")
    has_lora, xa_pre, r_pad = arg("HAS_LORA"), arg("XA_PRE"), arg("R_PAD")
    valid = [c for c in configs if (bs % c.kwargs["BLOCK_K"] == 0 or c.kwargs["BLOCK_K"] % bs == 0)
             and k_dim % c.kwargs["BLOCK_K"] == 0]
    if pinned() or interpreting():
        return valid[:1]
    kept = []
    for c in valid:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if bucket <= 64 and bm != 16:
            continue
        if bucket == 256 and bm > 32:  # ~2 rows per expert of 128
            continue
        if bucket == 1024 and bm > 64:
            continue
        if bucket == 4096 and not 32 <= bm <= 128:
            continue
        if bucket > 4096 and bm < 64:
            continue
        if bn > max(32, pow2(n)):
            continue
        smem = c.num_stages * (bm * bk * 2 + 2 * bn * bk // 2)  # X tile + gate/up packed tiles
        if has_lora and not xa_pre:  # LoRA A tile in the K loop
            smem += c.num_stages * r_pad * bk * 2
        if smem > _SMEM_BYTES:
            continue
        kept.append(c)
    return kept or valid[-1:]
