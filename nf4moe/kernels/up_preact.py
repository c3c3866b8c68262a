"""Up projection for training: the pre-activation gate|up rows that the SwiGLU backward needs.

Same data flow as the forward up kernel (rows gathered from hidden_states by token = pair // K, NF4
tiles of ``gate_up_proj[e]`` dequantized in the H loop, LoRA x·Aᵀ accumulated in the same loop), but
the epilogue writes, in sorted row order:

- ``gu`` (P, 2I): gate (columns [0, I)) and up (columns [I, 2I)) before the activation, LoRA included;
- ``h``  (P, I): act(gate) * up, the input of the down projection (forward of a training step only);
- ``xa`` (P, R_PAD) fp32: x·Aᵀ per row, the right factor of d(lora_B) (program column 0 only).

Used by the training forward (save mode: one pass gives h for the down GEMM and gu for the backward)
and by the backward in recompute mode (gu and xa only).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import act_fwd, expert_row_tile, nested_offset
from .operands import NF4Operand
from .configs import interpreting, row_bucket
from .nf4_decode import dequant_rows
from .grouped_gemm import ACT_CODES


def _configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    out = []
    for bm, bn, w, st in ((16, 64, 4, 4), (32, 64, 4, 4), (64, 64, 4, 3), (64, 128, 8, 3), (128, 64, 8, 3),
                          (128, 128, 8, 3)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st))
    return out


def _prune(configs, named_args, **kwargs):
    bucket = named_args.get("ROW_BUCKET", kwargs.get("ROW_BUCKET"))
    kept = [c for c in configs if not (bucket <= 64 and c.kwargs["BLOCK_M"] > 16)
            and not (bucket > 1024 and c.kwargs["BLOCK_M"] < 64)]
    return kept or configs[:1]


@triton.autotune(configs=_configs(), key=["I", "H", "ROW_BUCKET", "HAS_LORA", "WRITE_H"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def up_preact_kernel(
    x_ptr,            # hidden_states (T, H) fp16/bf16/fp32, any strides
    stride_xm, stride_xk,
    w_ptr,            # (E, 2I, H // 2) uint8 packed NF4 gate_up_proj
    am_ptr,           # (E, 2I, H // BS) fp32 absmax, or uint8 codes when NESTED
    am2_ptr,          # nested absmax (fp32), unused unless NESTED
    code2_ptr,        # (256,) fp32 nested code, unused unless NESTED
    off_ptr,          # () fp32 nested offset, unused unless NESTED
    la_ptr,           # (E, R, H) LoRA A, unused unless HAS_LORA
    lb_ptr,           # (E, 2I, R) LoRA B, unused unless HAS_LORA
    scaling,          # float: lora_alpha / r
    gu_ptr,           # (P, 2I) x dtype: pre-activation gate | up, sorted rows (WRITE_GU)
    h_ptr,            # (P, I) x dtype: act(gate) * up, sorted rows (WRITE_H)
    xa_ptr,           # (P, R_PAD) fp32: x A^T, sorted rows (WRITE_XA)
    pair_ptr,         # (P,) int32 pair ids sorted by expert
    eoff_ptr,         # (E + 1,) int32 expert offsets into pair_ptr
    I, H, E, R, ROW_BUCKET,
    TOP_K: tl.constexpr, E_POW2: tl.constexpr, R_PAD: tl.constexpr, ACT: tl.constexpr,
    HAS_LORA: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
    WRITE_GU: tl.constexpr, WRITE_H: tl.constexpr, WRITE_XA: tl.constexpr, INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(I, BLOCK_N), cdiv(P, BLOCK_M) + min(E, P)); acc is (BLOCK_N, BLOCK_M) (swap-AB)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    e, start, row_hi = expert_row_tile(eoff_ptr, pid_m, E, E_POW2, BLOCK_M)
    if e >= E:
        return
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_hi
    pair = tl.load(pair_ptr + offs_m, mask=m_mask, other=0)
    x_rows = (pair // TOP_K).to(tl.int64)
    rows64 = offs_m.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    e64 = e.to(tl.int64)
    w_rows = e64 * 2 * I + offs_n
    dt = x_ptr.dtype.element_ty
    offset = nested_offset(off_ptr, NESTED)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R

    acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_xa = tl.zeros((R_PAD, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + x_rows[None, :] * stride_xm + offs_k[:, None] * stride_xk, mask=m_mask[None, :], other=0.0)
        wg = dequant_rows(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, w_rows, n_mask, k0, H, BS, BS2, NESTED, BLOCK_K)
        wu = dequant_rows(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, w_rows + I, n_mask, k0, H, BS, BS2, NESTED,
                          BLOCK_K)
        if INTERPRET:  # the interpreter's bf16 dot is wrong: fp32 operands there only
            xt = xt.to(tl.float32)
        else:
            wg = wg.to(dt)
            wu = wu.to(dt)
        acc_g = tl.dot(wg, xt, acc_g)
        acc_u = tl.dot(wu, xt, acc_u)
        if HAS_LORA:
            a = tl.load(la_ptr + (e64 * R + offs_r[:, None]) * H + offs_k[None, :], mask=r_mask[:, None], other=0.0)
            if INTERPRET:
                a = a.to(tl.float32)
            else:
                a = a.to(dt)
            acc_xa = tl.dot(a, xt, acc_xa)

    if HAS_LORA:
        if WRITE_XA:
            if pid_n == 0:
                tl.store(xa_ptr + rows64[None, :] * R_PAD + offs_r[:, None], acc_xa, mask=m_mask[None, :])
        # Same rounding of x A^T as the forward kernel, so h here equals the inference h.
        if INTERPRET:
            xa = acc_xa.to(dt).to(tl.float32)
        else:
            xa = acc_xa.to(dt)
        bmask = n_mask[:, None] & r_mask[None, :]
        bg = tl.load(lb_ptr + w_rows[:, None] * R + offs_r[None, :], mask=bmask, other=0.0)
        bu = tl.load(lb_ptr + (w_rows[:, None] + I) * R + offs_r[None, :], mask=bmask, other=0.0)
        if INTERPRET:
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        else:
            bg = bg.to(dt)
            bu = bu.to(dt)
        acc_g += scaling * tl.dot(bg, xa)
        acc_u += scaling * tl.dot(bu, xa)

    st_mask = n_mask[:, None] & m_mask[None, :]
    if WRITE_GU:
        gptr = gu_ptr + rows64[None, :] * (2 * I) + offs_n[:, None]
        tl.store(gptr, acc_g.to(gu_ptr.dtype.element_ty), mask=st_mask)
        tl.store(gptr + I, acc_u.to(gu_ptr.dtype.element_ty), mask=st_mask)
    if WRITE_H:
        h = act_fwd(acc_g, ACT) * acc_u
        tl.store(h_ptr + rows64[None, :] * I + offs_n[:, None], h.to(h_ptr.dtype.element_ty), mask=st_mask)


def r_pad(r: int) -> int:
    """LoRA rank padded for tl.dot (every dot dim >= 16, a power of two)."""
    return max(16, triton.next_power_of_2(max(r, 1)))


def launch_up_preact(
    x: torch.Tensor,
    w: NF4Operand,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    sorted_pair_ids: torch.Tensor,
    expert_offsets: torch.Tensor,
    gu: torch.Tensor | None,
    h: torch.Tensor | None,
    xa: torch.Tensor | None,
    *,
    top_k: int,
    act: str = "silu",
    launcher=None,
) -> None:
    """Fill whichever of gu (P, 2I), h (P, I), xa (P, R_PAD) fp32 are given (None: not written)."""
    packed, absmax, nested = w.packed, w.absmax, w.nested
    blocksize, blocksize2 = w.blocksize, w.blocksize2
    num_experts, two_i, half_h = packed.shape
    inter, hidden = two_i // 2, 2 * half_h
    rows = sorted_pair_ids.numel()
    has_lora = lora_a is not None and lora_a.shape[1] > 0
    r = lora_a.shape[1] if has_lora else 0
    dummy = absmax
    kern = launcher(up_preact_kernel) if launcher is not None else up_preact_kernel
    grid = lambda meta: (triton.cdiv(inter, meta["BLOCK_N"]), triton.cdiv(rows, meta["BLOCK_M"]) + min(num_experts, rows))
    kern[grid](
        x, x.stride(0), x.stride(1),
        *w.pointer_args(),
        lora_a if has_lora else dummy, lora_b if has_lora else dummy, float(scaling),
        gu if gu is not None else dummy, h if h is not None else dummy,
        xa if (xa is not None and has_lora) else dummy,
        sorted_pair_ids, expert_offsets,
        inter, hidden, num_experts, r, row_bucket(rows),
        TOP_K=top_k, E_POW2=triton.next_power_of_2(num_experts), R_PAD=r_pad(r), ACT=ACT_CODES[act],
        HAS_LORA=has_lora, NESTED=nested, BS=blocksize, BS2=blocksize2,
        WRITE_GU=gu is not None, WRITE_H=h is not None, WRITE_XA=xa is not None and has_lora,
        INTERPRET=interpreting(), BLOCK_K=min(64, blocksize),
    )
