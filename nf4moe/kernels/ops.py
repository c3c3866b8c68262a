"""torch.library registration of the kernels, so torch.compile traces them and CUDA graphs capture them.

On a GPU each op is a ``triton_op`` whose body launches through ``wrap_triton`` (Inductor sees the
Triton kernel).  Under the Triton interpreter (CPU tests) ``triton_op`` cannot be traced with fake
tensors, so the same bodies are registered as opaque ``custom_op``s with explicit fake impls; the CPU
tests exercise torch.compile through that path.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_mode

from .combine import launch_combine
from .configs import INTERPRET
from .grouped_gemm import launch_nf4_moe_gemm
from .grouped_gemm_bwd import block_n, launch_nf4_moe_gemm_t
from .lora_grad import launch_lora_grad
from .operands import NF4Operand, r_pad

_INTERPRET = INTERPRET
if _INTERPRET:
    _LAUNCHER = None
else:
    from torch.library import wrap_triton as _LAUNCHER


_BODIES: dict = {}  # op name -> its undecorated Python body
_OPS: dict = {}  # op name -> the registered op
_direct = threading.local()
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _launcher():
    """``wrap_triton`` inside the registered ops (so tracing sees the kernels); None for direct calls."""
    return None if getattr(_direct, "on", False) else _LAUNCHER


def runs_direct(args) -> bool:
    """Whether ``run`` calls the op's body directly (plain launches) for these arguments: a plain eager call, not
    traced, no dispatch mode, plain tensors, and no autograd graph to build (an input that requires grad with
    grad mode on, e.g. a backward under ``create_graph=True``)."""
    if torch.compiler.is_compiling() or _current_mode() is not None:
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        t = type(a)
        if t in _PLAIN:
            if grad and a.requires_grad:
                return False
        elif isinstance(a, torch.Tensor):  # a tensor subclass (fake, functional, DTensor, ...)
            return False
    return True


def run(name: str, *args):
    """Call op ``nf4moe::<name>``.  Eagerly on plain tensors its Python body runs directly with plain
    Triton launches: the dispatcher's custom-op wrapper alone cost ~0.1 ms per op call (cProfile on an
    H200, T=1, where the whole layer is host-bound).  Under torch.compile, with fake / functional /
    subclass tensors, under a dispatch mode, or when autograd would record the call, the registered op
    runs, so tracing, the meta functions, the mode and autograd (which refuses: these ops have no
    derivative of their own) see it."""
    if runs_direct(args):
        _direct.on = True
        try:
            return _BODIES[name](*args)
        finally:
            _direct.on = False
    return _OPS[name](*args)


def _register(name: str):
    def deco(fn):
        _BODIES[name] = fn
        if _INTERPRET:
            _OPS[name] = torch.library.custom_op(f"nf4moe::{name}", mutates_args=())(fn)
            return _OPS[name]
        from torch.library import triton_op

        _OPS[name] = triton_op(f"nf4moe::{name}", mutates_args=())(fn)
        return _OPS[name]

    return deco


def _up(x, w: NF4Operand, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, top_k, act, gu=None, xa_out=None,
        tiles=None, xa_pairs=None):
    """The gated up projection into a new (P, I) buffer (sorted order); ``gu``/``xa_out``: training stores;
    ``tiles``: launch_nf4_moe_gemm's per-layer-call tile tables; ``xa_pairs``: X·Aᵀ from the routing launch."""
    inter = w.packed.shape[1] // 2
    out = x.new_empty(sorted_pair_ids.numel(), inter)
    return launch_nf4_moe_gemm(
        x, w, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, None, out, n=inter, top_k=top_k, gated=True,
        act=act, gu=gu, xa_out=xa_out, tiles=tiles, xa_pairs=xa_pairs, launcher=_launcher(),
    )


def _down(h, w: NF4Operand, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, top_k_weights, top_k_index=None,
          tiles=None):
    """The down projection times the routing weight: a new (P, H) buffer indexed by pair id, or with
    ``top_k_index`` each token's slot rows summed, (T, H) (in the decode GEMV, or by the combine kernel)."""
    hidden = w.packed.shape[1]
    out = h.new_empty(sorted_pair_ids.numel(), hidden)
    combine = None if top_k_index is None else (h.new_empty(top_k_index.shape[0], hidden), top_k_index)
    return launch_nf4_moe_gemm(
        h, w, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, top_k_weights, out, n=hidden, top_k=1,
        gated=False, combine=combine, tiles=tiles, launcher=_launcher(),
    )


def _combine(y, top_k_index, num_experts):
    out = y.new_empty(top_k_index.shape[0], y.shape[1])
    return launch_combine(y, top_k_index, out, num_experts, launcher=_launcher())


@_register("moe_up")
def moe_up(
    x: Tensor, packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
    offset: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor], scaling: float,
    sorted_pair_ids: Tensor, expert_offsets: Tensor, top_k: int, blocksize: int, blocksize2: int, act: str,
) -> Tensor:
    """act(x W_gateᵀ + LoRA) * (x W_upᵀ + LoRA) for every routed pair, (T*K, I) in sorted order."""
    return _up(x, NF4Operand(packed, absmax, absmax2, code2, offset, blocksize, blocksize2), lora_a, lora_b, scaling,
               sorted_pair_ids, expert_offsets, top_k, act)


@_register("moe_down_combine")
def moe_down_combine(
    h: Tensor, packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
    offset: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor], scaling: float,
    sorted_pair_ids: Tensor, expert_offsets: Tensor, top_k_weights: Tensor, top_k_index: Tensor, blocksize: int,
    blocksize2: int,
) -> Tensor:
    """(T, H): sum over each token's routed slots of w[p] * (h W_downᵀ + LoRA), fixed slot order, fp32 sums."""
    return _down(h, NF4Operand(packed, absmax, absmax2, code2, offset, blocksize, blocksize2), lora_a, lora_b, scaling,
                 sorted_pair_ids, expert_offsets, top_k_weights, top_k_index)


@_register("combine")
def combine(y: Tensor, top_k_index: Tensor, num_experts: int) -> Tensor:
    """(T, H): sum over each token's K slots of y, in slot order, fp32 accumulation."""
    return _combine(y, top_k_index, num_experts)


if _INTERPRET:

    @moe_up.register_fake
    def _(x, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets,
          top_k, blocksize, blocksize2, act):
        return x.new_empty(sorted_pair_ids.shape[0], packed.shape[1] // 2)

    @moe_down_combine.register_fake
    def _(h, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets,
          top_k_weights, top_k_index, blocksize, blocksize2):
        return h.new_empty(top_k_index.shape[0], packed.shape[1])

    @combine.register_fake
    def _(y, top_k_index, num_experts):
        return y.new_empty(top_k_index.shape[0], y.shape[1])


# ---------------------------------------------------------------------------------------------- training
# The layer op used when a gradient is needed: forward of the whole expert layer in one op so that its
# backward (registered in nf4moe.moe_layers.autograd) can fuse across the up / down / combine boundaries
# (combine backward read by token inside the down backward, SwiGLU backward in its epilogue) and save
# only the pre-activation gate|up rows.  The backward ops below each launch one kernel.

def _empty_rows(t: Tensor, cols: int, dtype=None) -> Tensor:
    return t.new_empty(0, cols, dtype=dtype or t.dtype)


@_register("moe_experts")
def moe_experts(
    x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, sorted_pair_ids: Tensor, expert_offsets: Tensor,
    gu_packed: Tensor, gu_absmax: Tensor, gu_absmax2: Optional[Tensor], gu_code2: Optional[Tensor],
    gu_offset: Optional[Tensor],
    dn_packed: Tensor, dn_absmax: Tensor, dn_absmax2: Optional[Tensor], dn_code2: Optional[Tensor],
    dn_offset: Optional[Tensor],
    lora_a_up: Optional[Tensor], lora_b_up: Optional[Tensor], lora_a_down: Optional[Tensor],
    lora_b_down: Optional[Tensor], scaling: float, act: str, blocksize: int, gu_blocksize2: int,
    dn_blocksize2: int, save_preact: bool, xa_up: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out (T, H), gu (P, 2I) pre-activation in sorted order, xa (P, R_PAD) fp32 x·A_upᵀ).

    save_preact=False (inference or recompute mode): gu and xa are empty (0 rows) and the up projection
    is the inference kernel; True: one up pass writes h for the down GEMM and gu, xa for the backward.
    ``xa_up`` (inference only): x·A_upᵀ partials by pair id from the routing launch (routing.launch_routing_xa),
    for the decode GEMV.
    """
    if xa_up is not None and save_preact:
        raise ValueError("moe_experts: xa_up is for inference (save_preact=False)")
    k = top_k_index.shape[1]
    p = sorted_pair_ids.numel()
    inter = gu_packed.shape[1] // 2
    rp = r_pad(lora_a_up.shape[1] if lora_a_up is not None else 0)
    if save_preact:
        gu = x.new_empty(p, 2 * inter)
        xa = x.new_empty(p, rp, dtype=torch.float32) if lora_a_up is not None else _empty_rows(x, rp, torch.float32)
    else:
        gu = _empty_rows(x, 2 * inter)
        xa = _empty_rows(x, rp, torch.float32)
    tiles = {}  # the Gluon GEMM's tile tables: the same routing for both projections, built once
    h = _up(x, NF4Operand(gu_packed, gu_absmax, gu_absmax2, gu_code2, gu_offset, blocksize, gu_blocksize2), lora_a_up,
            lora_b_up, scaling, sorted_pair_ids, expert_offsets, k, act, gu=gu if save_preact else None,
            xa_out=xa if save_preact and lora_a_up is not None else None, tiles=tiles, xa_pairs=xa_up)
    dn = NF4Operand(dn_packed, dn_absmax, dn_absmax2, dn_code2, dn_offset, blocksize, dn_blocksize2)
    return _down(h, dn, lora_a_down, lora_b_down, scaling, sorted_pair_ids, expert_offsets, top_k_weights.reshape(-1),
                 top_k_index, tiles=tiles), gu, xa


@_register("moe_up_preact")
def moe_up_preact(
    x: Tensor, packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
    offset: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor], scaling: float,
    sorted_pair_ids: Tensor, expert_offsets: Tensor, top_k: int, blocksize: int, blocksize2: int, act: str,
    write_xa: bool,
) -> tuple[Tensor, Tensor]:
    """Recompute mode: (gu (P, 2I) pre-activation, sorted order; xa (P, R_PAD) fp32 or 0 rows)."""
    p = sorted_pair_ids.numel()
    rp = r_pad(lora_a.shape[1] if lora_a is not None else 0)
    gu = x.new_empty(p, packed.shape[1])
    write_xa = write_xa and lora_a is not None
    xa = x.new_empty(p, rp, dtype=torch.float32) if write_xa else _empty_rows(x, rp, torch.float32)
    launch_nf4_moe_gemm(
        x, NF4Operand(packed, absmax, absmax2, code2, offset, blocksize, blocksize2), lora_a, lora_b, scaling,
        sorted_pair_ids, expert_offsets, None, gu, n=packed.shape[1] // 2, top_k=top_k, gated=True, act=act,
        gu=gu, xa_out=xa if write_xa else None, write_out=False, launcher=_launcher(),
    )
    return gu, xa


@_register("moe_down_bwd")
def moe_down_bwd(
    dout: Tensor, gu: Tensor, top_k_weights: Tensor, packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor],
    code2: Optional[Tensor], offset: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor],
    scaling: float, sorted_pair_ids: Tensor, expert_offsets: Tensor, top_k: int, blocksize: int, blocksize2: int,
    act: str, need_dgu: bool, need_dw: bool, need_xa: bool, need_dzb: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Down + combine + SwiGLU backward: (dgu (P, 2I) sorted, dw (T*K,) fp32, dzb (P, R_PAD) fp32
    w·(dout B_d), xa (P, R_PAD) fp32 h·A_dᵀ); outputs not asked for have 0 rows."""
    p = sorted_pair_ids.numel()
    inter = packed.shape[2] * 2
    has_lora = lora_a is not None
    rp = r_pad(lora_a.shape[1] if has_lora else 0)
    n_tiles = -(-inter // block_n(blocksize))
    dgu = dout.new_empty(p, 2 * inter) if need_dgu else _empty_rows(dout, 2 * inter)
    dw_part = dout.new_zeros(n_tiles, p, dtype=torch.float32) if need_dw else None  # dropped pairs stay 0
    dzb = dout.new_empty(p, rp, dtype=torch.float32) if (need_dzb and has_lora) else None
    xa_part = dout.new_empty(n_tiles, p, rp, dtype=torch.float32) if (need_xa and has_lora) else None
    launch_nf4_moe_gemm_t(
        dout, NF4Operand(packed, absmax, absmax2, code2, offset, blocksize, blocksize2), lora_a, lora_b, scaling,
        sorted_pair_ids, expert_offsets, down=True, out=dgu if need_dgu else None, gu=gu, top_k_weights=top_k_weights,
        dzb=dzb, dw_part=dw_part, xa_part=xa_part, top_k=top_k, act=act, launcher=_launcher(),
    )
    # Fixed-order sums over the I column tiles (deterministic; the partials are small).
    dw = dw_part.sum(0) if dw_part is not None else dout.new_empty(0, dtype=torch.float32)
    xa = xa_part.sum(0) if xa_part is not None else _empty_rows(dout, rp, torch.float32)
    return dgu, dw, dzb if dzb is not None else _empty_rows(dout, rp, torch.float32), xa


@_register("moe_up_bwd")
def moe_up_bwd(
    dgu: Tensor, packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
    offset: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor], scaling: float,
    sorted_pair_ids: Tensor, expert_offsets: Tensor, blocksize: int, blocksize2: int, need_dx: bool,
    need_dzb: bool,
) -> tuple[Tensor, Tensor]:
    """Up backward: (dx per pair (P, H) at row pair id, rows of dropped pairs unwritten; dzb (P, R_PAD)
    fp32 dgu·B_up); outputs not asked for have 0 rows."""
    p = sorted_pair_ids.numel()
    hidden = packed.shape[2] * 2
    has_lora = lora_a is not None
    rp = r_pad(lora_a.shape[1] if has_lora else 0)
    dxp = dgu.new_empty(p, hidden) if need_dx else _empty_rows(dgu, hidden)
    dzb = dgu.new_empty(p, rp, dtype=torch.float32) if (need_dzb and has_lora) else _empty_rows(dgu, rp, torch.float32)
    launch_nf4_moe_gemm_t(
        dgu, NF4Operand(packed, absmax, absmax2, code2, offset, blocksize, blocksize2), lora_a, lora_b, scaling,
        sorted_pair_ids, expert_offsets, down=False, out=dxp if need_dx else None,
        dzb=dzb if (need_dzb and has_lora) else None, launcher=_launcher(),
    )
    return dxp, dzb


@_register("lora_grad")
def lora_grad(
    lhs: Tensor, rhs: Tensor, sorted_pair_ids: Tensor, expert_offsets: Tensor, top_k_weights: Optional[Tensor],
    num_experts: int, da: int, db: int, scaling: float, top_k: int, lhs_is_rank: bool, lhs_gather: bool,
    rhs_gather: bool, rhs_gated: bool, act: str, dtype: torch.dtype,
) -> Tensor:
    """(E, da, db) per-expert LoRA gradient, a fixed-order reduction over each expert's rows."""
    out = lhs.new_empty(num_experts, da, db, dtype=dtype)
    return launch_lora_grad(
        lhs, rhs, out, sorted_pair_ids, expert_offsets, top_k_weights, scaling, top_k=top_k,
        lhs_is_rank=lhs_is_rank, lhs_gather=lhs_gather, rhs_gather=rhs_gather, rhs_gated=rhs_gated, act=act,
        launcher=_launcher(),
    )


if _INTERPRET:

    @moe_experts.register_fake
    def _(x, top_k_index, top_k_weights, sorted_pair_ids, expert_offsets, gu_packed, gu_absmax, gu_absmax2, gu_code2,
          gu_offset, dn_packed, dn_absmax, dn_absmax2, dn_code2, dn_offset, lora_a_up, lora_b_up, lora_a_down,
          lora_b_down, scaling, act, blocksize, gu_blocksize2, dn_blocksize2, save_preact, xa_up=None):
        p = sorted_pair_ids.shape[0]
        rows = p if save_preact else 0
        rp = r_pad(lora_a_up.shape[1] if lora_a_up is not None else 0)
        xa_rows = rows if lora_a_up is not None else 0
        return (x.new_empty(top_k_index.shape[0], dn_packed.shape[1]), x.new_empty(rows, gu_packed.shape[1]),
                x.new_empty(xa_rows, rp, dtype=torch.float32))

    @moe_up_preact.register_fake
    def _(x, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, top_k,
          blocksize, blocksize2, act, write_xa):
        p = sorted_pair_ids.shape[0]
        rp = r_pad(lora_a.shape[1] if lora_a is not None else 0)
        xa_rows = p if (write_xa and lora_a is not None) else 0
        return x.new_empty(p, packed.shape[1]), x.new_empty(xa_rows, rp, dtype=torch.float32)

    @moe_down_bwd.register_fake
    def _(dout, gu, top_k_weights, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling, sorted_pair_ids,
          expert_offsets, top_k, blocksize, blocksize2, act, need_dgu, need_dw, need_xa, need_dzb):
        p = sorted_pair_ids.shape[0]
        inter = packed.shape[2] * 2
        has_lora = lora_a is not None
        rp = r_pad(lora_a.shape[1] if has_lora else 0)
        f32 = torch.float32
        return (dout.new_empty(p if need_dgu else 0, 2 * inter), dout.new_empty(p if need_dw else 0, dtype=f32),
                dout.new_empty(p if (need_dzb and has_lora) else 0, rp, dtype=f32),
                dout.new_empty(p if (need_xa and has_lora) else 0, rp, dtype=f32))

    @moe_up_bwd.register_fake
    def _(dgu, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets,
          blocksize, blocksize2, need_dx, need_dzb):
        p = sorted_pair_ids.shape[0]
        has_lora = lora_a is not None
        rp = r_pad(lora_a.shape[1] if has_lora else 0)
        return (dgu.new_empty(p if need_dx else 0, packed.shape[2] * 2),
                dgu.new_empty(p if (need_dzb and has_lora) else 0, rp, dtype=torch.float32))

    @lora_grad.register_fake
    def _(lhs, rhs, sorted_pair_ids, expert_offsets, top_k_weights, num_experts, da, db, scaling, top_k, lhs_is_rank,
          lhs_gather, rhs_gather, rhs_gated, act, dtype):
        return lhs.new_empty(num_experts, da, db, dtype=dtype)


# ---------------------------------------------------------------------------------------------- routing
# The routing kernels (one launch, or two for the chunked sort) as an op, for kernels.routing.build_routing
# under torch.compile (eagerly build_routing launches them directly).  Imported here, not at the top, to keep
# this section self-contained.
from .routing import launch_routing  # noqa: E402


@_register("routing")
def routing(top_k_index: Tensor, num_experts: int, check: bool = False) -> tuple[Tensor, Tensor]:
    """(sorted_pair_ids (T*K,) int32, expert_offsets (E+1,) int32) of top_k_index (T, K), one or two launches;
    only for sizes ``routing.triton_fits`` accepts (build_routing takes the torch path otherwise).  ``check``:
    the kernel asserts no id is negative (direct CUDA launches only; build_routing passes False otherwise)."""
    return launch_routing(top_k_index, num_experts, launcher=_launcher(), check=check)


if _INTERPRET:

    @routing.register_fake
    def _(top_k_index, num_experts, check=False):
        return (top_k_index.new_empty(top_k_index.numel(), dtype=torch.int32),
                top_k_index.new_empty(num_experts + 1, dtype=torch.int32))
