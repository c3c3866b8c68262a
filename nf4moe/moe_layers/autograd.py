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
   dout B_d and h A_dᵀ for the down LoRA gradients.  The plan's ``bwd`` names the kernel of 1. and 3.: the Triton
   GEMM (grouped_gemm_bwd.py) or on sm_90 the Gluon GEMM (grouped_gemm_wgmma_bwd.py).
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
Recompute mode (``QuantGroupedExperts(recompute=True)`` or ``module.recompute = True``): the forward runs the
inference kernels and saves no activation beyond its inputs; the backward re-runs the up GEMM once
(``moe_up_preact``, by the call's launch plan) to rebuild gu.  Use it when activation memory across layers is
the limit.

The training forward's up projection is the inference kernel (grouped_gemm.py) with its extra
stores switched on (gu, and the X·A_upᵀ rows its LoRA precompute already produces), so it shares the
PTX table decode; recompute mode runs the same kernel with only those stores.

Measured (H100, torch 2.11 / triton 3.6, Qwen3-30B-A3B layer, T = 8192, r = 16, bf16; 2026-12-07,
bench/RESULTS.md "Issue 32"): forward + backward 8.07 ms, peak memory above weights and inputs 0.73 GiB.  The
peers of a training step and recompute mode's time are issue 31's measurements.

Determinism: every reduction has a fixed order (per-expert row loops, fixed-order sums of column-tile
partials, the slot-ordered combine); there are no atomics, so two backward passes are bit-identical
whether or not ``torch.use_deterministic_algorithms`` is on.
"""
from __future__ import annotations

import torch

from ..kernels import ops
from ..kernels.plan import LaunchPlan

_N_INPUTS = len(ops.LayerInputs._fields)
_GRAD_OF = {name: i for i, name in enumerate(ops.LayerInputs._fields)}  # input name -> position of its gradient

# the tensor inputs the backward reads: every one but the scalars and the routing launch's xa_up (inference only)
_SAVED = tuple(n for n in ops.LayerInputs._fields
               if n not in ("scaling", "act", "blocksize", "gu_blocksize2", "dn_blocksize2", "plan", "xa_up"))


def _setup_context(ctx, inputs, output):
    inp = ops.LayerInputs(*inputs)
    _, gu, xa = output
    # gu and xa are residuals returned only so they can be saved (custom ops save inputs and outputs):
    # no gradient flows into them, and none is materialized for them.
    ctx.mark_non_differentiable(gu, xa)
    ctx.set_materialize_grads(False)
    tensors = [getattr(inp, n) for n in _SAVED]
    ctx.save_for_backward(*tensors, gu, xa)
    ctx.meta = dict(scaling=inp.scaling, act=inp.act, blocksize=inp.blocksize, gu_blocksize2=inp.gu_blocksize2,
                    dn_blocksize2=inp.dn_blocksize2, plan=inp.plan)


def _backward(ctx, dout, _dgu, _dxa):
    needs = dict(zip(ops.LayerInputs._fields, ctx.needs_input_grad))
    grads = [None] * _N_INPUTS
    if dout is None:
        return tuple(grads)
    *tensors, gu, xa_u = ctx.saved_tensors
    m = ctx.meta
    inp = ops.LayerInputs(**dict(zip(_SAVED, tensors)), scaling=m["scaling"], act=m["act"],
                          blocksize=m["blocksize"], gu_blocksize2=m["gu_blocksize2"], dn_blocksize2=m["dn_blocksize2"],
                          plan=m["plan"])
    s, act, bs = inp.scaling, inp.act, inp.blocksize
    la_u, lb_u, la_d, lb_d = inp.lora()
    sorted_ids, eoff = inp.sorted_pair_ids, inp.expert_offsets
    num_experts = inp.gu_packed.shape[0]
    t, k = inp.top_k_index.shape
    has_lora = la_u is not None
    n_x, n_w = needs["x"], needs["top_k_weights"]
    n_la_u, n_lb_u = has_lora and needs["lora_a_up"], has_lora and needs["lora_b_up"]
    n_la_d, n_lb_d = has_lora and needs["lora_a_down"], has_lora and needs["lora_b_down"]
    need_dgu = n_x or n_la_u or n_lb_u
    if not (need_dgu or n_w or n_la_d or n_lb_d):
        return tuple(grads)
    w = inp.top_k_weights
    w_flat = w.reshape(-1)
    gu5, dn5 = inp.gate_up().fields(), inp.down().fields()
    if not LaunchPlan.from_key(inp.plan).save_preact:  # recompute mode: one up pass rebuilds the pre-activation
        gu, xa_u = ops.run("moe_up_preact", inp.x, *gu5, la_u, lb_u, s, sorted_ids, eoff, k, bs, inp.gu_blocksize2,
                           act, n_lb_u, inp.plan)

    dgu, dw, dzb_d, xa_d = ops.run(
        "moe_down_bwd", dout, gu, w_flat, *dn5, la_d, lb_d, s, sorted_ids, eoff, k, bs, inp.dn_blocksize2, act,
        need_dgu, n_w, n_lb_d, n_la_d, inp.plan,
    )

    def lora_grad(lhs, rhs, top_k_weights, like, *, lhs_is_rank, lhs_gather, rhs_gather, rhs_gated):
        return ops.run("lora_grad", lhs, rhs, sorted_ids, eoff, top_k_weights, num_experts, like.shape[1],
                       like.shape[2], s, k, lhs_is_rank, lhs_gather, rhs_gather, rhs_gated, act, like.dtype)

    if n_w:
        grads[_GRAD_OF["top_k_weights"]] = dw.view(t, k).to(w.dtype)
    if n_lb_d:  # d B_d = s · Σ (w·dout[t])ᵀ ⊗ (h A_dᵀ)
        grads[_GRAD_OF["lora_b_down"]] = lora_grad(dout, xa_d, w_flat, lb_d, lhs_is_rank=False, lhs_gather=True,
                                                    rhs_gather=False, rhs_gated=False)
    if n_la_d:  # d A_d = s · Σ (w·dout B_d)ᵀ ⊗ h, h = act(g)·u re-derived from gu
        grads[_GRAD_OF["lora_a_down"]] = lora_grad(dzb_d, gu, w_flat, la_d, lhs_is_rank=True, lhs_gather=False,
                                                    rhs_gather=False, rhs_gated=True)
    if n_x or n_la_u:
        dxp, dzb_u = ops.run("moe_up_bwd", dgu, *gu5, la_u, lb_u, s, sorted_ids, eoff, bs, inp.gu_blocksize2, n_x,
                             n_la_u, inp.plan)
        if n_x:
            grads[_GRAD_OF["x"]] = ops.run("combine", dxp, inp.top_k_index, num_experts)
        if n_la_u:  # d A_u = s · Σ (dgu B_u)ᵀ ⊗ x[t]
            grads[_GRAD_OF["lora_a_up"]] = lora_grad(dzb_u, inp.x, None, la_u, lhs_is_rank=True, lhs_gather=False,
                                                      rhs_gather=True, rhs_gated=False)
    if n_lb_u:  # d B_u = s · Σ dguᵀ ⊗ (x A_uᵀ)
        grads[_GRAD_OF["lora_b_up"]] = lora_grad(dgu, xa_u, None, lb_u, lhs_is_rank=False, lhs_gather=False,
                                                  rhs_gather=False, rhs_gated=False)
    return tuple(grads)


torch.library.register_autograd("nf4moe::moe_experts", _backward, setup_context=_setup_context)
