"""Fused NF4 grouped GEMM for MoE experts: dequantize in the tile loop, LoRA in the same pass.

One kernel serves both projections (constexpr flags pick the mode):

- up   (GATED):   rows gathered from hidden_states by token = pair // K; gate and up tiles of
  ``gate_up_proj[e]`` in the same program; epilogue writes act(gate) * up for each pair in sorted order.
- down (SCATTER): rows of the sorted intermediate; epilogue multiplies by the pair's routing weight and
  writes row ``pair`` of the (T*K, H) slot buffer (combined per token by ``combine``).

The product is computed transposed (swap-AB): acc (BLOCK_N, BLOCK_M) = W_tile (BLOCK_N, BLOCK_K) @
X_tileᵀ (BLOCK_K, BLOCK_M).  The dequantized weight is the left operand, so it can stay in registers,
and BLOCK_M (rows of one expert) may be as small as 16 for decode.

Grid: (cdiv(N, BLOCK_N), cdiv(P, BLOCK_M) + min(E, P)).  Program (n, m) finds its expert and row tile from
``expert_offsets`` (tiles are padded per expert to BLOCK_M); programs past the last tile exit.  No host
synchronisation is needed to size the grid.

A K step (BLOCK_K) either divides the NF4 blocksize (one absmax per tile row) or spans several whole
blocks (one absmax per block, nf4_decode); the autotuner picks K=128 on most Qwen3-30B-A3B buckets.
Tiles of up to 32 rows take each K step's columns in wgmma k order (nf4_decode.mma_k_order: the weight
bytes arrive as words and decode straight into operand pairs; the activations are read in the same
order; at 128 rows the activations' 2-element runs cost more than that saved: H100, Qwen3 T=1024, 0.78
against 0.63 ms).  LoRA X·Aᵀ is accumulated in the K loop (``xa`` None) or comes precomputed per row
(lora_xa.py); the launch plan (plan.py) chooses which, and when this kernel runs at all (the decode GEMV
below 64 routed rows, the Gluon GEMM from 8192 on Hopper).  Eager launches reuse the autotuner's choice
(launch.launch_tuned) and the compiled kernel (launch.launch).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import act_fwd, dot_operand, expert_row_tile, nested_offset, pdl_enter
from .configs import gemm_configs, prune_configs, row_bucket
from .host import INTERPRET, r_pad
from .launch import launch_tuned, pdl_options
from .nf4_decode import dequant_operand, mma_k_order
from .operands import NF4Operand, grid, launch_key, projection_meta


@triton.autotune(
    configs=gemm_configs(),
    key=["N", "K_DIM", "ROW_BUCKET", "GATED", "HAS_LORA", "BS", "XA_PRE"],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.jit
def nf4_moe_gemm_kernel(
    x_ptr,            # up: hidden_states (T, K_DIM); down: intermediate (P, K_DIM) in sorted order; fp16/bf16/fp32
    stride_xm, stride_xk,
    w_ptr,            # (E, N_TOTAL, K_DIM // 2) uint8 packed NF4
    am_ptr,           # (E, N_TOTAL, K_DIM // BS) fp32 absmax, or uint8 codes when NESTED
    am2_ptr,          # (ceil(blocks / BS2),) fp32 nested absmax (unused unless NESTED)
    code2_ptr,        # (256,) fp32 nested code (unused unless NESTED)
    off_ptr,          # () fp32 nested offset (unused unless NESTED)
    la_ptr,           # (E, R, K_DIM) LoRA A (unused unless HAS_LORA)
    lb_ptr,           # (E, N_TOTAL, R) LoRA B (unused unless HAS_LORA)
    scaling,          # float: lora_alpha / r
    xa_ptr,           # (XA_SPLIT, P, R_PAD) fp32 precomputed X·Aᵀ partials in sorted order (XA_PRE only)
    XA_SPLIT,
    gu_ptr,           # (P, 2N) pre-activation gate|up in sorted order, for the backward (WRITE_GU only)
    out_ptr,          # up: (P, N) sorted order; down: (P, N) indexed by pair id
    stride_om,
    pair_ptr,         # (P,) int32 pair ids sorted by expert
    eoff_ptr,         # (E + 1,) int32 expert offsets into pair_ptr
    topw_ptr,         # (P,) routing weight per pair (down only)
    N, K_DIM, N_TOTAL, E, R, P, ROW_BUCKET,
    TOP_K: tl.constexpr, E_POW2: tl.constexpr, R_PAD: tl.constexpr,
    GATED: tl.constexpr, ACT: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
    HAS_LORA: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
    INTERPRET: tl.constexpr, LUT: tl.constexpr, XA_PRE: tl.constexpr, WRITE_GU: tl.constexpr,
    WRITE_OUT: tl.constexpr, PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(N, BLOCK_N), cdiv(P, BLOCK_M) + min(E, P))."""
    pdl_enter(PDL)
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)

    e, row_lo, row_hi = expert_row_tile(eoff_ptr, pid_m, E, E_POW2, BLOCK_M)
    if e >= E:
        return
    offs_m = row_lo + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_hi
    if GATHER or SCATTER:
        pair = tl.load(pair_ptr + offs_m, mask=m_mask, other=0)
    if GATHER:
        x_rows = (pair // TOP_K).to(tl.int64)
    else:
        x_rows = offs_m.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    e64 = e.to(tl.int64)
    w_rows = e64 * N_TOTAL + offs_n
    dt = x_ptr.dtype.element_ty
    offset = nested_offset(off_ptr, NESTED)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_xa = tl.zeros((R_PAD, BLOCK_M), dtype=tl.float32)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    # K step columns in wgmma k order (nf4_decode.mma_k_order) in tiles of up to 32 rows (module docstring)
    MMA_ORDER: tl.constexpr = BLOCK_M <= 32
    for k0 in range(0, K_DIM, BLOCK_K):  # the pruner keeps configs with BLOCK_K dividing K_DIM
        if MMA_ORDER:
            offs_k = k0 + mma_k_order(BLOCK_K)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
        # compiled 16-bit activations: PTX table decode (nf4_decode._lut_pairs_asm); else the fp32
        # select tree
        wg = dequant_operand(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, w_rows, n_mask, k0, K_DIM, BS, BS2, NESTED,
                             BLOCK_K, dt, LUT, INTERPRET, MMA_ORDER)
        xt = tl.load(x_ptr + x_rows[None, :] * stride_xm + offs_k[:, None] * stride_xk, mask=m_mask[None, :], other=0.0)
        if INTERPRET:  # the interpreter's bf16 dot is wrong: fp32 operands there only
            xt = xt.to(tl.float32)
        acc = tl.dot(wg, xt, acc)
        if GATED:
            wu = dequant_operand(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, w_rows + N, n_mask, k0, K_DIM, BS, BS2,
                                 NESTED, BLOCK_K, dt, LUT, INTERPRET, MMA_ORDER)
            acc_up = tl.dot(wu, xt, acc_up)
        if HAS_LORA and not XA_PRE:
            a = tl.load(la_ptr + (e64 * R + offs_r[:, None]) * K_DIM + offs_k[None, :], mask=r_mask[:, None], other=0.0)
            a = dot_operand(a, dt, INTERPRET)
            acc_xa = tl.dot(a, xt, acc_xa)

    if HAS_LORA:
        if XA_PRE:  # X·Aᵀ precomputed once per row (lora_xa.py), not per N tile; partials summed in order
            for s in range(XA_SPLIT):
                acc_xa += tl.load(xa_ptr + (s * P + offs_m[None, :].to(tl.int64)) * R_PAD + offs_r[:, None],
                                  mask=m_mask[None, :], other=0.0)
        xa = dot_operand(acc_xa.to(dt), dt, INTERPRET)  # rounded to dt once, as a dt operand would be
        b = tl.load(lb_ptr + w_rows[:, None] * R + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        b = dot_operand(b, dt, INTERPRET)
        acc += scaling * tl.dot(b, xa)
        if GATED:
            bu = tl.load(lb_ptr + (w_rows[:, None] + N) * R + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :],
                         other=0.0)
            bu = dot_operand(bu, dt, INTERPRET)
            acc_up += scaling * tl.dot(bu, xa)

    if WRITE_GU:  # training: the backward's SwiGLU derivative needs the pre-activations
        gu_ptrs = gu_ptr + offs_m[None, :].to(tl.int64) * (2 * N) + offs_n[:, None]
        gu_mask = n_mask[:, None] & m_mask[None, :]
        tl.store(gu_ptrs, acc.to(gu_ptr.dtype.element_ty), mask=gu_mask)
        tl.store(gu_ptrs + N, acc_up.to(gu_ptr.dtype.element_ty), mask=gu_mask)
    if not WRITE_OUT:
        return
    if GATED:
        acc = act_fwd(acc, ACT) * acc_up
    if SCATTER:
        wt = tl.load(topw_ptr + pair, mask=m_mask, other=0.0).to(tl.float32)
        acc = acc * wt[None, :]
        out_rows = pair.to(tl.int64)
    else:
        out_rows = offs_m.to(tl.int64)
    out_ptrs = out_ptr + out_rows[None, :] * stride_om + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def launch_nf4_moe_gemm(
    x: torch.Tensor,
    w: NF4Operand,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    xa: torch.Tensor | None,
    sorted_pair_ids: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k_weights: torch.Tensor | None,
    out: torch.Tensor,
    *,
    n: int,
    top_k: int,
    gated: bool,
    act: str = "silu",
    gu: torch.Tensor | None = None,
    write_out: bool = True,
    pdl: bool = False,
    launcher=None,
) -> torch.Tensor:
    """Launch the kernel; ``launcher`` wraps it (``torch.library.wrap_triton``) when traced.  Returns ``out``.

    LoRA (``lora_a`` given): ``xa`` (XA_SPLIT, P, R_PAD) or (P, R_PAD) fp32 X·Aᵀ partials (lora_xa.py), or None
    to accumulate X·Aᵀ in the K loop.  Training extras (up projection only): ``gu`` (P, 2N) receives the
    pre-activation gate|up rows; ``write_out=False`` skips ``out`` (recompute mode needs only the
    pre-activations).  ``pdl``: a programmatic dependent launch (the plan's choice, direct launches only).
    """
    num_experts, n_total, half_k = w.packed.shape
    k_dim = 2 * half_k
    rows = sorted_pair_ids.numel()
    has_lora = lora_a is not None and lora_a.shape[1] > 0
    r = lora_a.shape[1] if has_lora else 0
    dummy = w.absmax  # placeholder pointer for unused arguments
    rp = r_pad(r)
    bucket = row_bucket(rows)
    xa_pre = has_lora and xa is not None
    meta = dict(projection_meta(x, w, top_k=top_k, r_pad=rp, gated=gated, act=act, has_lora=has_lora),
                INTERPRET=INTERPRET, XA_PRE=xa_pre, WRITE_GU=gu is not None, WRITE_OUT=write_out,
                **pdl_options(pdl, launcher))
    key = launch_key("gemm", n, bucket, x, w, out, lora_b if has_lora else None, meta)
    launch_tuned(
        nf4_moe_gemm_kernel, grid(n, rows, num_experts), key, launcher,
        x, x.stride(0), x.stride(1),
        *w.pointer_args(),
        lora_a.contiguous() if has_lora else dummy, lora_b if has_lora else dummy, float(scaling),
        xa if xa_pre else dummy, xa.shape[0] if xa_pre and xa.dim() == 3 else 1,
        gu if gu is not None else dummy,
        out, out.stride(0),
        sorted_pair_ids, expert_offsets,
        top_k_weights if top_k_weights is not None else dummy,
        n, k_dim, n_total, num_experts, r, rows, bucket,
        **meta,
    )
    return out
