"""Per-expert LoRA gradients: out[e] = s · Σ_{rows j of expert e} lhs[j]ᵀ ⊗ rhs[j], deterministically.

For a projection y = x Wᵀ + s (x Aᵀ) Bᵀ with output gradient dz (per row):
d B[e] = s · dZᵀ (X Aᵀ)  (lhs = dz rows, rhs = x·Aᵀ rows)  and  d A[e] = s · (dZ B)ᵀ X  (lhs = dz·B rows,
rhs = x rows).  The four uses:

- d lora_B_up:   lhs = dgu (P, 2I) sorted rows,               rhs = x·A_upᵀ (P, R_PAD) fp32
- d lora_A_up:   lhs = dgu·B_up (P, R_PAD) fp32,               rhs = hidden_states[pair // K] (gathered)
- d lora_B_down: lhs = w[pair] · dout[pair // K] (gathered),   rhs = h·A_downᵀ (P, R_PAD) fp32
- d lora_A_down: lhs = w · dout·B_down (P, R_PAD) fp32,        rhs = h = act(g)·u from the saved gu

One program per (expert, output tile) loops over the expert's rows in a fixed order: no atomics, so
two runs give bit-identical gradients, and experts without rows get exact zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import act_fwd
from .host import ACT_CODES, cdiv, interpreting, r_pad


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_D": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=st)
            for bm, bd, w, st in ((32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3), (128, 64, 8, 3))]


@triton.autotune(configs=_configs(), key=["DA", "DB", "LHS_IS_R"])
@triton.jit
def lora_grad_kernel(
    lhs_ptr,          # (rows, DA) left factor: sorted rows, or token rows read at pair // TOP_K (LHS_GATHER)
    stride_lm, stride_lk,
    rhs_ptr,          # (rows, DB) right factor, or (rows, 2*DB) pre-activation gate|up when RHS_GATED
    stride_rm, stride_rk,
    out_ptr,          # (E, DA, DB) gradient, contiguous, parameter dtype
    pair_ptr,         # (P,) int32 pair ids sorted by expert
    eoff_ptr,         # (E + 1,) int32 expert offsets
    topw_ptr,         # (P,) routing weight per pair id (LHS_SCALE)
    DA, DB, scaling,
    TOP_K: tl.constexpr, LHS_IS_R: tl.constexpr, R_PAD: tl.constexpr,
    LHS_GATHER: tl.constexpr, LHS_SCALE: tl.constexpr, RHS_GATHER: tl.constexpr, RHS_GATED: tl.constexpr,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid: (E, cdiv(D, BLOCK_D)) where D is the non-rank side (DB if LHS_IS_R else DA).

    The rank side is one R_PAD tile: acc is (R_PAD, BLOCK_D) for d A, (BLOCK_D, R_PAD) for d B.
    """
    e = tl.program_id(0)
    pid_d = tl.program_id(1)
    if LHS_IS_R:
        offs_a = tl.arange(0, R_PAD)
        offs_b = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros((R_PAD, BLOCK_D), dtype=tl.float32)
    else:
        offs_a = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        offs_b = tl.arange(0, R_PAD)
        acc = tl.zeros((BLOCK_D, R_PAD), dtype=tl.float32)
    a_mask = offs_a < DA
    b_mask = offs_b < DB
    lo = tl.load(eoff_ptr + e)
    hi = tl.load(eoff_ptr + e + 1)
    for m0 in range(lo, hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < hi
        pair = tl.load(pair_ptr + offs_m, mask=m_mask, other=0)
        if LHS_GATHER:
            l_rows = (pair // TOP_K).to(tl.int64)
        else:
            l_rows = offs_m.to(tl.int64)
        if RHS_GATHER:
            r_rows = (pair // TOP_K).to(tl.int64)
        else:
            r_rows = offs_m.to(tl.int64)
        # lhs^T tile (rows of acc, BLOCK_M), loaded transposed through its pointers
        lt = tl.load(lhs_ptr + l_rows[None, :] * stride_lm + offs_a[:, None] * stride_lk,
                     mask=m_mask[None, :] & a_mask[:, None], other=0.0).to(tl.float32)
        if LHS_SCALE:
            wt = tl.load(topw_ptr + pair, mask=m_mask, other=0.0).to(tl.float32)
            lt = lt * wt[None, :]
        rmask = m_mask[:, None] & b_mask[None, :]
        rp = rhs_ptr + r_rows[:, None] * stride_rm + offs_b[None, :] * stride_rk
        if RHS_GATED:
            g = tl.load(rp, mask=rmask, other=0.0).to(tl.float32)
            u = tl.load(rp + DB * stride_rk, mask=rmask, other=0.0).to(tl.float32)
            rt = act_fwd(g, ACT) * u
        else:
            rt = tl.load(rp, mask=rmask, other=0.0).to(tl.float32)
        acc = tl.dot(lt, rt, acc)
    acc = acc * scaling
    optr = out_ptr + (e.to(tl.int64) * DA + offs_a[:, None]) * DB + offs_b[None, :]
    tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=a_mask[:, None] & b_mask[None, :])


def launch_lora_grad(
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    out: torch.Tensor,
    sorted_pair_ids: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k_weights: torch.Tensor | None,
    scaling: float,
    *,
    top_k: int,
    lhs_is_rank: bool,
    lhs_gather: bool,
    rhs_gather: bool,
    rhs_gated: bool,
    act: str = "silu",
    launcher=None,
) -> torch.Tensor:
    """out (E, DA, DB).  lhs_is_rank: d A (DA = r, lhs is a (P, R_PAD) fp32 buffer); else d B (DB = r,
    rhs is that buffer).  ``top_k_weights`` given: lhs rows are scaled by the pair's weight."""
    num_experts, da, db = out.shape
    rank, d = (da, db) if lhs_is_rank else (db, da)
    kern = launcher(lora_grad_kernel) if launcher is not None else lora_grad_kernel
    grid = lambda meta: (num_experts, cdiv(d, meta["BLOCK_D"]))
    dummy = expert_offsets
    kern[grid](
        lhs, lhs.stride(0), lhs.stride(1),
        rhs, rhs.stride(0), rhs.stride(1),
        out, sorted_pair_ids, expert_offsets,
        top_k_weights if top_k_weights is not None else dummy,
        da, db, float(scaling),
        TOP_K=top_k, LHS_IS_R=lhs_is_rank, R_PAD=r_pad(rank),
        LHS_GATHER=lhs_gather, LHS_SCALE=top_k_weights is not None, RHS_GATHER=rhs_gather, RHS_GATED=rhs_gated,
        ACT=ACT_CODES[act],
    )
    return out
