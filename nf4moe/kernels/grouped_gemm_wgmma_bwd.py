"""The backward's transposed NF4 grouped GEMMs on Hopper, in Gluon: decode into shared memory, asynchronous wgmma.

The input gradients of both projections are dx = dy W (+ LoRA) with W[e] (KR, N) stored NF4 as (rows KR = out,
packed along N = in): a reduction over KR, the rows of the packed tensor (grouped_gemm_bwd.py describes the math
and its two modes; this kernel computes the same outputs).  It is built as the forward's Gluon GEMM
(grouped_gemm_wgmma.py): per K step of 64 rows of KR, cp.async brings the step's dy rows (gathered by token for
down: dout[pair // K]) and the (64, TILE_N) tile's packed bytes two steps ahead into rings of 4; each thread
decodes the 16 bytes it copied itself (PTX table, nf4_decode) into a shared-memory ring of 3 weight tiles; a block
barrier; the asynchronous wgmma of the step runs while the warps decode the next.

The weight tile is read transposed: its rows are KR indices and its columns N, and the packed bytes are already
(KR, N/2) row-major, so each decoded byte's (even, odd) pair is one 32-bit word of the (64, TILE_N) tile in N
order: an MN-major wgmma B operand, written as int32 words with the NVMMA 128-byte swizzle and read as 16-bit
values through a reinterpreting view (the same bytes: the swizzle is defined on bytes).  One NF4 block spans
columns of one row here, so the absmax is per (row, 32 columns): each thread decodes 16 bytes = 32 weights of
one block (blocksize a multiple of 32), laid out as (64 * TILE_N / 32, 16) byte "row chunks".

LoRA: s·(dy B)·A for the tile's N columns, as one more wgmma in the epilogue (dy·B, (P, R_PAD) fp32, is
precomputed once by lora_xa.py: the LoRA A gradient needs it anyway).  Down epilogue (DOWN): dhu -> dh = w·dhu,
the SwiGLU backward from the saved pre-activation gu -> dgu (P, 2N); the partial d(top_k_weights) <dhu, h> of the
tile's columns; the partial h·A_dᵀ of the tile's columns (for d B_d), by CUDA cores (R dot products per row).
Up (not DOWN): dx per pair at row ``pair``.  Partials are summed over column tiles in fixed order afterwards:
deterministic, no atomics.  Eager launches on sm_90 only (launch plan ``bwd``); torch.compile, other GPUs and
the interpreter run grouped_gemm_bwd.py.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                               warpgroup_mma_wait)

from . import common
from .grouped_gemm_wgmma import NUM_WARPS, _as_16bit, _block_barrier, _cp_async, _lut_scaled_pairs, _scale_pair
from .host import cdiv
from .launch import launch
from .operands import NF4Operand

BLOCK_M = 128
TILE_N = 128  # columns of N per program (the accumulator is (128, 128) fp32: room for the down epilogue)


# common.act_and_grad (the Triton backward's activation derivative), compiled as a Gluon function
_act_and_grad = gluon.jit(common.act_and_grad.fn)


@gluon.jit
def _chunk_scales(am_ptr, am2_ptr, blk, c_mask, NESTED: gl.constexpr, BS2: gl.constexpr):
    """Absmax code (nested) or value of each row chunk's NF4 block, and its nested second-level absmax."""
    am = gl.load(am_ptr + blk, mask=c_mask, other=0)
    if NESTED:
        am2 = gl.load(am2_ptr + blk // BS2, mask=c_mask, other=0.0)
    else:
        am2 = gl.zeros_like(blk).to(gl.float32)
    return am, am2


@gluon.jit
def nf4_moe_gemm_t_wgmma_kernel(
    dy_ptr,           # down: dout (T, KR) read at row pair // TOP_K; up: dgu (P, KR) sorted rows; 16-bit, unit stride
    stride_dm,
    w_ptr,            # (E, KR, N_HALF = N // 2) uint8 packed NF4
    am_ptr,           # (E, KR, N // BS) fp32 absmax, or uint8 codes when NESTED
    am2_ptr,          # nested absmax (fp32), unused unless NESTED
    code2_ptr,        # (256,) fp32 nested code, unused unless NESTED
    off_ptr,          # () fp32 nested offset, unused unless NESTED
    la_ptr,           # (E, R, N) LoRA A (unused unless HAS_LORA)
    dyb_ptr,          # (P, R_PAD) fp32 dy·B in sorted order, unweighted (unused unless HAS_LORA)
    scaling,
    out_ptr,          # down: dgu (P, 2N) sorted rows; up: dx per pair (P, N) at row pair id
    gu_ptr,           # down: saved pre-activation (P, 2N) sorted rows
    dw_ptr,           # down: (column tiles, P) fp32 partial <dhu, h> at pair id (NEED_DW)
    xa_ptr,           # down: (column tiles, P, R_PAD) fp32 partial h·A_dᵀ in sorted order (NEED_XA)
    pair_ptr,         # (P,) int32 pair ids sorted by expert
    tile_ptr,         # (row tiles, 3) int32: expert, first row, end row (tile_table.py)
    topw_ptr,         # (P,) routing weight per pair id (down only)
    N, KR, N_HALF, E, R, P,
    TOP_K: gl.constexpr, R_PAD: gl.constexpr, DOWN: gl.constexpr, ACT: gl.constexpr, HAS_LORA: gl.constexpr,
    NESTED: gl.constexpr, BS: gl.constexpr, BS2: gl.constexpr, NEED_OUT: gl.constexpr, NEED_DW: gl.constexpr,
    NEED_XA: gl.constexpr, BLOCK_M: gl.constexpr, TILE_N: gl.constexpr,
):
    """Grid: (cdiv(N, TILE_N), row tiles); 8 warps.  Program (n, m): rows of row tile m, columns n*TILE_N ... of
    N; acc (BLOCK_M, TILE_N) fp32 over the KR steps of 64."""
    BM: gl.constexpr = BLOCK_M
    TN: gl.constexpr = TILE_N
    BK: gl.constexpr = 64
    C: gl.constexpr = TN // 32  # 16-byte chunks (32 weights, one NF4 block's part) per tile row
    RC: gl.constexpr = BK * C  # row chunks per K step
    XS: gl.constexpr = 4
    D: gl.constexpr = XS - 2
    WS: gl.constexpr = 3
    DT: gl.constexpr = dy_ptr.dtype.element_ty
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    e = gl.load(tile_ptr + 3 * pid_m)
    if e >= E:
        return
    row_lo = gl.load(tile_ptr + 3 * pid_m + 1)
    row_hi = gl.load(tile_ptr + 3 * pid_m + 2)
    n0 = pid_n * TN

    XL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])  # dy rows: 16 bytes a thread
    WL: gl.constexpr = gl.BlockedLayout([1, 16], [32, 1], [8, 1], [1, 0])  # one 16-byte row chunk a thread
    W2L: gl.constexpr = gl.BlockedLayout([1, 16], [32 // C, C], [8, 1], [1, 0])  # the same words as (BK, TN/2)
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, TN, 16])
    X_SL: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    W32_SL: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    WB_SL: gl.constexpr = gl.SwizzledSharedLayout(vec=16, per_phase=1, max_phase=1, order=[1, 0])

    x_s = gl.allocate_shared_memory(DT, [XS, BM, BK], X_SL)
    w32 = gl.allocate_shared_memory(gl.int32, [WS, BK, TN // 2], W32_SL)
    wb_s = gl.allocate_shared_memory(gl.uint8, [XS, RC, 16], WB_SL)
    w_s = _as_16bit(w32, DT, X_SL)

    # dy rows of the tile (gathered by token for down) and their K step addresses
    offs_xm = row_lo + gl.arange(0, BM, layout=gl.SliceLayout(1, XL))
    xm_mask = offs_xm < row_hi
    if DOWN:
        pair_x = gl.load(pair_ptr + offs_xm, mask=xm_mask, other=0)
        x_rows = (pair_x // TOP_K).to(gl.int64)
    else:
        x_rows = offs_xm.to(gl.int64)
    x_base = dy_ptr + x_rows[:, None] * stride_dm + gl.arange(0, BK, layout=gl.SliceLayout(0, XL))[None, :]
    x_mask = xm_mask[:, None]
    # the weight tile's row chunks: KR row k0 + rc // C, columns n0 + (rc % C) * 32 ... + 31 (bytes / 2)
    rc = gl.arange(0, RC, layout=gl.SliceLayout(1, WL))
    kr = rc // C
    col = n0 + (rc % C) * 32
    c_mask = col < N
    w_row0 = e.to(gl.int64) * KR + kr
    wb_base = w_ptr + (w_row0 * N_HALF + col // 2)[:, None] + gl.arange(0, 16, layout=gl.SliceLayout(0, WL))[None, :]
    wb_mask = c_mask[:, None]
    blk0 = w_row0 * (N // BS) + col // BS
    blk_step = BK * (N // BS)
    if NESTED:
        offset = gl.load(off_ptr)
    else:
        offset = 0.0
    n_k = KR // BK
    for s in gl.static_range(D):
        _cp_async(x_s.index(s), x_base + s * BK, mask=x_mask & (s < n_k))
        _cp_async(wb_s.index(s), wb_base + s * BK * N_HALF, mask=wb_mask & (s < n_k))
        async_copy.commit_group()
    am0, a20 = _chunk_scales(am_ptr, am2_ptr, blk0, c_mask, NESTED, BS2)
    am1, a21 = _chunk_scales(am_ptr, am2_ptr, blk0 + gl.minimum(1, n_k - 1) * blk_step, c_mask, NESTED, BS2)

    acc = gl.zeros([BM, TN], gl.float32, ACC)
    tz = N >> 31  # 0, unknown to the compiler: the decode's table words stay in registers
    for i in range(n_k):
        ws = i % WS
        async_copy.wait_group(D - 1)
        am2n, a22 = _chunk_scales(am_ptr, am2_ptr, blk0 + gl.minimum(i + 2, n_k - 1) * blk_step, c_mask, NESTED,
                                  BS2)
        packed = wb_s.index(i % XS).load(WL)
        if NESTED:
            sc = gl.load(code2_ptr + am0.to(gl.int32)) * a20 + offset
        else:
            sc = am0
        s2 = gl.zeros_like(packed).to(gl.int32) + _scale_pair(sc, DT)[:, None]
        words = _lut_scaled_pairs(packed, s2, DT, gl.zeros_like(s2) + tz)
        w32.index(ws).store(gl.convert_layout(words.reshape([BK, TN // 2]), W2L))
        am0, a20, am1, a21 = am1, a21, am2n, a22
        fence_async_shared()
        _block_barrier()
        _cp_async(x_s.index((i + D) % XS), x_base + (i + D) * BK, mask=x_mask & (i + D < n_k))
        _cp_async(wb_s.index((i + D) % XS), wb_base + (i + D) * BK * N_HALF, mask=wb_mask & (i + D < n_k))
        async_copy.commit_group()
        acc = warpgroup_mma(x_s.index(i % XS), w_s.index(ws), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
    acc = warpgroup_mma_wait(0, deps=[acc])
    async_copy.wait_group(0)

    LL: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [8, 1], [1, 0])
    AL: gl.constexpr = gl.BlockedLayout([1, 8], [2, 16], [8, 1], [1, 0])
    if HAS_LORA:  # + s·(dy B)·A[:, tile columns]: one more wgmma, K = R_PAD
        R_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, R_PAD], DT)
        A_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([R_PAD, TN], DT)
        offs_lm = row_lo + gl.arange(0, BM, layout=gl.SliceLayout(1, LL))
        offs_r = gl.arange(0, R_PAD, layout=gl.SliceLayout(0, LL))
        dyb = gl.load(dyb_ptr + offs_lm[:, None].to(gl.int64) * R_PAD + offs_r[None, :],
                      mask=(offs_lm < row_hi)[:, None], other=0.0)
        dyb_s = gl.allocate_shared_memory(DT, [BM, R_PAD], R_SL, (dyb * scaling).to(DT))
        ar = gl.arange(0, R_PAD, layout=gl.SliceLayout(1, AL))
        an = n0 + gl.arange(0, TN, layout=gl.SliceLayout(0, AL))
        a = gl.load(la_ptr + (e.to(gl.int64) * R + ar[:, None]) * N + an[None, :],
                    mask=(ar < R)[:, None] & (an < N)[None, :], other=0.0)
        a_s = gl.allocate_shared_memory(DT, [R_PAD, TN], A_SL, a.to(DT))
        fence_async_shared()
        _block_barrier()
        acc = warpgroup_mma(dyb_s, a_s, acc)

    OL: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (TN // 8), TN // 8], [8, 1], [1, 0])
    acc = gl.convert_layout(acc, OL)
    offs_om = row_lo + gl.arange(0, BM, layout=gl.SliceLayout(1, OL))
    om_mask = offs_om < row_hi
    offs_on = n0 + gl.arange(0, TN, layout=gl.SliceLayout(0, OL))
    on_mask = offs_on < N
    mask = om_mask[:, None] & on_mask[None, :]
    pair = gl.load(pair_ptr + offs_om, mask=om_mask, other=0)
    rows64 = offs_om.to(gl.int64)
    if DOWN:
        gptr = gu_ptr + rows64[:, None] * (2 * N) + offs_on[None, :]
        g = gl.load(gptr, mask=mask, other=0.0).to(gl.float32)
        u = gl.load(gptr + N, mask=mask, other=0.0).to(gl.float32)
        act_g, dact_g = _act_and_grad(g, ACT)
        h = act_g * u
        if NEED_DW:
            gl.store(dw_ptr + pid_n * P + pair, gl.sum(acc * h, axis=1), mask=om_mask)
        if NEED_XA:  # h·A_dᵀ over the tile's columns, h rounded to the activation dtype like an MMA operand
            hx = h.to(DT).to(gl.float32)
            xa_rows = xa_ptr + (pid_n * P + rows64) * R_PAD
            for r in range(R):
                a_r = gl.load(la_ptr + (e.to(gl.int64) * R + r) * N + offs_on, mask=on_mask, other=0.0)
                gl.store(xa_rows + r, gl.sum(hx * a_r.to(gl.float32)[None, :], axis=1), mask=om_mask)
        if NEED_OUT:
            wt = gl.load(topw_ptr + pair, mask=om_mask, other=0.0).to(gl.float32)
            dh = acc * wt[:, None]
            optr = out_ptr + rows64[:, None] * (2 * N) + offs_on[None, :]
            gl.store(optr, (dh * u * dact_g).to(out_ptr.dtype.element_ty), mask=mask)
            gl.store(optr + N, (dh * act_g).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        if NEED_OUT:
            gl.store(out_ptr + pair.to(gl.int64)[:, None] * N + offs_on[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=mask)


def column_tiles(n: int) -> int:
    """Column tiles of N (the rows of the partial d(top_k_weights) and h·A_dᵀ buffers)."""
    return cdiv(n, TILE_N)


def launch_nf4_moe_gemm_t_wgmma(dy: torch.Tensor, w: NF4Operand, lora_a: torch.Tensor | None, dyb: torch.Tensor | None,
                                scaling: float, sorted_pair_ids: torch.Tensor, tile_table: torch.Tensor, *,
                                down: bool, out: torch.Tensor | None, gu: torch.Tensor | None = None,
                                top_k_weights: torch.Tensor | None = None, dw_part: torch.Tensor | None = None,
                                xa_part: torch.Tensor | None = None, top_k: int = 1, act_code: int = 0,
                                r_pad: int = 16) -> None:
    """Launch over ``tile_table`` (tile_table.launch_tile_table with BLOCK_M rows).  ``dyb``: (P, R_PAD) fp32
    dy·B (lora_xa.py) or None without LoRA; down: dy = dout (T, KR), out = dgu (P, 2N) or None, gu, top_k_weights,
    dw_part (column_tiles(N), P) zero-filled or None, xa_part (column_tiles(N), P, R_PAD) or None; up: dy = dgu,
    out = dx per pair (P, N).  Eager launches only."""
    num_experts, kr, half_n = w.packed.shape
    n = 2 * half_n
    has_lora = dyb is not None
    dummy = w.absmax
    grid = (column_tiles(n), tile_table.shape[0])
    launch(
        nf4_moe_gemm_t_wgmma_kernel, grid, None,
        dy, dy.stride(0), *w.pointer_args(),
        lora_a if has_lora else dummy, dyb if has_lora else dummy, float(scaling),
        out if out is not None else dummy, gu if down else dummy,
        dw_part if dw_part is not None else dummy, xa_part if xa_part is not None else dummy,
        sorted_pair_ids, tile_table, top_k_weights if down else dummy,
        n, kr, half_n, num_experts, lora_a.shape[1] if has_lora else 0, sorted_pair_ids.numel(),
        TOP_K=top_k, R_PAD=r_pad, DOWN=down, ACT=act_code, HAS_LORA=has_lora, NESTED=w.nested, BS=w.blocksize,
        BS2=w.blocksize2, NEED_OUT=out is not None, NEED_DW=dw_part is not None, NEED_XA=xa_part is not None,
        BLOCK_M=BLOCK_M, TILE_N=TILE_N, num_warps=NUM_WARPS,
    )
