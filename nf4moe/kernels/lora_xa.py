"""LoRA down-projection of every routed row, once per layer call: xa[p] = X[row p] · A[e_p]ᵀ (fp32).

Computed once here instead of inside every N tile of the NF4 GEMM, which re-read the expert's A (r x K)
in each of its N/BLOCK_N programs (at T=1 on Qwen3-30B-A3B that re-read as many bytes of A as the
kernel read NF4 bytes).  Rows are in expert-sorted order, like the GEMM's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_operand, expert_row_tile, pdl_enter
from .host import INTERPRET, cdiv, pow2, xa_block_k, xa_split
from .launch import launch, pdl_options


@triton.jit
def lora_xa_kernel(
    x_ptr,      # up: hidden_states (T, K_DIM); down: intermediate (P, K_DIM) sorted; fp16/bf16/fp32
    stride_xm, stride_xk,
    a_ptr,      # (E, R, K_DIM) LoRA A, or a strided view (the backward's dy·B reads B (E, K_DIM, R) transposed)
    stride_ae, stride_ar, stride_ak,
    out_ptr,    # (SPLIT, P, R_PAD) fp32 partial sums over K slices, sorted order
    pair_ptr,   # (P,) int32 pair ids sorted by expert
    eoff_ptr,   # (E + 1,) int32 expert offsets
    K_DIM, E, R, P, K_SLICE,
    TOP_K: tl.constexpr, E_POW2: tl.constexpr, R_PAD: tl.constexpr, GATHER: tl.constexpr,
    INTERPRET: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    """Grid: (cdiv(P, BLOCK_M) + min(E, P), SPLIT); program (m, s) sums columns [s*K_SLICE, (s+1)*K_SLICE)."""
    pdl_enter(PDL)
    e, row0, row_end = expert_row_tile(eoff_ptr, tl.program_id(0), E, E_POW2, BLOCK_M)
    if e >= E:
        return
    offs_m = row0 + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_end
    if GATHER:
        x_rows = (tl.load(pair_ptr + offs_m, mask=m_mask, other=0) // TOP_K).to(tl.int64)
    else:
        x_rows = offs_m.to(tl.int64)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    dt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    k_lo = tl.program_id(1) * K_SLICE
    for k0 in range(k_lo, k_lo + K_SLICE, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + x_rows[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)
        a = tl.load(a_ptr + e.to(tl.int64) * stride_ae + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                    mask=r_mask[None, :], other=0.0)
        acc = tl.dot(dot_operand(x, dt, INTERPRET), dot_operand(a, dt, INTERPRET), acc)
    out_rows = tl.program_id(1) * P + offs_m[:, None].to(tl.int64)
    tl.store(out_ptr + out_rows * R_PAD + offs_r[None, :], acc, mask=m_mask[:, None])


def launch_lora_xa(x: torch.Tensor, lora_a: torch.Tensor, sorted_pair_ids: torch.Tensor, expert_offsets: torch.Tensor,
                   *, top_k: int, gather: bool, r_pad: int, out: torch.Tensor | None = None, pdl: bool = False,
                   launcher=None) -> torch.Tensor:
    """Fill ``out`` (P, r_pad) fp32 when given (one slice: the training forward saves it), else return
    new (split, P, r_pad) fp32 partials whose sum over dim 0 is X·Aᵀ.  ``lora_a`` (E, r, K) may be a strided
    view (the backward passes B (E, K, r) as ``B.transpose(1, 2)``: dy·B without a copy)."""
    num_experts, r, k_dim = lora_a.shape
    rows = sorted_pair_ids.numel()
    block_m = 16 if rows <= 4096 else 64
    block_k = xa_block_k(k_dim)
    split = 1 if out is not None else xa_split(k_dim, rows, block_k)
    if out is None:
        out = x.new_empty(split, rows, r_pad, dtype=torch.float32)  # new_empty: the tests poison it with NaN
    launch(
        lora_xa_kernel, (cdiv(rows, block_m) + min(num_experts, rows), split), launcher,
        x, x.stride(0), x.stride(1), lora_a, *lora_a.stride(), out, sorted_pair_ids, expert_offsets,
        k_dim, num_experts, r, rows, k_dim // split,
        TOP_K=top_k, E_POW2=pow2(num_experts), R_PAD=r_pad, GATHER=gather,
        INTERPRET=INTERPRET, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
        **pdl_options(pdl, launcher),
    )
    return out
