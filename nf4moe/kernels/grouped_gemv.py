"""Decode-size NF4 expert GEMV: a few rows per expert, every weight byte read once, no tensor cores.

At T of a few tokens each routed expert sees one or two rows, so the layer is a bandwidth problem: the
GEMM kernel (grouped_gemm.py) pads every expert to a 16-row MMA tile and pays for moving each decoded
tile into the MMA operand layout in every K step.  Here a program owns BLOCK_N weight rows of one expert
and its (1-4) rows and walks K in wide steps (up to 512 columns: several NF4 blocks per step, so more
bytes in flight per program):

- the packed bytes decode to unscaled NF4 values kept as even / odd column halves (no interleave);
- each row's matching even / odd activations multiply them in fp32 and the product is summed per NF4
  block, then scaled by that block's absmax (one multiply per block instead of one per weight);
- gate and up share the activations (GATED) and the SwiGLU epilogue; down multiplies by the routing
  weight and writes the pair's row (SCATTER), like the GEMM kernel, whose output layout it shares;
- LoRA: X·Aᵀ comes precomputed (lora_xa.py, as split-K partials summed here), and
  ``scaling * B · xa`` is added in the epilogue.

Grid: (cdiv(N, BLOCK_N), cdiv(P, BLOCK_M) + min(E, P)), the GEMM kernel's per-expert row-tile schedule.

Opt-in (``NF4MOE_GEMV_ROWS``, grouped_gemm.gemv_max_rows): on an H100 it tied the GEMM at T=1 (36.9 against
37.6 us on Qwen3-30B-A3B) and lost at T=16 (286 against 215 us).  Why, from its TTGIR: Triton's software
pipeliner stages only loads that feed a ``tl.dot``, so here every K step's loads are plain and waited on
(the GEMM's go through cp.async stages), and the per-row reductions cost ~90 warp shuffles per K step.
Next for it: prefetch the next step's bytes by hand before decoding the current one.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from .common import act_fwd, expert_row_tile, nested_offset
from .configs import _pinned, interpreting, launch_tuned, pow2
from .lora_xa import launch_lora_xa
from .nf4_decode import block_scale, nf4_code_pairs
from .operands import NF4Operand, r_pad


def gemv_configs() -> list[triton.Config]:
    # the last config is the fallback: a K step of 32 divides any K (a multiple of the NF4 blocksize >= 32)
    fallback = triton.Config({"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 32}, num_warps=4,
                             num_stages=1 if interpreting() else 3)
    if _pinned():  # NF4MOE_CONFIG pins the GEMM: the GEMV then also runs one config (GPU test runs)
        return [triton.Config({"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4, num_stages=3), fallback]
    if interpreting():
        return [triton.Config({"BLOCK_M": 2, "BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4, num_stages=1),
                triton.Config({"BLOCK_M": 1, "BLOCK_N": 16, "BLOCK_K": 64}, num_warps=4, num_stages=1), fallback]
    out = []
    for bm in (1, 2):
        for bn, bk, w, st in ((16, 256, 4, 3), (32, 256, 4, 3), (16, 512, 4, 2), (32, 512, 8, 2), (64, 256, 8, 2),
                              (32, 128, 4, 4), (64, 128, 4, 3)):
            out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st))
    return out + [fallback]


def prune_gemv(configs, named_args, **kwargs):
    """The K step must divide K (the loop has no tail); BLOCK_M must not exceed the bucket's rows."""
    def arg(name):
        return named_args[name] if name in named_args else kwargs[name]

    k_dim, bucket, n = arg("K_DIM"), arg("ROW_BUCKET"), arg("N")
    kept = [c for c in configs if k_dim % c.kwargs["BLOCK_K"] == 0 and c.kwargs["BLOCK_M"] <= max(1, bucket)
            and c.kwargs["BLOCK_N"] <= max(16, pow2(n))]
    if interpreting() or _pinned():
        return kept[:1] or configs[-1:]
    return kept or configs[-1:]


@triton.jit
def _row_dot(we, wo, x_row_ptr, stride_xk, row, row_hi, k0, s, NB: tl.constexpr, HB: tl.constexpr):
    """sum_k W[n, k] * x[k] over one K step for every weight row n: ``we``/``wo`` (R, NB, HB) unscaled
    even / odd NF4 values, ``s`` (R, NB) their block absmax, ``x_row_ptr`` the activation row."""
    cols = k0 + 2 * (tl.arange(0, NB)[:, None] * HB + tl.arange(0, HB)[None, :])
    mask = (cols * 0 + row) < row_hi  # row validity built as a tensor (the interpreter rejects scalar & tensor)
    xe = tl.load(x_row_ptr + cols * stride_xk, mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(x_row_ptr + (cols + 1) * stride_xk, mask=mask, other=0.0).to(tl.float32)
    return tl.sum(tl.sum(we * xe[None, :, :] + wo * xo[None, :, :], axis=2) * s, axis=1)


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
    N, K_DIM, N_TOTAL, E, R, P, ROW_BUCKET,
    TOP_K: tl.constexpr, E_POW2: tl.constexpr, R_PAD: tl.constexpr,
    GATED: tl.constexpr, ACT: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
    HAS_LORA: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr, LUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    e, row_lo, row_hi = expert_row_tile(eoff_ptr, tl.program_id(1), E, E_POW2, BLOCK_M)
    if e >= E:
        return
    # columns per absmax chunk of one K step: a whole NF4 block, or the whole step when it is smaller
    CH: tl.constexpr = BLOCK_K if BLOCK_K < BS else BS
    NB: tl.constexpr = BLOCK_K // CH
    HB: tl.constexpr = CH // 2
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    e64 = e.to(tl.int64)
    w_rows = e64 * N_TOTAL + offs_n
    offset = nested_offset(off_ptr, NESTED)
    offs_m = row_lo + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_hi
    col_m = tl.arange(0, BLOCK_M)
    nb = tl.arange(0, NB)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K_DIM, BLOCK_K):
        blk = (k0 + nb * CH) // BS
        sg = block_scale(am_ptr, am2_ptr, code2_ptr, offset, w_rows[:, None] * (K_DIM // BS) + blk[None, :],
                         n_mask[:, None], NESTED, BS2)
        ge, go = nf4_code_pairs(w_ptr, w_rows, n_mask, k0, K_DIM, NB, HB, LUT)
        if GATED:
            su = block_scale(am_ptr, am2_ptr, code2_ptr, offset, (w_rows[:, None] + N) * (K_DIM // BS) + blk[None, :],
                             n_mask[:, None], NESTED, BS2)
            ue, uo = nf4_code_pairs(w_ptr, w_rows + N, n_mask, k0, K_DIM, NB, HB, LUT)
        for m in tl.static_range(BLOCK_M):
            row = row_lo + m
            if GATHER:
                x_row = (tl.load(pair_ptr + tl.minimum(row, row_hi - 1)) // TOP_K).to(tl.int64)
            else:
                x_row = row.to(tl.int64)
            x_base = x_ptr + x_row * stride_xm
            part = _row_dot(ge, go, x_base, stride_xk, row, row_hi, k0, sg, NB, HB)
            acc += tl.where(col_m[None, :] == m, part[:, None], 0.0)
            if GATED:
                part_u = _row_dot(ue, uo, x_base, stride_xk, row, row_hi, k0, su, NB, HB)
                acc_up += tl.where(col_m[None, :] == m, part_u[:, None], 0.0)

    if HAS_LORA:  # + scaling * B[e] (BLOCK_N, R) · xa (R, BLOCK_M), xa summed over its split-K partials
        offs_r = tl.arange(0, R_PAD)
        r_mask = offs_r < R
        xa = tl.zeros((R_PAD, BLOCK_M), dtype=tl.float32)
        for s in range(XA_SPLIT):
            xa += tl.load(xa_ptr + (s * P + offs_m[None, :].to(tl.int64)) * R_PAD + offs_r[:, None],
                          mask=m_mask[None, :], other=0.0)
        xa = xa.to(x_ptr.dtype.element_ty).to(tl.float32)  # rounded to the activation dtype, as the GEMM does
        b = tl.load(lb_ptr + w_rows[:, None] * R + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += scaling * tl.sum(b[:, :, None] * xa[None, :, :], axis=1)
        if GATED:
            bu = tl.load(lb_ptr + (w_rows[:, None] + N) * R + offs_r[None, :],
                         mask=n_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
            acc_up += scaling * tl.sum(bu[:, :, None] * xa[None, :, :], axis=1)

    if GATED:
        acc = act_fwd(acc, ACT) * acc_up
    if SCATTER:
        pair = tl.load(pair_ptr + offs_m, mask=m_mask, other=0)
        wt = tl.load(topw_ptr + pair, mask=m_mask, other=0.0).to(tl.float32)
        acc = acc * wt[None, :]
        out_rows = pair.to(tl.int64)
    else:
        out_rows = offs_m.to(tl.int64)
    tl.store(out_ptr + out_rows[None, :] * stride_om + offs_n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=n_mask[:, None] & m_mask[None, :])


def gemv_max_rows() -> int:
    """Routed rows up to which the inference projections run the GEMV kernel (grouped_gemv.py) instead
    of the MMA GEMM; ``NF4MOE_GEMV_ROWS`` sets it.  Off (0) by default: on an H100 (Qwen3-30B-A3B, T=1)
    it measured 36.9 us against the GEMM's 37.6 us, and 286 against 215 us at T=16 (bench/NOTES.md)."""
    return int(os.environ.get("NF4MOE_GEMV_ROWS", "0"))


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
        n, 2 * half_k, n_total, num_experts, r, rows, bucket,
        **meta,
    )
    return out
