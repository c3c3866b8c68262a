"""Decode-size NF4 expert GEMV: a few rows per expert, every weight byte read once, no tensor cores.

At T of a token or two each routed expert sees one row, so the layer is a bandwidth and latency problem:
the GEMM kernel (grouped_gemm.py) pads every expert to a 16-row MMA tile and its 64-column weight tiles
leave too few programs (96 for the Qwen3-30B-A3B up projection at T=1) to keep enough loads in flight.
Here a program owns BLOCK_N weight rows (one or two per warp) of one expert and its BLOCK_M rows:

- the lanes of a warp read LANES*VEC contiguous bytes of a weight row per step (VEC = 4 bytes each), and
  a K chunk of STEPS steps is loaded at once; the next chunk's loads are issued by hand before the current
  one is decoded (K_DIM is a compile-time constant and the chunks are unrolled), because Triton's software
  pipeliner stages only loads that feed a ``tl.dot``;
- the bytes decode through the GEMMs' pair PTX (nf4_decode._lut_pairs_asm, absmax applied in it) and are
  multiplied in fp32 by activations loaded in the weights' own layout (a 16-byte vector per lane and step;
  no conversion through shared memory); each lane keeps its own partial sum per row, and the lanes are
  summed once, after the K loop (not once per step, which cost ~90 shuffles per step in the first version);
- gate and up share the activations (GATED) and the SwiGLU epilogue; down multiplies by the routing
  weight and writes the pair's row (SCATTER), like the GEMM kernel, whose output layout it shares;
- LoRA: X·Aᵀ comes precomputed (lora_xa.py, as split-K partials summed here), and
  ``scaling * B · xa`` is added in the epilogue.

Grid: (cdiv(N, BLOCK_N), cdiv(P, BLOCK_M) + min(E, P)), the GEMM kernel's per-expert row-tile schedule.
Measured on an H200 (bench/NOTES.md v30): Qwen3-30B-A3B T=1 30.1 us of GEMV + 4.7 us of X·Aᵀ against the
GEMM's 44.8 us (layer under a CUDA graph 0.046 against 0.060 ms), T=2 61.5 against 69.0 us, T=4 even, T=8
and above slower; GLM-4.5-Air T=1 105 against 133 us.  Used up to ``NF4MOE_GEMV_ROWS`` routed rows
(``gemv_max_rows``).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .common import act_fwd, expert_row_tile, nested_offset
from .configs import _pinned, interpreting, launch_tuned, pow2
from .lora_xa import launch_lora_xa
from .nf4_decode import _lut_decode_pairs, block_scale, nf4_value
from .operands import NF4Operand, r_pad


def gemv_configs() -> list[triton.Config]:
    """Candidates as (BLOCK_M, BLOCK_N, LANES, STEPS, VEC, num_warps): a K chunk of 2*LANES*STEPS*VEC columns
    (its tail past K masked), lanes of VEC bytes.  The last is the fallback (VEC = 4 bytes = 8 columns lie
    in one NF4 block of any blocksize >= 8)."""
    def cfg(bm, bn, lanes, steps, vec, warps):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "LANES": lanes, "STEPS": steps, "VEC": vec},
                             num_warps=warps, num_stages=1)

    fallback = cfg(1, 4, 8, 1, 4, 1)
    if _pinned():  # NF4MOE_CONFIG pins the GEMM: the GEMV then also runs one config (GPU test runs)
        return [cfg(2, 8, 32, 4, 4, 4), fallback]
    if interpreting():
        return [cfg(2, 32, 4, 4, 4, 1), fallback]
    out = []
    for bm in (1, 2):
        for bn, steps, warps in ((4, 4, 4), (8, 4, 4), (8, 8, 4), (16, 4, 8), (16, 2, 4), (4, 4, 1), (8, 2, 2)):
            out.append(cfg(bm, bn, 32, steps, 4, warps))
    return out + [fallback]


def prune_gemv(configs, named_args, **kwargs):
    """One lane's 2 * VEC columns must lie in one NF4 block; BLOCK_M must not exceed the bucket's rows."""
    def arg(name):
        return named_args[name] if name in named_args else kwargs[name]

    bucket, n, bs = arg("ROW_BUCKET"), arg("N"), arg("BS")
    kept = [c for c in configs if bs % (2 * c.kwargs["VEC"]) == 0
            and c.kwargs["BLOCK_M"] <= max(1, bucket) and c.kwargs["BLOCK_N"] <= max(4, pow2(n))]
    if interpreting() or _pinned():
        return kept[:1] or configs[-1:]
    return kept or configs[-1:]


@triton.jit
def _chunk_bytes(w_ptr, rows, row_mask, k0, K_DIM: tl.constexpr, LANES: tl.constexpr, STEPS: tl.constexpr,
                 VEC: tl.constexpr):
    """Packed bytes of W[rows, k0 : k0 + 2*LANES*STEPS*VEC] as (LANES, R, STEPS, VEC), bytes past K_DIM masked:
    step s of lane l holds VEC bytes = 2*VEC columns from k0 + 2*VEC*(s*LANES + l), so one warp-wide load of
    a step reads LANES*VEC contiguous bytes of a row.  The lane axis comes first so that Triton's coalescing
    gives it the threads of a warp (the weight rows get the warps; steps and bytes stay in each thread)."""
    j = k0 // 2 + VEC * (tl.arange(0, STEPS)[None, None, :, None] * LANES + tl.arange(0, LANES)[:, None, None, None]) \
        + tl.arange(0, VEC)[None, None, None, :]
    return tl.load(w_ptr + rows[None, :, None, None] * (K_DIM // 2) + j,
                   mask=row_mask[None, :, None, None] & (j < K_DIM // 2), other=0)


@triton.jit
def _chunk_scales(am_ptr, am2_ptr, code2_ptr, offset, rows, row_mask, k0, K_DIM: tl.constexpr, LANES: tl.constexpr,
                  STEPS: tl.constexpr, VEC: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr):
    """fp32 absmax (LANES, R, STEPS) of each lane's step of 2*VEC columns (inside one NF4 block)."""
    c = k0 + 2 * VEC * (tl.arange(0, STEPS)[None, None, :] * LANES + tl.arange(0, LANES)[:, None, None])
    blk = rows[None, :, None] * (K_DIM // BS) + c // BS
    return block_scale(am_ptr, am2_ptr, code2_ptr, offset, blk, row_mask[None, :, None] & (c < K_DIM), NESTED, BS2)


@triton.jit
def _chunk_loads(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, g_rows, u_rows, row_mask, k0, K_DIM: tl.constexpr,
                 LANES: tl.constexpr, STEPS: tl.constexpr, VEC: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr,
                 BS2: tl.constexpr, GATED: tl.constexpr):
    """Every load of a K chunk, issued together: (gate bytes, gate absmax, up bytes, up absmax); the up
    pair repeats the gate pair when not GATED (unused there)."""
    bg = _chunk_bytes(w_ptr, g_rows, row_mask, k0, K_DIM, LANES, STEPS, VEC)
    sg = _chunk_scales(am_ptr, am2_ptr, code2_ptr, offset, g_rows, row_mask, k0, K_DIM, LANES, STEPS, VEC, NESTED, BS,
                       BS2)
    bu = bg
    su = sg
    if GATED:
        bu = _chunk_bytes(w_ptr, u_rows, row_mask, k0, K_DIM, LANES, STEPS, VEC)
        su = _chunk_scales(am_ptr, am2_ptr, code2_ptr, offset, u_rows, row_mask, k0, K_DIM, LANES, STEPS, VEC, NESTED,
                           BS, BS2)
    return bg, sg, bu, su


@triton.jit
def _chunk_x(x_row_ptr, stride_xk, valid, k0, K_DIM: tl.constexpr, R: tl.constexpr, LANES: tl.constexpr,
             STEPS: tl.constexpr, VEC: tl.constexpr):
    """Activations of one row for a K chunk as (even, odd) (LANES, R, STEPS, VEC), in the weights' layout:
    the pointer is broadcast over the R weight rows (L1 hits), so the load takes the weights' own layout (a
    vector of 2*VEC activations per lane and step) and needs no conversion through shared memory."""
    lane = tl.arange(0, LANES)[:, None, None, None]
    step = tl.arange(0, STEPS)[None, None, :, None]
    c = k0 + 2 * VEC * (step * LANES + lane) + tl.arange(0, 2 * VEC)[None, None, None, :] + \
        tl.zeros((1, R, 1, 1), dtype=tl.int32)
    x = tl.load(x_row_ptr + c * stride_xk, mask=(c < K_DIM) & ((c * 0 + valid) != 0), other=0.0)
    return tl.split(tl.reshape(x, (LANES, R, STEPS, VEC, 2)))


@triton.jit
def _chunk_weights(packed, s, LUT: tl.constexpr, DT: tl.constexpr):
    """Dequantized (even, odd) columns of a chunk's bytes as fp32 (LANES, R, STEPS, VEC); ``s`` (LANES, R,
    STEPS) their absmax.  LUT: the PTX pair decode of the GEMMs (each byte's two weights times the absmax in one
    DT pair register, rounded to DT as the GEMMs do; the bound of the reference comparison covers it), widened
    to fp32 for the products; else the fp32 select tree."""
    if LUT:
        even, odd = _lut_decode_pairs(packed, s[:, :, :, None], DT)
        return even.to(tl.float32), odd.to(tl.float32)
    else:
        q = packed.to(tl.int32)
        return nf4_value(q >> 4) * s[:, :, :, None], nf4_value(q & 15) * s[:, :, :, None]


@triton.jit
def _lane_dot(we, wo, xe, xo):
    """Per lane and weight row: sum over the lane's columns of W[n, k] * x[k], (LANES, R) fp32.  The sum stays
    inside each thread (no shuffle); lanes are summed once, after the K loop."""
    return tl.sum(tl.sum(we * xe.to(tl.float32) + wo * xo.to(tl.float32), axis=3), axis=2)


@triton.autotune(
    configs=gemv_configs(),
    key=["N", "K_DIM", "ROW_BUCKET", "GATED", "HAS_LORA", "BS"],
    prune_configs_by={"early_config_prune": prune_gemv},
)
@triton.jit
def nf4_moe_gemv_kernel(
    x_ptr,            # up: hidden_states (T, K_DIM); down: intermediate (P, K_DIM) in sorted order
    stride_xm, stride_xk,
    w_ptr,            # (E, N_TOTAL, K_DIM // 2) uint8 packed NF4
    am_ptr, am2_ptr, code2_ptr, off_ptr,  # absmax (fp32, or uint8 codes + nested statistics when NESTED)
    lb_ptr,           # (E, N_TOTAL, R) LoRA B (unused unless HAS_LORA)
    scaling,
    xa_ptr,           # (XA_SPLIT, P, R_PAD) fp32 partial X·Aᵀ in sorted order (HAS_LORA only)
    XA_SPLIT,
    out_ptr,          # up: (P, N) sorted order; down: (P, N) indexed by pair id
    stride_om,
    pair_ptr, eoff_ptr, topw_ptr,
    N, N_TOTAL, E, R, P, ROW_BUCKET,
    K_DIM: tl.constexpr, TOP_K: tl.constexpr, E_POW2: tl.constexpr, R_PAD: tl.constexpr,
    GATED: tl.constexpr, ACT: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
    HAS_LORA: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr, LUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LANES: tl.constexpr, STEPS: tl.constexpr, VEC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    e, row_lo, row_hi = expert_row_tile(eoff_ptr, tl.program_id(1), E, E_POW2, BLOCK_M)
    if e >= E:
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    e64 = e.to(tl.int64)
    g_rows = e64 * N_TOTAL + offs_n
    u_rows = g_rows + N
    offset = nested_offset(off_ptr, NESTED)
    offs_m = row_lo + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_hi
    col_m = tl.arange(0, BLOCK_M)

    acc = tl.zeros((LANES, BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((LANES, BLOCK_N, BLOCK_M), dtype=tl.float32)
    # K chunks unrolled (K_DIM is a compile-time constant): every load of a chunk is issued at once, the
    # next chunk's by hand before the current one is decoded (Triton's pipeliner stages only loads that
    # feed a tl.dot), so each thread keeps up to two chunks of bytes in flight
    CHUNK: tl.constexpr = 2 * LANES * STEPS * VEC
    NCH: tl.constexpr = (K_DIM + CHUNK - 1) // CHUNK
    nxt_g, nsc_g, nxt_u, nsc_u = _chunk_loads(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, g_rows, u_rows, n_mask, 0,
                                              K_DIM, LANES, STEPS, VEC, NESTED, BS, BS2, GATED)
    for it in tl.static_range(NCH):
        k0 = it * CHUNK
        cur_g = nxt_g
        sc_g = nsc_g
        cur_u = nxt_u
        sc_u = nsc_u
        if it + 1 < NCH:
            nxt_g, nsc_g, nxt_u, nsc_u = _chunk_loads(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, g_rows, u_rows, n_mask,
                                                      k0 + CHUNK, K_DIM, LANES, STEPS, VEC, NESTED, BS, BS2, GATED)
        ge, go = _chunk_weights(cur_g, sc_g, LUT, x_ptr.dtype.element_ty)
        if GATED:
            ue, uo = _chunk_weights(cur_u, sc_u, LUT, x_ptr.dtype.element_ty)
        for m in tl.static_range(BLOCK_M):
            row = row_lo + m
            valid = row < row_hi
            if GATHER:
                x_row = (tl.load(pair_ptr + tl.minimum(row, row_hi - 1)) // TOP_K).to(tl.int64)
            else:
                x_row = tl.minimum(row, row_hi - 1).to(tl.int64)
            xe, xo = _chunk_x(x_ptr + x_row * stride_xm, stride_xk, valid, k0, K_DIM, BLOCK_N, LANES, STEPS, VEC)
            sel = col_m[None, None, :] == m
            acc += tl.where(sel, _lane_dot(ge, go, xe, xo)[:, :, None], 0.0)
            if GATED:
                acc_up += tl.where(sel, _lane_dot(ue, uo, xe, xo)[:, :, None], 0.0)
    acc2 = tl.sum(acc, axis=0)  # (BLOCK_N, BLOCK_M): the lanes summed once
    acc2_up = tl.sum(acc_up, axis=0)

    if HAS_LORA:  # + scaling * B[e] (BLOCK_N, R) · xa (R, BLOCK_M), xa summed over its split-K partials
        offs_r = tl.arange(0, R_PAD)
        r_mask = offs_r < R
        xa = tl.zeros((R_PAD, BLOCK_M), dtype=tl.float32)
        for s in range(XA_SPLIT):
            xa += tl.load(xa_ptr + (s * P + offs_m[None, :].to(tl.int64)) * R_PAD + offs_r[:, None],
                          mask=m_mask[None, :], other=0.0)
        xa = xa.to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to the activation dtype, as the GEMM does
        b = tl.load(lb_ptr + g_rows[:, None] * R + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :],
                    other=0.0).to(tl.float32)
        acc2 += scaling * tl.sum(b[:, :, None] * xa[None, :, :], axis=1)
        if GATED:
            bu = tl.load(lb_ptr + u_rows[:, None] * R + offs_r[None, :],
                         mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            acc2_up += scaling * tl.sum(bu[:, :, None] * xa[None, :, :], axis=1)

    if GATED:
        acc2 = act_fwd(acc2, ACT) * acc2_up
    if SCATTER:
        pair = tl.load(pair_ptr + offs_m, mask=m_mask, other=0)
        wt = tl.load(topw_ptr + pair, mask=m_mask, other=0.0).to(tl.float32)
        acc2 = acc2 * wt[None, :]
        out_rows = pair.to(tl.int64)
    else:
        out_rows = offs_m.to(tl.int64)
    tl.store(out_ptr + out_rows[None, :] * stride_om + offs_n[:, None], acc2.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & m_mask[None, :])


def gemv_max_rows() -> int:
    """Routed rows up to which the inference projections run the GEMV kernel (grouped_gemv.py) instead
    of the MMA GEMM; ``NF4MOE_GEMV_ROWS`` sets it (0: never).  Default 16 (T <= 2 at top-8): on an H200 it
    measured 30 + 5 us against the GEMM's 45 us at T=1 and 62 against 69 us at T=2 (Qwen3-30B-A3B), even at
    T=4 and slower from T=8 (bench/NOTES.md v30)."""
    return int(os.environ.get("NF4MOE_GEMV_ROWS", "16"))


def launch_nf4_moe_gemv(x, w: NF4Operand, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, top_k_weights,
                        out, *, n, top_k, gated, act, launcher=None):
    """The inference projection of grouped_gemm.launch_nf4_moe_gemm (same arguments, no training stores)."""
    from .grouped_gemm import grid, launch_key, projection_meta  # grouped_gemm imports this module
    num_experts, n_total, half_k = w.packed.shape
    rows = sorted_pair_ids.numel()
    dummy = w.absmax
    r = lora_a.shape[1] if lora_a is not None else 0
    rp = r_pad(r)
    xa = None
    if lora_a is not None:
        xa = launch_lora_xa(x, lora_a, sorted_pair_ids, expert_offsets, top_k=top_k, gather=gated, r_pad=rp,
                            launcher=launcher)
    bucket = 8 if rows <= 8 else 64
    meta = projection_meta(x, w, top_k=top_k, r_pad=rp, gated=gated, act=act, has_lora=lora_a is not None)
    key = launch_key("gemv", n, bucket, x, w, out, lora_b if lora_a is not None else None, meta)
    launch_tuned(
        nf4_moe_gemv_kernel, grid(n, rows, num_experts), key, launcher,
        x, x.stride(0), x.stride(1),
        *w.pointer_args(),
        lora_b if lora_a is not None else dummy, float(scaling),
        xa if xa is not None else dummy, xa.shape[0] if xa is not None else 1,
        out, out.stride(0),
        sorted_pair_ids, expert_offsets, top_k_weights if top_k_weights is not None else dummy,
        n, n_total, num_experts, r, rows, bucket,
        K_DIM=2 * half_k, **meta,
    )
    return out
