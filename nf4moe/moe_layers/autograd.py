"""Backward of the Triton expert layer, registered on ``nf4moe::moe_experts`` with ``torch.library``.

Works eagerly, under ``torch.compile`` (the backward is traced from the backward ops' fake impls) and
under ``torch.utils.checkpoint`` (either flavour: the layer is a plain differentiable op).

Forward (one op, so the backward can fuse across its up / down / combine stages):
    x --up (NF4 + LoRA)--> gu = [gate | up] (P, 2I) --act(g)·u--> h (P, I)
      --down (NF4 + LoRA, · w)--> y (P, H) --combine over the K slots--> out (T, H)

Why one layer op rather than autograd on each of moe_up / moe_down_combine: per-op autograd would
have to materialize dy (P, H) between combine and down (the largest tensor of the layer), hand dh
(P, I) from down to up instead of doing the SwiGLU backward in the down epilogue, and save both h
(down's input) and gu (up's pre-activation).  The inference path runs the same op with save_preact=False.

Backward, four kinds of kernel, every one reading the packed NF4 bytes (no weight copy is made):
1. ``moe_down_bwd``: dhu = dout[t] W_d + s (dout[t] B_d) A_d with dout read by token (the combine
   backward costs nothing: no (P, H) dy), then in the epilogue dh = w·dhu and the SwiGLU backward
   dg = dh·u·act'(g), du = dh·act(g) -> dgu (P, 2I); d w_p = <dhu_p, h_p> over I (see below);
   w·(dout B_d) and h A_dᵀ for the down LoRA gradients.
2. ``lora_grad`` (x4): d B = s·dZᵀ(X Aᵀ), d A = s·(dZ B)ᵀ X per expert, a fixed-order loop over the
   expert's rows (no atomics).
3. ``moe_up_bwd``: dx per pair = dgu W_gu + s (dgu B_u) A_u (W_gu read transposed), then the
   deterministic ``combine`` sums each token's K slots.
Only what ``ctx.needs_input_grad`` asks for is computed (frozen hidden_states, detached routing
weights, rank 0 all skip their kernels or epilogue stores).

d(top_k_weights): y_p = w_p z_p with z_p = h_p W_dᵀ + s (h_p A_dᵀ) B_dᵀ, so d w_p = <dout[t], z_p>.
Dividing the saved weighted output by w_p is wrong at w_p = 0 and imprecise near it; saving z (P, H)
costs as much as the largest activation.  Instead the identity <dout W_d + ..., h> = <dout, h W_dᵀ + ...>
gives d w_p = <dhu_p, h_p>, a by-product of the dh GEMM that the down backward computes anyway:
nothing extra saved, no extra GEMM.

Saved activations (the trade-off).  The SwiGLU backward needs the pre-activation g and u; the down
backward needs h = act(g)·u, which is elementwise in (g, u).  So the smallest set is gu (P, 2I) in the
activation dtype (plus x·A_upᵀ (P, R_PAD) fp32 when LoRA is trained: r/(2I) of gu), and h is re-derived
in registers wherever it is needed.  Saving h as well would add P·I; saving nothing would re-run the
up GEMM (half the forward FLOPs, a third more backward work).  Qwen3-30B-A3B at T = 8192 (P = 65536,
I = 768, bf16): gu is 192 MiB per layer.
Recompute mode (``module.recompute = True`` or ``NF4MOE_RECOMPUTE=1``): the forward runs the
inference kernels and saves no activation beyond its inputs; the backward re-runs the up GEMM once
(``moe_up_preact``) to rebuild gu.  Use it when activation memory across layers is the limit.

The training forward's up projection is the inference kernel (grouped_gemm.py) with its extra
stores switched on (gu, and the X·A_upᵀ rows its LoRA precompute already produces), so it shares the
PTX table decode; recompute mode runs the same kernel with only those stores.

Measured (H100, torch 2.11 / triton 3.6, Qwen3-30B-A3B layer, T = 8192, r = 16, bf16; 2026-11-25,
bench/RESULTS.md): forward + backward 8.50 ms, peak memory above weights and inputs 0.70 GiB (bf16
grouped_mm without LoRA: 8.99 ms / 1.31 GiB; PEFT LoRA: 15.33 ms / 2.76 GiB).  Recompute mode was 14.2 ms
with the earlier kernels (the extra up pass) and has not been re-measured.

Determinism: every reduction has a fixed order (per-expert row loops, fixed-order sums of column-tile
partials, the slot-ordered combine); there are no atomics, so two backward passes are bit-identical
whether or not ``torch.use_deterministic_algorithms`` is on.
"""
from __future__ import annotations

import torch

from ..kernels import ops

# Positions of the differentiable inputs of nf4moe::moe_experts.
_X, _IDX, _W, _SORTED, _EOFF = 0, 1, 2, 3, 4
_GU = slice(5, 10)
_DN = slice(10, 15)
_LA_U, _LB_U, _LA_D, _LB_D = 15, 16, 17, 18
_N_INPUTS = 26  # the last, xa_up, is inference's only (None when a gradient is needed)


def _setup_context(ctx, inputs, output):
    x, idx, w, sorted_ids, eoff = inputs[:5]
    gu5, dn5 = list(inputs[_GU]), list(inputs[_DN])
    la_u, lb_u, la_d, lb_d = inputs[_LA_U:_LB_D + 1]
    scaling, act, blocksize, gu_bs2, dn_bs2, save_preact = inputs[19:25]
    _, gu, xa = output
    # gu and xa are residuals returned only so they can be saved (custom ops save inputs and outputs):
    # no gradient flows into them, and none is materialized for them.
    ctx.mark_non_differentiable(gu, xa)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, idx, w, sorted_ids, eoff, *gu5, *dn5, la_u, lb_u, la_d, lb_d, gu, xa)
    ctx.meta = dict(scaling=scaling, act=act, blocksize=blocksize, gu_bs2=gu_bs2, dn_bs2=dn_bs2,
                    saved=save_preact)


def _backward(ctx, dout, _dgu, _dxa):
    needs = ctx.needs_input_grad
    grads = [None] * _N_INPUTS
    if dout is None:
        return tuple(grads)
    (x, idx, w, sorted_ids, eoff, *rest) = ctx.saved_tensors
    gu5, dn5 = rest[0:5], rest[5:10]
    la_u, lb_u, la_d, lb_d, gu, xa_u = rest[10:16]
    m = ctx.meta
    s, act, bs = m["scaling"], m["act"], m["blocksize"]
    num_experts = gu5[0].shape[0]
    t, k = idx.shape
    has_lora = la_u is not None
    n_x, n_w = needs[_X], needs[_W]
    n_la_u, n_lb_u = has_lora and needs[_LA_U], has_lora and needs[_LB_U]
    n_la_d, n_lb_d = has_lora and needs[_LA_D], has_lora and needs[_LB_D]
    need_dgu = n_x or n_la_u or n_lb_u
    if not (need_dgu or n_w or n_la_d or n_lb_d):
        return tuple(grads)
    w_flat = w.reshape(-1)
    if not m["saved"]:  # recompute mode: one up pass rebuilds the pre-activation (and x·A_upᵀ)
        gu, xa_u = ops.run("moe_up_preact", x, *gu5, la_u, lb_u, s, sorted_ids, eoff, k, bs, m["gu_bs2"], act, n_lb_u)

    dgu, dw, dzb_d, xa_d = ops.run(
        "moe_down_bwd", dout, gu, w_flat, *dn5, la_d, lb_d, s, sorted_ids, eoff, k, bs, m["dn_bs2"], act,
        need_dgu, n_w, n_lb_d, n_la_d,
    )
    if n_w:
        grads[_W] = dw.view(t, k).to(w.dtype)
    if n_lb_d:  # d B_d = s · Σ (w·dout[t])ᵀ ⊗ (h A_dᵀ)
        grads[_LB_D] = ops.run(
            "lora_grad", dout, xa_d, sorted_ids, eoff, w_flat, num_experts, lb_d.shape[1], lb_d.shape[2],
            s, k, False, True, False, False, act, lb_d.dtype,
        )
    if n_la_d:  # d A_d = s · Σ (w·dout B_d)ᵀ ⊗ h, h = act(g)·u re-derived from gu
        grads[_LA_D] = ops.run(
            "lora_grad", dzb_d, gu, sorted_ids, eoff, None, num_experts, la_d.shape[1], la_d.shape[2],
            s, k, True, False, False, True, act, la_d.dtype,
        )
    if n_x or n_la_u:
        dxp, dzb_u = ops.run("moe_up_bwd", dgu, *gu5, la_u, lb_u, s, sorted_ids, eoff, bs, m["gu_bs2"], n_x, n_la_u)
        if n_x:
            grads[_X] = ops.run("combine", dxp, idx, num_experts)
        if n_la_u:  # d A_u = s · Σ (dgu B_u)ᵀ ⊗ x[t]
            grads[_LA_U] = ops.run(
                "lora_grad", dzb_u, x, sorted_ids, eoff, None, num_experts, la_u.shape[1], la_u.shape[2],
                s, k, True, False, True, False, act, la_u.dtype,
            )
    if n_lb_u:  # d B_u = s · Σ dguᵀ ⊗ (x A_uᵀ)
        grads[_LB_U] = ops.run(
            "lora_grad", dgu, xa_u, sorted_ids, eoff, None, num_experts, lb_u.shape[1], lb_u.shape[2],
            s, k, False, False, False, False, act, lb_u.dtype,
        )
    return tuple(grads)


torch.library.register_autograd("nf4moe::moe_experts", _backward, setup_context=_setup_context)
