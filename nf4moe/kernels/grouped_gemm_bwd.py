"""Transposed fused NF4 grouped GEMM: the input gradients of both expert projections.

For a projection y = x Wᵀ + s (x Aᵀ) Bᵀ with W[e] (KR, N) stored NF4 (rows KR = out, packed along
N = in), the input gradient is dx = dy W + s (dy B) A: a grouped GEMM reducing over KR.  Each
program owns BLOCK_M sorted rows of one expert and BLOCK_N columns of N; the K loop walks KR in
BLOCK_K steps and dequantizes the (BLOCK_K, BLOCK_N) tile W[e][k0:k0+BLOCK_K, n0:n0+BLOCK_N] with
``dequant_operand`` (rows = KR indices, columns = one aligned slice of an NF4 block: BLOCK_N divides the
blocksize; the forward's PTX table decode in compiled 16-bit code, the fp32 select tree otherwise).  The tile is already (K, N), the right operand of acc (BLOCK_M, BLOCK_N) = dy @ W: the
transposed access costs nothing, and no copy of W is made.  dy·B (BLOCK_M, R) is accumulated in the
same loop; the epilogue adds s·(dy B)·A.

Two modes (constexpr DOWN):

- down (DOWN=1): W = down_proj (H, I), so KR = H, N = I.  dy rows are ``dout[pair // K]`` (the
  combine backward fused in: dout is read by token, no (P, H) dy is built).  The epilogue holds
  dhu = dout W + s (dout B) A for I columns and does the SwiGLU backward in registers from the
  saved pre-activation gu: dh = w·dhu, dg = dh·u·act'(g), du = dh·act(g) -> ``dgu`` (P, 2I).  It
  also emits the pieces the other gradients need: the partial d(top_k_weights) <dhu, h> over its I
  columns (one row of ``dw`` per column tile, summed in fixed order afterwards: deterministic), the
  partial h·A_dᵀ over its I columns (``xa``, for d lora_B_down), and w·(dout B) (``dzb``, column
  tile 0 only, for d lora_A_down).
- up (DOWN=0): W = gate_up_proj (2I, H), so KR = 2I, N = H.  dy rows are ``dgu`` (sorted order);
  the result dx of each pair is written at row ``pair`` of (P, H) and combined per token afterwards
  by the deterministic combine kernel.  dgu·B goes to ``dzb`` for d lora_A_up.

BLOCK_N is fixed by the launcher (not autotuned) because it sets the number of partial rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import act_and_grad, dot_operand, expert_row_tile, nested_offset
from .configs import row_bucket
from .host import ACT_CODES, cdiv, interpreting, pow2, r_pad
from .nf4_decode import dequant_operand
from .operands import NF4Operand, use_lut


def _configs():
    if interpreting():  # 64-deep K steps: half the interpreted loop trips of 32
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 64}, num_warps=4, num_stages=1)]
    out = []
    # Triton 3.6 on H100 compiles BLOCK_M = 16 * num_warps with BLOCK_K = 64 (the wgmma path with this
    # decoded right operand: (64, 64, 4 warps) and (128, 64, 8 warps), 3 or 4 stages) to code that
    # faults with an illegal address; those shapes are left out.
    for bm, bk, w, st in ((16, 64, 4, 4), (32, 64, 4, 4), (64, 64, 8, 4), (64, 32, 8, 4), (128, 32, 4, 4)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=st))
    return out


def _prune(configs, named_args, **kwargs):
    bucket = named_args.get("ROW_BUCKET", kwargs.get("ROW_BUCKET"))
    if named_args["dy_ptr"].dtype == torch.float32:
        # Triton 3.6 fails to compile the Hopper wgmma path (BLOCK_M >= 64) for a tf32 dot whose right
        # operand is the in-register decoded tile; fp32 training takes the mma.sync configs.
        return [c for c in configs if c.kwargs["BLOCK_M"] <= 32]
    kept = [c for c in configs if not (bucket <= 64 and c.kwargs["BLOCK_M"] > 16)
            and not (bucket > 1024 and c.kwargs["BLOCK_M"] < 64)]
    return kept or configs[:1]


@triton.autotune(configs=_configs(), key=["N", "KR", "ROW_BUCKET", "DOWN", "HAS_LORA", "NEED_DY"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def nf4_moe_gemm_t_kernel(
    dy_ptr,           # down: dout (T, KR) read at row pair // TOP_K; up: dgu (P, KR) sorted rows; x dtype
    stride_dm, stride_dk,
    w_ptr,            # (E, KR, N // 2) uint8 packed NF4
    am_ptr,           # (E, KR, N // BS) fp32 absmax, or uint8 codes when NESTED
    am2_ptr,          # nested absmax (fp32), unused unless NESTED
    code2_ptr,        # (256,) fp32 nested code, unused unless NESTED
    off_ptr,          # () fp32 nested offset, unused unless NESTED
    la_ptr,           # (E, R, N) LoRA A, unused unless HAS_LORA
    lb_ptr,           # (E, KR, R) LoRA B, unused unless HAS_LORA
    scaling,          # float: lora_alpha / r
    out_ptr,          # down: dgu (P, 2N) sorted rows; up: dx per pair (P, N) at row pair id; x dtype
    gu_ptr,           # down: saved pre-activation (P, 2N) sorted rows, x dtype; unused in up
    dzb_ptr,          # (P, R_PAD) fp32 sorted rows: down dout B, up dgu B (NEED_DZB)
    dw_ptr,           # down: (cdiv(N, BLOCK_N), T*K) fp32 partial <dhu, h> at column pair id (NEED_DW)
    xa_ptr,           # down: (cdiv(N, BLOCK_N), P, R_PAD) fp32 partial h A_d^T, sorted rows (NEED_XA)
    pair_ptr,         # (P,) int32 pair ids sorted by expert
    eoff_ptr,         # (E + 1,) int32 expert offsets into pair_ptr
    topw_ptr,         # (P,) routing weight per pair id (down only)
    N, KR, E, R, P, ROW_BUCKET,
    TOP_K: tl.constexpr, E_POW2: tl.constexpr, R_PAD: tl.constexpr, DOWN: tl.constexpr, ACT: tl.constexpr,
    HAS_LORA: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
    NEED_DY: tl.constexpr, NEED_OUT: tl.constexpr, NEED_DW: tl.constexpr, NEED_XA: tl.constexpr,
    NEED_DZB: tl.constexpr, INTERPRET: tl.constexpr, LUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(N, BLOCK_N), cdiv(P, BLOCK_M) + min(E, P)); acc is (BLOCK_M, BLOCK_N).

    NEED_DY: run the NF4 GEMM (dx, or dhu for dgu / dw); without it only dy B (for dzb) and the
    h A^T partials are computed.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e, start, row_hi = expert_row_tile(eoff_ptr, pid_m, E, E_POW2, BLOCK_M)
    if e >= E:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_hi
    pair = tl.load(pair_ptr + offs_m, mask=m_mask, other=0)
    rows64 = offs_m.to(tl.int64)
    if DOWN:
        dy_rows = (pair // TOP_K).to(tl.int64)
    else:
        dy_rows = rows64

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # N is a multiple of BS, BLOCK_N divides BS: no mask
    e64 = e.to(tl.int64)
    dt = dy_ptr.dtype.element_ty
    offset = nested_offset(off_ptr, NESTED)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if NEED_DY or (HAS_LORA and NEED_DZB):
        for k0 in range(0, KR, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < KR
            dy = tl.load(dy_ptr + dy_rows[:, None] * stride_dm + offs_k[None, :] * stride_dk,
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if INTERPRET:  # the interpreter's bf16 dot is wrong: fp32 operands there only
                dy = dy.to(tl.float32)
            w_rows = e64 * KR + offs_k
            if NEED_DY:
                # rows = KR indices of W[e], columns n0:n0+BLOCK_N: the transposed read of the same bytes
                w = dequant_operand(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, w_rows, k_mask, pid_n * BLOCK_N, N,
                                    BS, BS2, NESTED, BLOCK_N, dt, LUT, INTERPRET, False)
                acc = tl.dot(dy, w, acc)
            if HAS_LORA:
                b = tl.load(lb_ptr + w_rows[:, None] * R + offs_r[None, :], mask=k_mask[:, None] & r_mask[None, :],
                            other=0.0)
                b = dot_operand(b, dt, INTERPRET)
                acc_b = tl.dot(dy, b, acc_b)

    if DOWN:
        wt = tl.load(topw_ptr + pair, mask=m_mask, other=0.0).to(tl.float32)
    if HAS_LORA:
        if NEED_DZB:
            if pid_n == 0:  # unweighted (down: the LoRA A gradient scales its rows by w)
                tl.store(dzb_ptr + rows64[:, None] * R_PAD + offs_r[None, :], acc_b, mask=m_mask[:, None])
        if NEED_DY:
            a = tl.load(la_ptr + (e64 * R + offs_r[:, None]) * N + offs_n[None, :], mask=r_mask[:, None], other=0.0)
            db = dot_operand(acc_b.to(dt), dt, INTERPRET)  # rounded to dt like the forward's operands
            a = dot_operand(a, dt, INTERPRET)
            acc += scaling * tl.dot(db, a)

    if DOWN and (NEED_DW or NEED_XA or NEED_OUT):
        gptr = gu_ptr + rows64[:, None] * (2 * N) + offs_n[None, :]
        g = tl.load(gptr, mask=m_mask[:, None], other=0.0).to(tl.float32)
        u = tl.load(gptr + N, mask=m_mask[:, None], other=0.0).to(tl.float32)
        act_g, dact_g = act_and_grad(g, ACT)
        h = act_g * u
        if NEED_DW:
            part = tl.sum(acc * h, axis=1)
            tl.store(dw_ptr + pid_n * P + pair, part, mask=m_mask)
        if NEED_XA:
            # h A_d^T over this program I columns; the column tiles are summed in fixed order afterwards
            at = tl.load(la_ptr + (e64 * R + offs_r[None, :]) * N + offs_n[:, None], mask=r_mask[None, :], other=0.0)
            hx = dot_operand(h.to(dt), dt, INTERPRET)
            at = dot_operand(at, dt, INTERPRET)
            xa = tl.dot(hx, at)
            tl.store(xa_ptr + (pid_n * P + rows64[:, None]) * R_PAD + offs_r[None, :], xa, mask=m_mask[:, None])
        if NEED_OUT:
            dh = acc * wt[:, None]
            optr = out_ptr + rows64[:, None] * (2 * N) + offs_n[None, :]
            tl.store(optr, (dh * u * dact_g).to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
            tl.store(optr + N, (dh * act_g).to(out_ptr.dtype.element_ty), mask=m_mask[:, None])
    if not DOWN:
        if NEED_OUT:
            optr = out_ptr + pair.to(tl.int64)[:, None] * N + offs_n[None, :]
            tl.store(optr, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def block_n(blocksize: int) -> int:
    """Column tile of the transposed GEMM: divides the NF4 blocksize (one absmax per tile row)."""
    return min(64, blocksize)


def launch_nf4_moe_gemm_t(
    dy: torch.Tensor,
    w: NF4Operand,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    sorted_pair_ids: torch.Tensor,
    expert_offsets: torch.Tensor,
    *,
    down: bool,
    out: torch.Tensor | None,
    gu: torch.Tensor | None = None,
    top_k_weights: torch.Tensor | None = None,
    dzb: torch.Tensor | None = None,
    dw_part: torch.Tensor | None = None,
    xa_part: torch.Tensor | None = None,
    top_k: int = 1,
    act: str = "silu",
    launcher=None,
) -> None:
    """Launch the kernel; outputs given as None are not computed.  ``launcher`` is ``wrap_triton`` when traced.

    down: dy = dout (T, H), out = dgu (P, 2I), gu (P, 2I), top_k_weights (P,), dw_part
    (cdiv(I, block_n), P) zero-filled, xa_part (cdiv(I, block_n), P, R_PAD); up: dy = dgu (P, 2I),
    out = dx per pair (P, H).  dzb (P, R_PAD) fp32 in both.
    """
    packed, absmax, nested = w.packed, w.absmax, w.nested
    blocksize, blocksize2 = w.blocksize, w.blocksize2
    num_experts, kr, half_n = packed.shape
    n = 2 * half_n
    rows = sorted_pair_ids.numel()
    has_lora = lora_a is not None and lora_a.shape[1] > 0
    r = lora_a.shape[1] if has_lora else 0
    need_dzb = dzb is not None and has_lora
    need_xa = xa_part is not None and has_lora and down
    need_dw = dw_part is not None and down
    need_out = out is not None
    need_dy = need_out or need_dw
    if not (need_dy or need_dzb or need_xa):
        return
    bn = block_n(blocksize)
    dummy = absmax
    kern = launcher(nf4_moe_gemm_t_kernel) if launcher is not None else nf4_moe_gemm_t_kernel
    # Without the NF4 GEMM only column tile 0 has work (dzb), unless the h·Aᵀ partials need every tile.
    n_tiles = cdiv(n, bn) if (need_dy or need_xa) else 1
    grid = lambda meta: (n_tiles, cdiv(rows, meta["BLOCK_M"]) + min(num_experts, rows))
    kern[grid](
        dy, dy.stride(0), dy.stride(1),
        *w.pointer_args(),
        lora_a if has_lora else dummy, lora_b if has_lora else dummy, float(scaling),
        out if need_out else dummy, gu if down else dummy,
        dzb if need_dzb else dummy, dw_part if need_dw else dummy, xa_part if need_xa else dummy,
        sorted_pair_ids, expert_offsets, top_k_weights if down else dummy,
        n, kr, num_experts, r, rows, row_bucket(rows),
        TOP_K=top_k, E_POW2=pow2(num_experts), R_PAD=r_pad(r), DOWN=down,
        ACT=ACT_CODES[act], HAS_LORA=has_lora, NESTED=nested, BS=blocksize, BS2=blocksize2,
        NEED_DY=need_dy, NEED_OUT=need_out, NEED_DW=need_dw, NEED_XA=need_xa, NEED_DZB=need_dzb,
        INTERPRET=interpreting(), LUT=use_lut(dy.dtype), BLOCK_N=bn,
    )
