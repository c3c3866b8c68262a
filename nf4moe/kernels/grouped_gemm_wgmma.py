"""NF4 grouped GEMM for many rows per expert (prefill / training), in Gluon: decode into shared memory,
asynchronous wgmma from it, so the NF4 decode of step i+1 runs while the tensor cores multiply step i.

Why a second GEMM: the Triton kernel (grouped_gemm.py) decodes each weight tile into registers as the
wgmma A operand, and Triton's software pipeline puts a block barrier and a wgmma wait in every K step, so
decode and MMA alternate (Nsight Compute at T=8192: 2 warps per scheduler, 1.34 IPC, 35% of the bf16 rate;
NOTES v17-v18).  Here every K step i is:

    1. wait for this thread's cp.async group of step i (activation rows and packed weight bytes, issued two
       steps earlier; each thread copies exactly the 16 weight bytes it decodes, so no barrier is needed
       before the decode reads them);
    2. load the absmax codes of step i+2 into registers (nested double-quant decoded in-kernel);
    3. decode the weight bytes of step i with the PTX table (nf4_decode's pair decode: each byte's two weights
       as one bf16x2/f16x2 word, which is already the tile's memory order) into a shared-memory ring of 3
       weight tiles (NVMMA 128-byte swizzle, written as int32 and read as 16-bit through a reinterpreting view);
    4. fence, block barrier;
    5. cp.async of the activation rows (gathered by pair // K: no permuted copy) and the weight bytes of step
       i+2 into rings of 4; then the asynchronous wgmma of step i, and wait until only it is in flight.

The block barrier of step i comes after every warp finished step i-1's wait, so every warp group's
wgmma of step i-2 is complete: the slots written after it (step i+2 = i-2 mod 4) and the weight slot written
before it (step i = i-3 mod 3) are free.  Each weight is decoded once per 128-row tile (as in the Triton
GEMM); the tensor cores run while the warps decode.  Measured (H200, NOTES v23): the version that loaded
the weight bytes into registers one step ahead was latency-bound on those loads (no faster than the Triton
GEMM); with the cp.async ring it is 1.14-1.22x faster at T >= 1024.

Shapes: BLOCK_M = 128 rows (two warp groups of 64), BLOCK_K = 64 (one NF4 block of 64, or a part of a
larger one, per row and step), one 256-row weight tile and one wgmma of N = 256 per step: up: 128 gate rows
then the matching 128 up rows (so the activation tile is read once for both); down: 256 output rows.
Epilogue: LoRA as one more wgmma (scaling·X·Aᵀ, precomputed by lora_xa.py and rounded to the activation
dtype once, times Bᵀ) into the same accumulator, then SwiGLU of its two halves (up) or the routing weight
and the scatter to pair rows (down); training stores the pre-activations as the Triton GEMM does.  The launch
plan (plan.py) runs it for eager launches with 16-bit activations from 8192 routed rows and 64 per expert on
Hopper; torch.compile traces the Triton GEMM.  Memory: the same output buffers as the Triton kernel plus a
(tiles, 3) int32 table (tile_table.py); 192 KB of shared memory per program (one program per SM).

Tiles (the plan's ``wgmma_tile``): 128 rows x 256 weight rows, or 256 x 128 (each weight decoded once per 256
rows), the latter from 256 routed rows per expert (measured 2-7% faster at T=8192 on all three shapes, NOTES
v25); with it, an expert's last <= 128 rows run as a 128x256 tile in a second launch (v28: DeepSeek-V3 T=8192
17.56 against 19.45 ms, H200).  The decode's 8 table words stay in registers (v42: 0.3-2%).  Measured and
dropped (lab/VARIANTS.md, git history): a warp-specialised form (producer warps decode, mbarriers; 7-14% slower,
v27), copies three steps ahead, and the activation copies issued before the block barrier.
"""
from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (async_copy, fence_async_shared, warpgroup_mma,
                                                               warpgroup_mma_wait)

from . import nf4_decode
from .host import cdiv
from .launch import launch

# The Triton kernels' pair decode (nf4_decode), compiled as Gluon functions: one PTX decode for both GEMMs
_scale_pair = gluon.jit(nf4_decode.scale_pair.fn)
_lut_scaled_pairs = gluon.jit(nf4_decode.lut_scaled_pairs.fn)

NUM_WARPS = 8
# cp.async of a pointer tensor into shared memory: async_load from Triton 3.7 on, the older name before
_cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_block_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # bar.sync of the CTA (renamed in 3.7)


if hasattr(gl.shared_memory_descriptor, "reinterpret"):  # Triton >= 3.7 (3.6: _reinterpret)
    @gluon.jit
    def _as_16bit(buf, DT: gl.constexpr, layout: gl.constexpr):
        """The (S, R, C) int32 buffer ``buf`` seen as (S, R, 2C) 16-bit values (the same bytes)."""
        return buf.reinterpret(DT, [buf.shape[0], buf.shape[1], 2 * buf.shape[2]], layout)
else:
    @gluon.jit
    def _as_16bit(buf, DT: gl.constexpr, layout: gl.constexpr):
        """The (S, R, C) int32 buffer ``buf`` seen as (S, R, 2C) 16-bit values (the same bytes)."""
        return buf._reinterpret(DT, [buf.shape[0], buf.shape[1], 2 * buf.shape[2]], layout)


@gluon.jit
def _act(g, ACT: gl.constexpr):
    """act(g) in fp32 (common.act_fwd's definitions): 0 silu, 1 gelu (erf), 2 gelu (tanh), 3 relu."""
    if ACT == 0:
        return g / (1.0 + gl.exp(-g))
    elif ACT == 1:
        return 0.5 * g * (1.0 + gl.erf(g * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g / (1.0 + gl.exp(-2.0 * inner))
    else:
        return gl.maximum(g, 0.0)


@gluon.jit
def _tile_rows(e, pid_n, N, N_TOTAL, layout: gl.constexpr, GATED: gl.constexpr, BLOCK_N: gl.constexpr,
               TN: gl.constexpr):
    """Global weight rows (E*N_TOTAL view) of the TN-row tile of program column ``pid_n``, and their mask:
    gate rows then up rows (GATED: BLOCK_N = TN / 2 features of each), or TN output rows."""
    j = gl.arange(0, TN, layout=layout)
    if GATED:
        feat = pid_n * BLOCK_N + j % BLOCK_N
        rows = (j // BLOCK_N) * N + feat
    else:
        feat = pid_n * BLOCK_N + j
        rows = feat
    return e.to(gl.int64) * N_TOTAL + rows, feat < N


@gluon.jit
def _load_scales(am_ptr, am2_ptr, w_rows, n_mask, k0, K_DIM, NESTED: gl.constexpr, BS: gl.constexpr,
                 BS2: gl.constexpr):
    """Per-row absmax code (nested) or value of one K step, and the per-row nested second-level absmax (0.0
    without nesting)."""
    blk = w_rows * (K_DIM // BS) + k0 // BS
    am = gl.load(am_ptr + blk, mask=n_mask, other=0)
    if NESTED:
        am2 = gl.load(am2_ptr + blk // BS2, mask=n_mask, other=0.0)
    else:
        am2 = gl.zeros_like(blk).to(gl.float32)
    return am, am2


@gluon.jit
def _decode_store(packed, am, am2, code2_ptr, offset, dst, NESTED: gl.constexpr, DT: gl.constexpr, tz):
    """Decode a (R, BLOCK_K/2) byte tile into (R, BLOCK_K) DT weights in ``dst`` (a (R, BLOCK_K/2) int32
    view of the tile: one (even, odd) pair per word, which is the tile's memory order); the table words in
    registers made from ``tz``, a runtime 0 (nf4_decode.lut_scaled_pairs)."""
    if NESTED:
        s = gl.load(code2_ptr + am.to(gl.int32)) * am2 + offset
    else:
        s = am
    s2 = gl.zeros_like(packed).to(gl.int32) + _scale_pair(s, DT)[:, None]
    dst.store(_lut_scaled_pairs(packed, s2, DT, gl.zeros_like(s2) + tz))


@gluon.jit
def _feed_prologue(x_ptr, stride_xm, w_ptr, am_ptr, am2_ptr, off_ptr, pair_ptr, e, pid_n, row_lo, row_hi, N, K_DIM,
                   K_HALF, N_TOTAL, x_s, wb_s, TOP_K: gl.constexpr, GATED: gl.constexpr, NESTED: gl.constexpr,
                   BS: gl.constexpr, BS2: gl.constexpr, BM: gl.constexpr, TN: gl.constexpr, BLOCK_N: gl.constexpr,
                   XL: gl.constexpr, WL: gl.constexpr):
    """The copying warps' addresses and the K loop's prologue: the tile's activation
    rows (gathered by token for the up projection; layout XL) and its weight rows (one wgmma of N = TN covers
    gate and up, so the activations are read once; layout WL), the nested offset, the K step count; then the
    activation rows and weight bytes of steps 0 .. D-1 in flight (one cp.async group per step, D = ring - 2)
    and the absmax of steps 0 and 1 in registers."""
    BK: gl.constexpr = 64
    D: gl.constexpr = x_s.type.shape[0] - 2
    offs_xm = row_lo + gl.arange(0, BM, layout=gl.SliceLayout(1, XL))
    xm_mask = offs_xm < row_hi
    if GATED:
        pair_x = gl.load(pair_ptr + offs_xm, mask=xm_mask, other=0)
        x_rows = (pair_x // TOP_K).to(gl.int64)
    else:
        x_rows = offs_xm.to(gl.int64)
    x_base = x_ptr + x_rows[:, None] * stride_xm + gl.arange(0, BK, layout=gl.SliceLayout(0, XL))[None, :]
    x_mask = xm_mask[:, None]
    w_rows, wn_mask = _tile_rows(e, pid_n, N, N_TOTAL, gl.SliceLayout(1, WL), GATED, BLOCK_N, TN)
    cols = gl.arange(0, BK // 2, layout=gl.SliceLayout(0, WL))
    if NESTED:
        offset = gl.load(off_ptr)
    else:
        offset = 0.0
    n_k = K_DIM // BK
    wb_base = w_ptr + w_rows[:, None] * K_HALF + cols[None, :]
    wb_mask = wn_mask[:, None]
    for s in gl.static_range(D):
        _cp_async(x_s.index(s), x_base + s * BK, mask=x_mask & (s < n_k))
        _cp_async(wb_s.index(s), wb_base + s * (BK // 2), mask=wb_mask & (s < n_k))
        async_copy.commit_group()
    am0, a20 = _load_scales(am_ptr, am2_ptr, w_rows, wn_mask, 0, K_DIM, NESTED, BS, BS2)
    am1, a21 = _load_scales(am_ptr, am2_ptr, w_rows, wn_mask, gl.minimum(1, n_k - 1) * BK, K_DIM, NESTED, BS, BS2)
    return x_base, x_mask, wb_base, wb_mask, w_rows, wn_mask, offset, n_k, am0, a20, am1, a21


@gluon.jit
def _epilogue(acc, e, pid_n, row_lo, row_hi, lb_ptr, scaling, xa_ptr, XA_SPLIT, gu_ptr, out_ptr, stride_om, pair_ptr,
              topw_ptr, N, N_TOTAL, R, P, R_PAD: gl.constexpr, GATED: gl.constexpr, ACT: gl.constexpr,
              HAS_LORA: gl.constexpr, WRITE_GU: gl.constexpr, WRITE_OUT: gl.constexpr, BM: gl.constexpr,
              TN: gl.constexpr, BLOCK_N: gl.constexpr, DT: gl.constexpr):
    """LoRA as one more wgmma into the (BM, TN) accumulator, then SwiGLU and the stores (up) or the routing
    weight and the scatter to pair rows (down); 8 warps."""
    ON: gl.constexpr = BLOCK_N // 8 if BLOCK_N < 256 else 32
    OL: gl.constexpr = gl.BlockedLayout([1, 8], [32 // ON, ON], [8, 1], [1, 0])
    LL: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [8, 1], [1, 0])
    if HAS_LORA:  # + (scaling·X·Aᵀ) Bᵀ: one more wgmma, K = R_PAD
        R_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, R_PAD], DT)
        B_SL: gl.constexpr = gl.NVMMASharedLayout.get_default_for([TN, R_PAD], DT)
        offs_lm = row_lo + gl.arange(0, BM, layout=gl.SliceLayout(1, LL))
        offs_r = gl.arange(0, R_PAD, layout=gl.SliceLayout(0, LL))
        lm_mask = (offs_lm < row_hi)[:, None]
        xa = gl.zeros([BM, R_PAD], gl.float32, LL)
        for s in range(XA_SPLIT):  # partials summed in order, as the Triton kernel does
            xa += gl.load(xa_ptr + (s * P + offs_lm[:, None].to(gl.int64)) * R_PAD + offs_r[None, :], mask=lm_mask,
                          other=0.0)
        xa_s = gl.allocate_shared_memory(DT, [BM, R_PAD], R_SL, (xa * scaling).to(DT))
        b_rows, b_mask = _tile_rows(e, pid_n, N, N_TOTAL, gl.SliceLayout(1, LL), GATED, BLOCK_N, TN)
        b = gl.load(lb_ptr + b_rows[:, None] * R + offs_r[None, :], mask=b_mask[:, None] & (offs_r < R)[None, :],
                    other=0.0)
        b_s = gl.allocate_shared_memory(DT, [TN, R_PAD], B_SL, b.to(DT))
        fence_async_shared()
        _block_barrier()
        acc = warpgroup_mma(xa_s, b_s.permute((1, 0)), acc)

    offs_om = row_lo + gl.arange(0, BM, layout=gl.SliceLayout(1, OL))
    om_mask = offs_om < row_hi
    offs_on = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, OL))
    store_mask = om_mask[:, None] & (offs_on < N)[None, :]
    if GATED:
        g, u = acc.reshape([BM, 2, BLOCK_N]).permute((0, 2, 1)).split()
        g = gl.convert_layout(g, OL)
        u = gl.convert_layout(u, OL)
        if WRITE_GU:  # training: the backward's SwiGLU derivative needs the pre-activations
            gu_ptrs = gu_ptr + offs_om.to(gl.int64)[:, None] * (2 * N) + offs_on[None, :]
            gl.store(gu_ptrs, g.to(gu_ptr.dtype.element_ty), mask=store_mask)
            gl.store(gu_ptrs + N, u.to(gu_ptr.dtype.element_ty), mask=store_mask)
        if WRITE_OUT:
            h = _act(g, ACT) * u
            gl.store(out_ptr + offs_om.to(gl.int64)[:, None] * stride_om + offs_on[None, :],
                     h.to(out_ptr.dtype.element_ty), mask=store_mask)
    else:
        pair = gl.load(pair_ptr + offs_om, mask=om_mask, other=0)
        wt = gl.load(topw_ptr + pair, mask=om_mask, other=0.0).to(gl.float32)
        h = gl.convert_layout(acc, OL) * wt[:, None]
        gl.store(out_ptr + pair.to(gl.int64)[:, None] * stride_om + offs_on[None, :], h.to(out_ptr.dtype.element_ty),
                 mask=store_mask)


@gluon.jit
def nf4_moe_gemm_wgmma_kernel(
    x_ptr,            # up: hidden_states (T, K_DIM); down: intermediate (P, K_DIM) sorted; fp16/bf16, unit K stride
    stride_xm,
    w_ptr,            # (E, N_TOTAL, K_HALF = K_DIM // 2) uint8 packed NF4 (K_HALF a multiple of 16: 16-byte loads)
    am_ptr,           # (E, N_TOTAL, K_DIM // BS) fp32 absmax, or uint8 codes when NESTED
    am2_ptr,          # (ceil(blocks / BS2),) fp32 nested absmax (unused unless NESTED)
    code2_ptr,        # (256,) fp32 nested code (unused unless NESTED)
    off_ptr,          # () fp32 nested offset (unused unless NESTED)
    lb_ptr,           # (E, N_TOTAL, R) LoRA B (unused unless HAS_LORA)
    scaling,          # float: lora_alpha / r
    xa_ptr,           # (XA_SPLIT, P, R_PAD) fp32 X·Aᵀ partials in sorted order (unused unless HAS_LORA)
    XA_SPLIT,
    gu_ptr,           # (P, 2N) pre-activation gate|up in sorted order, for the backward (WRITE_GU only)
    out_ptr,          # up: (P, N) sorted order; down: (P, N) indexed by pair id
    stride_om,
    pair_ptr,         # (P,) int32 pair ids sorted by expert
    tile_ptr,         # (row tiles, 3) int32: expert, first row, end row (tile_table.py)
    topw_ptr,         # (P,) routing weight per pair (down only)
    N, K_DIM, K_HALF, N_TOTAL, E, R, P,
    TOP_K: gl.constexpr, R_PAD: gl.constexpr, GATED: gl.constexpr, ACT: gl.constexpr, HAS_LORA: gl.constexpr,
    NESTED: gl.constexpr, BS: gl.constexpr, BS2: gl.constexpr, WRITE_GU: gl.constexpr, WRITE_OUT: gl.constexpr,
    BLOCK_M: gl.constexpr, TILE_N: gl.constexpr, BLOCK_N: gl.constexpr,
):
    """Grid: (cdiv(N, BLOCK_N), row tiles); 8 warps.  Program (n, m): row tile m of the table (BLOCK_M rows),
    features n*BLOCK_N ... of gate and up (GATED) or of the output (down); (BLOCK_M, TILE_N) is (128, 256) or
    (256, 128).  Rings of 4 activation and byte slots: copies run two steps ahead."""
    BM: gl.constexpr = BLOCK_M
    BK: gl.constexpr = 64
    XS: gl.constexpr = 4  # activation and weight-byte rings; copies run XS - 2 steps ahead
    D: gl.constexpr = XS - 2
    WS: gl.constexpr = 3
    DT: gl.constexpr = x_ptr.dtype.element_ty
    pid_n = gl.program_id(0)
    pid_m = gl.program_id(1)
    e = gl.load(tile_ptr + 3 * pid_m)
    if e >= E:
        return
    row_lo = gl.load(tile_ptr + 3 * pid_m + 1)
    row_hi = gl.load(tile_ptr + 3 * pid_m + 2)

    # layouts: activation rows for cp.async (16 bytes a thread), packed weight bytes (16 a thread), the
    # wgmma accumulator (two warp groups of 64 rows), the epilogue's stores (16 bytes a thread)
    XL: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [8, 1], [1, 0])
    WL: gl.constexpr = gl.BlockedLayout([1, 16], [16, 2], [8, 1], [1, 0])
    TN: gl.constexpr = TILE_N  # weight rows per tile: gate | up (GATED, BLOCK_N = TN / 2 each) or TN down rows
    ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1], instr_shape=[16, TN, 16])
    X_SL: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    W32_SL: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)

    x_s = gl.allocate_shared_memory(DT, [XS, BM, BK], X_SL)
    w32 = gl.allocate_shared_memory(gl.int32, [WS, TN, BK // 2], W32_SL)
    WB_SL: gl.constexpr = gl.SwizzledSharedLayout(vec=16, per_phase=1, max_phase=1, order=[1, 0])
    wb_s = gl.allocate_shared_memory(gl.uint8, [XS, TN, BK // 2], WB_SL)  # packed bytes, 16 per thread
    w_s = _as_16bit(w32, DT, X_SL)

    x_base, x_mask, wb_base, wb_mask, w_rows, wn_mask, offset, n_k, am0, a20, am1, a21 = _feed_prologue(
        x_ptr, stride_xm, w_ptr, am_ptr, am2_ptr, off_ptr, pair_ptr, e, pid_n, row_lo, row_hi, N, K_DIM, K_HALF,
        N_TOTAL, x_s, wb_s, TOP_K, GATED, NESTED, BS, BS2, BM, TN, BLOCK_N, XL, WL)

    acc = gl.zeros([BM, TN], gl.float32, ACC)
    tz = N >> 31  # 0, unknown to the compiler: the decode's table words stay in registers
    for i in range(n_k):
        ws = i % WS
        # 1. this thread's copies of step i have landed (each thread decodes the bytes it copied itself)
        async_copy.wait_group(D - 1)
        # 2. absmax of step i+2 (the last steps re-read their own: no branch, no out-of-range address)
        am2n, a22 = _load_scales(am_ptr, am2_ptr, w_rows, wn_mask, gl.minimum(i + 2, n_k - 1) * BK, K_DIM, NESTED, BS,
                                 BS2)
        # 3. decode step i into the weight ring
        _decode_store(wb_s.index(i % XS).load(WL), am0, a20, code2_ptr, offset, w32.index(ws), NESTED, DT, tz)
        am0, a20, am1, a21 = am1, a21, am2n, a22
        # 4. every thread's stores and copies of step i visible to the wgmma
        fence_async_shared()
        _block_barrier()
        # 5. activations and bytes of step i+D (the slots of step i+D-XS = i-2, whose wgmmas and decode every
        #    warp has finished), then the wgmma of step i
        _cp_async(x_s.index((i + D) % XS), x_base + (i + D) * BK, mask=x_mask & (i + D < n_k))
        _cp_async(wb_s.index((i + D) % XS), wb_base + (i + D) * (BK // 2), mask=wb_mask & (i + D < n_k))
        async_copy.commit_group()
        acc = warpgroup_mma(x_s.index(i % XS), w_s.index(ws).permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
    acc = warpgroup_mma_wait(0, deps=[acc])
    async_copy.wait_group(0)

    _epilogue(acc, e, pid_n, row_lo, row_hi, lb_ptr, scaling, xa_ptr, XA_SPLIT, gu_ptr, out_ptr, stride_om, pair_ptr,
              topw_ptr, N, N_TOTAL, R, P, R_PAD, GATED, ACT, HAS_LORA, WRITE_GU, WRITE_OUT, BM, TN, BLOCK_N, DT)


def block_n(gated: bool, tile_n: int) -> int:
    """Features per program: tile_n / 2 of gate and of up (one tile_n-row weight tile), or tile_n down rows."""
    return tile_n // 2 if gated else tile_n


def launch_nf4_moe_gemm_wgmma(x, w, lora_b, scaling, xa, sorted_pair_ids, tile_table, top_k_weights, out, *,
                              n: int, top_k: int, gated: bool, act_code: int, r: int, r_pad: int,
                              block_m: int, tile_n: int, gu: torch.Tensor | None = None,
                              write_out: bool = True) -> torch.Tensor:
    """Launch over the tiles of ``tile_table`` (tile_table.launch_tile_table with ``block_m``).  ``xa``:
    (XA_SPLIT, P, R_PAD) fp32 X·Aᵀ partials (lora_xa.py) or None without LoRA; ``gu``/``write_out`` as in
    grouped_gemm.launch_nf4_moe_gemm.  Eager launches only (torch.compile traces the Triton GEMM)."""
    num_experts, n_total, half_k = w.packed.shape
    bn = block_n(gated, tile_n)
    has_lora = xa is not None
    dummy = w.absmax
    grid = (cdiv(n, bn), tile_table.shape[0])
    # through launch.py's compiled-kernel cache like every other kernel: Triton's JITFunction.run re-binds and
    # re-keys the ~35 arguments on every call, which made eager Qwen3-30B-A3B T=1024 host-bound (NOTES v34)
    launch(
        nf4_moe_gemm_wgmma_kernel, grid, None,
        x, x.stride(0), *w.pointer_args(),
        lora_b if has_lora else dummy, float(scaling),
        xa if has_lora else dummy, xa.shape[0] if has_lora else 1,
        gu if gu is not None else dummy, out, out.stride(0), sorted_pair_ids, tile_table,
        top_k_weights if top_k_weights is not None else dummy,
        n, 2 * half_k, half_k, n_total, num_experts, r, sorted_pair_ids.numel(),
        TOP_K=top_k, R_PAD=r_pad, GATED=gated, ACT=act_code, HAS_LORA=has_lora, NESTED=w.nested,
        BS=w.blocksize, BS2=w.blocksize2, WRITE_GU=gu is not None, WRITE_OUT=write_out, BLOCK_M=block_m,
        TILE_N=tile_n, BLOCK_N=bn, num_warps=NUM_WARPS,
    )
    return out
