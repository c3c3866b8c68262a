"""The launch plan carried out: the layer's forward and backward as sequences of leaf-kernel launches.

plan.py chooses; this module only follows the plan (``LaunchPlan``) it is given, and is the one place that
knows which leaf launcher serves which choice.  The registered ops (ops.py) decode their arguments and call the
functions here with ``launcher`` = ``wrap_triton`` (traced or autograd-recorded calls) or None (direct launches
from the compiled-kernel cache, launch.py).

Forward (``layer_forward``): routing is done by the caller (ops.route) ->
    up   (NF4 gate|up + LoRA, SwiGLU; optionally storing the pre-activation gu for the backward)
    down (NF4 + LoRA, times the routing weight) -> combine of each token's K slot rows (in the down GEMV when
    the plan says so).
Only two intermediates exist: the sorted (P, I) activation h and the (P, H) weighted slot rows.
Backward (``down_backward``, ``up_backward``, ``lora_grad``; autograd.py strings them together): the transposed
NF4 GEMMs and the per-expert LoRA gradients, each one launch.
"""
from __future__ import annotations

import torch

from .combine import launch_combine
from .grouped_gemm import launch_nf4_moe_gemm
from .grouped_gemm_bwd import block_n, launch_nf4_moe_gemm_t
from .grouped_gemv import launch_nf4_moe_gemv
from .host import ACT_CODES, r_pad, rows_16b_aligned
from .lora_grad import launch_lora_grad
from .lora_xa import launch_lora_xa
from .operands import NF4Operand
from .plan import TILES, LaunchPlan
from .tile_table import launch_tile_table


def _empty_rows(t: torch.Tensor, cols: int, dtype=None) -> torch.Tensor:
    return t.new_empty(0, cols, dtype=dtype or t.dtype)


def _has_lora(lora_a: torch.Tensor | None) -> bool:
    return lora_a is not None and lora_a.shape[1] > 0


def projection(plan: LaunchPlan, kernel: str, xa_form: str, x: torch.Tensor, w: NF4Operand, lora_a, lora_b,
               scaling: float, sorted_pair_ids: torch.Tensor, expert_offsets: torch.Tensor, top_k_weights, out, *,
               n: int, top_k: int, gated: bool, act: str, launcher, xa=None, gu=None, xa_out=None,
               write_out: bool = True, combine=None, tables: dict | None = None) -> torch.Tensor:
    """One projection by ``kernel`` (the plan's up or down) into ``out`` (P, n); returns ``out``, or with
    ``combine`` = (comb (T, n), top_k_index) the combined (T, n) rows.

    ``xa``: X·Aᵀ already computed (the routing launch's, by pair id: ``xa_form`` "routing"); otherwise with
    ``xa_form`` "kernel" lora_xa.py computes it (into ``xa_out`` when given: the training forward saves it) and
    with "loop" the Triton GEMM accumulates it in its K loop.  ``gu`` / ``write_out``: the training stores.
    ``tables``: the Gluon GEMM's row-tile tables, shared by the projections of one call (built once)."""
    rows = sorted_pair_ids.numel()
    has_lora = _has_lora(lora_a)
    rp = r_pad(lora_a.shape[1] if has_lora else 0)
    if has_lora and xa is None and xa_form == "kernel":
        xa = launch_lora_xa(x, lora_a, sorted_pair_ids, expert_offsets, top_k=top_k, gather=gated, r_pad=rp,
                            out=xa_out, pdl=plan.pdl, launcher=launcher)
    if kernel == "gemv":
        fused = launch_nf4_moe_gemv(
            x, w, lora_b if has_lora else None, scaling, xa if has_lora else None, sorted_pair_ids, expert_offsets,
            top_k_weights, out, n=n, top_k=top_k, gated=gated, act=act, xa_by_pair=xa_form == "routing",
            combine=combine, fuse_combine=plan.combine == "gemv", capturing=plan.capturing,
            xa_early=plan.gemv_xa_early, pdl=plan.pdl, launcher=launcher)
        if fused:
            return combine[0]
    elif kernel == "wgmma":
        _wgmma(plan, x, w, lora_b if has_lora else None, scaling, xa if has_lora else None, sorted_pair_ids,
               expert_offsets, top_k_weights, out, n=n, top_k=top_k, gated=gated, act=act, r=lora_a.shape[1]
               if has_lora else 0, r_pad=rp, gu=gu, write_out=write_out, tables=tables)
    else:
        launch_nf4_moe_gemm(
            x, w, lora_a if has_lora else None, lora_b, scaling, xa if has_lora else None, sorted_pair_ids,
            expert_offsets, top_k_weights, out, n=n, top_k=top_k, gated=gated, act=act, gu=gu, write_out=write_out,
            pdl=plan.pdl, launcher=launcher)
    if combine is None:
        return out
    num_experts = w.packed.shape[0]
    return launch_combine(out, combine[1], combine[0], num_experts, pdl=plan.pdl, launcher=launcher)


def _wgmma(plan, x, w, lora_b, scaling, xa, sorted_pair_ids, expert_offsets, top_k_weights, out, *, n, top_k, gated,
           act, r, r_pad, gu, write_out, tables):
    """The Gluon GEMM over the plan's tile: full tiles, then with the 256-row tile each expert's remainder of at
    most 128 rows as a 128x256 tile in a second launch (tile_table.py builds both tables in one launch)."""
    # imported here: Gluon's Hopper API (Triton 3.6+) is needed only where the plan runs this GEMM
    from .grouped_gemm_wgmma import launch_nf4_moe_gemm_wgmma

    block_m, tile_n = plan.wgmma_tile
    small = TILES["128x256"] if block_m == 256 else None
    tkey = (block_m, small[0] if small else 0)
    table = tables.get(tkey) if tables is not None else None
    if table is None:
        table = launch_tile_table(expert_offsets, sorted_pair_ids.numel(), block_m, small=tkey[1])
        if tables is not None:
            tables[tkey] = table
    xa3 = xa if xa is None or xa.dim() == 3 else xa.unsqueeze(0)
    launches = [(table[0], block_m, tile_n)] + ([(table[1], *small)] if small else [])
    for tiles, bm, tn in launches:
        launch_nf4_moe_gemm_wgmma(
            x, w, lora_b, scaling, xa3, sorted_pair_ids, tiles, top_k_weights, out, n=n, top_k=top_k, gated=gated,
            act_code=ACT_CODES[act], r=r, r_pad=r_pad, block_m=bm, tile_n=tn, gu=gu, write_out=write_out)


def layer_forward(plan: LaunchPlan, x, top_k_index, top_k_weights, sorted_pair_ids, expert_offsets,
                  gate_up: NF4Operand, down: NF4Operand, lora: tuple, scaling: float, act: str, *, xa_up=None,
                  launcher=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (T, H), gu (P, 2I) pre-activation in sorted order, xa (P, R_PAD) fp32 x·A_upᵀ); gu and xa have 0 rows
    unless ``plan.save_preact``.  ``lora``: (A_up, B_up, A_down, B_down), Nones without LoRA.  ``xa_up``: the up
    X·Aᵀ partials by pair id from the routing launch (``plan.up_xa == "routing"``)."""
    if (xa_up is not None) != (plan.up_xa == "routing"):
        raise ValueError(f"layer_forward: xa_up is the routing launch's X·Aᵀ (plan up_xa={plan.up_xa!r})")
    lora_a_up, lora_b_up, lora_a_down, lora_b_down = lora
    k = top_k_index.shape[1]
    p = sorted_pair_ids.numel()
    inter = gate_up.packed.shape[1] // 2
    hidden = down.packed.shape[1]
    rp = r_pad(lora_a_up.shape[1] if lora_a_up is not None else 0)
    save = plan.save_preact
    gu = x.new_empty(p, 2 * inter) if save else _empty_rows(x, 2 * inter)
    with_xa = save and lora_a_up is not None
    xa = x.new_empty(p, rp, dtype=torch.float32) if with_xa else _empty_rows(x, rp, torch.float32)
    tables = {}  # the Gluon GEMM's tile tables: the same routing for both projections, built once
    h = projection(plan, plan.up, plan.up_xa, x, gate_up, lora_a_up, lora_b_up, scaling, sorted_pair_ids,
                   expert_offsets, None, x.new_empty(p, inter), n=inter, top_k=k, gated=True, act=act,
                   launcher=launcher, xa=xa_up, gu=gu if save else None, xa_out=xa if with_xa else None,
                   tables=tables)
    out = projection(plan, plan.down, plan.down_xa, h, down, lora_a_down, lora_b_down, scaling, sorted_pair_ids,
                     expert_offsets, top_k_weights.reshape(-1), h.new_empty(p, hidden), n=hidden, top_k=1,
                     gated=False, act=act, launcher=launcher, combine=(h.new_empty(top_k_index.shape[0], hidden),
                                                                      top_k_index), tables=tables)
    return out, gu, xa


def up_preact(plan: LaunchPlan, x, gate_up: NF4Operand, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, *,
              top_k: int, act: str, write_xa: bool, launcher=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute mode's backward: the up projection once more, storing only (gu (P, 2I), xa (P, R_PAD) fp32 or 0
    rows), by the plan's up kernel (the Triton GEMM where the forward ran the decode GEMV, which has no stores)."""
    p = sorted_pair_ids.numel()
    rp = r_pad(lora_a.shape[1] if lora_a is not None else 0)
    gu = x.new_empty(p, gate_up.packed.shape[1])
    write_xa = write_xa and lora_a is not None
    xa = x.new_empty(p, rp, dtype=torch.float32) if write_xa else _empty_rows(x, rp, torch.float32)
    kernel = "gemm" if plan.up == "gemv" else plan.up
    xa_form = "kernel" if write_xa else plan.up_xa  # lora_xa.py writes the saved X·A_upᵀ
    projection(plan, kernel, xa_form, x, gate_up, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, None,
               gu, n=gate_up.packed.shape[1] // 2, top_k=top_k, gated=True, act=act, launcher=launcher, gu=gu,
               xa_out=xa if write_xa else None, write_out=False)
    return gu, xa


def _bwd_wgmma(dy, w: NF4Operand, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, *, down: bool, out,
               gu=None, top_k_weights=None, dw_part=None, xa_part=None, dzb=None, top_k: int = 1,
               act: str = "silu") -> None:
    """The backward's Gluon GEMM (grouped_gemm_wgmma_bwd.py): dy·B by lora_xa.py into ``dzb`` (its LoRA term and
    the LoRA A gradient's left factor), then the transposed NF4 GEMM where an output of it is asked for."""
    from .grouped_gemm_wgmma_bwd import BLOCK_M, launch_nf4_moe_gemm_t_wgmma

    has_lora = dzb is not None
    if has_lora:  # B (E, KR, r) read as (E, r, KR): no copy
        launch_lora_xa(dy, lora_b.transpose(1, 2), sorted_pair_ids, expert_offsets, top_k=top_k, gather=down,
                       r_pad=dzb.shape[1], out=dzb)
    if out is None and dw_part is None and xa_part is None:
        return
    table, _ = launch_tile_table(expert_offsets, sorted_pair_ids.numel(), BLOCK_M)
    launch_nf4_moe_gemm_t_wgmma(dy, w, lora_a, dzb, scaling, sorted_pair_ids, table, down=down, out=out, gu=gu,
                                top_k_weights=top_k_weights, dw_part=dw_part, xa_part=xa_part, top_k=top_k,
                                act_code=ACT_CODES[act], r_pad=dzb.shape[1] if has_lora else 16)


def _aligned_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit-stride, 16-byte-aligned rows (the Gluon GEMM's cp.async): itself, or a copy."""
    return t if rows_16b_aligned(t) else t.clone(memory_format=torch.contiguous_format)


def down_backward(plan: LaunchPlan, dout, gu, top_k_weights, down: NF4Operand, lora_a, lora_b, scaling,
                  sorted_pair_ids, expert_offsets, *, top_k: int, act: str, need_dgu: bool, need_dw: bool,
                  need_xa: bool, need_dzb: bool, launcher=None):
    """Down + combine + SwiGLU backward by the plan's ``bwd`` kernel: (dgu (P, 2I) sorted, dw (T*K,) fp32, dzb
    (P, R_PAD) fp32 dout·B_d (unweighted: the LoRA A gradient scales its rows by w), xa (P, R_PAD) fp32 h·A_dᵀ);
    outputs not asked for have 0 rows."""
    p = sorted_pair_ids.numel()
    inter = down.packed.shape[2] * 2
    has_lora = lora_a is not None
    rp = r_pad(lora_a.shape[1] if has_lora else 0)
    wgmma = plan.bwd == "wgmma"
    if wgmma:
        from .grouped_gemm_wgmma_bwd import column_tiles

        n_tiles = column_tiles(inter)
        dout = _aligned_rows(dout)
    else:
        n_tiles = -(-inter // block_n(down.blocksize))
    dgu = dout.new_empty(p, 2 * inter) if need_dgu else _empty_rows(dout, 2 * inter)
    dw_part = dout.new_zeros(n_tiles, p, dtype=torch.float32) if need_dw else None  # dropped pairs stay 0
    # the Gluon GEMM's LoRA term needs dout·B_d whenever it runs
    want_dzb = has_lora and (need_dzb or (wgmma and (need_dgu or need_dw)))
    dzb = dout.new_empty(p, rp, dtype=torch.float32) if want_dzb else None
    xa_part = dout.new_empty(n_tiles, p, rp, dtype=torch.float32) if (need_xa and has_lora) else None
    if wgmma:
        _bwd_wgmma(dout, down, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, down=True,
                   out=dgu if need_dgu else None, gu=gu, top_k_weights=top_k_weights, dw_part=dw_part,
                   xa_part=xa_part, dzb=dzb, top_k=top_k, act=act)
    else:
        launch_nf4_moe_gemm_t(
            dout, down, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, down=True,
            out=dgu if need_dgu else None, gu=gu, top_k_weights=top_k_weights, dzb=dzb, dw_part=dw_part,
            xa_part=xa_part, top_k=top_k, act=act, launcher=launcher,
        )
    # Fixed-order sums over the I column tiles (deterministic; the partials are small).
    dw = dw_part.sum(0) if dw_part is not None else dout.new_empty(0, dtype=torch.float32)
    xa = xa_part.sum(0) if xa_part is not None else _empty_rows(dout, rp, torch.float32)
    return dgu, dw, dzb if (dzb is not None and need_dzb) else _empty_rows(dout, rp, torch.float32), xa


def up_backward(plan: LaunchPlan, dgu, gate_up: NF4Operand, lora_a, lora_b, scaling, sorted_pair_ids,
                expert_offsets, *, need_dx: bool, need_dzb: bool, launcher=None):
    """Up backward by the plan's ``bwd`` kernel: (dx per pair (P, H) at row pair id, rows of dropped pairs
    unwritten; dzb (P, R_PAD) fp32 dgu·B_up); outputs not asked for have 0 rows."""
    p = sorted_pair_ids.numel()
    hidden = gate_up.packed.shape[2] * 2
    has_lora = lora_a is not None
    rp = r_pad(lora_a.shape[1] if has_lora else 0)
    wgmma = plan.bwd == "wgmma"
    dxp = dgu.new_empty(p, hidden) if need_dx else _empty_rows(dgu, hidden)
    want_dzb = has_lora and (need_dzb or (wgmma and need_dx))
    dzb = dgu.new_empty(p, rp, dtype=torch.float32) if want_dzb else None
    if wgmma:
        _bwd_wgmma(dgu, gate_up, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, down=False,
                   out=dxp if need_dx else None, dzb=dzb)
    else:
        launch_nf4_moe_gemm_t(
            dgu, gate_up, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, down=False,
            out=dxp if need_dx else None, dzb=dzb, launcher=launcher,
        )
    return dxp, dzb if (dzb is not None and need_dzb) else _empty_rows(dgu, rp, torch.float32)


def lora_grad(lhs, rhs, sorted_pair_ids, expert_offsets, top_k_weights, *, num_experts: int, da: int, db: int,
              scaling: float, top_k: int, lhs_is_rank: bool, lhs_gather: bool, rhs_gather: bool, rhs_gated: bool,
              act: str, dtype: torch.dtype, launcher=None) -> torch.Tensor:
    """(E, da, db) per-expert LoRA gradient, a fixed-order reduction over each expert's rows."""
    out = lhs.new_empty(num_experts, da, db, dtype=dtype)
    return launch_lora_grad(lhs, rhs, out, sorted_pair_ids, expert_offsets, top_k_weights, scaling, top_k=top_k,
                            lhs_is_rank=lhs_is_rank, lhs_gather=lhs_gather, rhs_gather=rhs_gather,
                            rhs_gated=rhs_gated, act=act, launcher=launcher)


def combine(y, top_k_index, num_experts: int, *, launcher=None) -> torch.Tensor:
    """(T, H): each token's K slot rows of ``y`` summed in slot order (the backward's dx)."""
    return launch_combine(y, top_k_index, y.new_empty(top_k_index.shape[0], y.shape[1]), num_experts,
                          launcher=launcher)
