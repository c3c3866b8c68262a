"""Autotune configurations for the NF4 grouped GEMM, generated per weight shape and token bucket.

Configs are keyed on the weight dims (N, K) and a bucketed row count (not the exact token count, so a
new T does not re-tune), pruned by shared-memory size, and cached by Triton's autotuner after the first
call.  ``NF4MOE_CONFIG="BLOCK_M=16,BLOCK_N=64,BLOCK_K=64,num_warps=4,num_stages=3"`` pins one config.
Under the Triton interpreter a single small config is used (the interpreter cannot benchmark).
"""
from __future__ import annotations

import os

import triton

_SMEM_BYTES = 227 * 1024  # Hopper's per-block limit; configs that would exceed it are pruned


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def row_bucket(rows: int) -> int:
    """Bucket the number of (token, slot) rows so tuning is per regime, not per exact T."""
    if rows <= 64:
        return 64
    if rows <= 1024:
        return 1024
    if rows <= 16384:
        return 16384
    return 1 << 20


def _pinned() -> list[triton.Config] | None:
    spec = os.environ.get("NF4MOE_CONFIG")
    if not spec:
        return None
    kv = dict(item.split("=") for item in spec.split(","))
    meta = {k: int(v) for k, v in kv.items() if k.startswith("BLOCK") or k == "SPLIT_K"}
    return [triton.Config(meta, num_warps=int(kv.get("num_warps", 4)), num_stages=int(kv.get("num_stages", 3)))]


def gemm_configs() -> list[triton.Config]:
    """All candidates; the pruner below keeps those that fit the shape, the NF4 blocksize and the bucket."""
    # A single candidate would skip the pruner (and its K-step checks): pinned and interpreter lists
    # carry fallbacks, and the pruner keeps exactly one there (so the interpreter never benchmarks).
    pinned = _pinned()
    if pinned:
        return pinned + [_fallback()]
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}, num_warps=4, num_stages=1), _fallback()]
    out = []
    # decode: few rows per expert, bandwidth-bound: many programs over N
    for bn, w, st in ((16, 4, 4), (32, 4, 3), (32, 4, 5), (64, 4, 4), (64, 4, 6)):
        out.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=st))
    # mid / prefill
    for bm, bn, w, st in ((32, 64, 4, 4), (64, 64, 4, 3), (64, 128, 8, 4), (128, 128, 8, 3), (128, 64, 4, 3),
                          (256, 128, 8, 3)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=st))
    return out + [_fallback()]


def _fallback() -> triton.Config:
    """Valid for every shape: a K step of 32 divides any NF4 blocksize (>= 32) and so any K."""
    return triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4,
                         num_stages=1 if interpreting() else 3)


def prune_configs(configs, named_args, **kwargs):
    """Keep configs suited to the row bucket and shape: the K step must divide the NF4 blocksize (one
    absmax per tile row) and K; drop those over the shared-memory limit."""
    def arg(name):
        return named_args[name] if name in named_args else kwargs[name]

    k_dim, bs, bucket, n = arg("K_DIM"), arg("BS"), arg("ROW_BUCKET"), arg("N")
    valid = [c for c in configs if bs % c.kwargs["BLOCK_K"] == 0 and k_dim % c.kwargs["BLOCK_K"] == 0]
    if _pinned() or interpreting():
        return valid[:1]
    kept = []
    for c in valid:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if bucket <= 64 and bm != 16:
            continue
        if bucket == 1024 and bm > 64:
            continue
        if bucket > 1024 and bm < 64:
            continue
        if bn > max(32, triton.next_power_of_2(n)):
            continue
        smem = c.num_stages * (bm * bk * 2 + 2 * bn * bk // 2)  # X tile + gate/up packed tiles
        if smem > _SMEM_BYTES:
            continue
        kept.append(c)
    return kept or valid[-1:]
