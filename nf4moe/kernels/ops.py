"""torch.library registration of the layer's ops, so torch.compile traces them and CUDA graphs capture them.

On a GPU each op is a ``triton_op`` whose body launches through ``wrap_triton`` (Inductor sees the Triton
kernels).  Under the Triton interpreter (CPU tests) ``triton_op`` cannot be traced with fake tensors, so the
same bodies are registered as opaque ``custom_op``s with explicit fake impls; the CPU tests exercise
torch.compile through that path.

The op boundary takes tensors and scalars only: an NF4 weight travels as its named fields (``<proj>_packed``,
``<proj>_absmax``, ...; operands.NF4Operand rebuilds it), the launch plan as its key string (plan.LaunchPlan), and
the layer op's inputs are named once, by ``LayerInputs``, which the caller fills by keyword and autograd.py reads
by name.  Each body decodes its arguments and calls dispatch.py.
"""
from __future__ import annotations

import threading
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_mode

from ..reference.routing import Routing
from . import dispatch
from .host import INTERPRET, r_pad
from .operands import NF4Operand
from .plan import LaunchPlan
from .routing import check_routing_ids, launch_routing, launch_routing_xa, torch_routing

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


def traced(tensors) -> bool:
    """Whether a call on ``tensors`` is traced: torch.compile, a dispatch mode, or a tensor subclass (fake,
    functional, DTensor, ...) among them.  Such calls launch through ``wrap_triton``."""
    if torch.compiler.is_compiling() or _current_mode() is not None:
        return True
    return any(type(t) not in _PLAIN and isinstance(t, torch.Tensor) for t in tensors)


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


def run(name: str, *args, **kwargs):
    """Call op ``nf4moe::<name>``.  Eagerly on plain tensors its Python body runs directly with plain
    Triton launches: the dispatcher's custom-op wrapper alone cost ~0.1 ms per op call (cProfile on an
    H200, T=1, where the whole layer is host-bound).  Under torch.compile, with fake / functional /
    subclass tensors, under a dispatch mode, or when autograd would record the call, the registered op
    runs, so tracing, the meta functions, the mode and autograd (which refuses: these ops have no
    derivative of their own) see it."""
    if runs_direct((*args, *kwargs.values())):
        _direct.on = True
        try:
            return _BODIES[name](*args, **kwargs)
        finally:
            _direct.on = False
    return _OPS[name](*args, **kwargs)


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


def _fake(name: str):
    """Register the decorated function as op ``name``'s fake impl, under the interpreter only (triton_op derives
    fake impls by tracing its body on a GPU)."""
    def deco(fn):
        if _INTERPRET:
            _OPS[name].register_fake(fn)
        return fn

    return deco


# ---------------------------------------------------------------------------------------------- the layer
class LayerInputs(NamedTuple):
    """The inputs of ``nf4moe::moe_experts``, in its order (``LayerInputs(*inputs)`` names a call's inputs)."""

    x: Tensor
    top_k_index: Tensor
    top_k_weights: Tensor
    sorted_pair_ids: Tensor
    expert_offsets: Tensor
    gu_packed: Tensor
    gu_absmax: Tensor
    gu_absmax2: Optional[Tensor]
    gu_code2: Optional[Tensor]
    gu_offset: Optional[Tensor]
    dn_packed: Tensor
    dn_absmax: Tensor
    dn_absmax2: Optional[Tensor]
    dn_code2: Optional[Tensor]
    dn_offset: Optional[Tensor]
    lora_a_up: Optional[Tensor]
    lora_b_up: Optional[Tensor]
    lora_a_down: Optional[Tensor]
    lora_b_down: Optional[Tensor]
    scaling: float
    act: str
    blocksize: int
    gu_blocksize2: int
    dn_blocksize2: int
    plan: str
    xa_up: Optional[Tensor] = None

    @classmethod
    def of(cls, x, top_k_index, top_k_weights, routing: Routing, gate_up: NF4Operand, down: NF4Operand, lora: tuple,
           scaling: float, act: str, plan: LaunchPlan, xa_up=None) -> "LayerInputs":
        """The op's inputs from the structured ones (``lora``: A_up, B_up, A_down, B_down or four Nones)."""
        return cls(x, top_k_index, top_k_weights, routing.sorted_pair_ids, routing.expert_offsets, *gate_up.fields(),
                   *down.fields(), *lora, scaling, act, gate_up.blocksize, gate_up.blocksize2, down.blocksize2,
                   plan.key, xa_up)

    def gate_up(self) -> NF4Operand:
        """The gate|up weight, (E, 2I, H)."""
        return NF4Operand(self.gu_packed, self.gu_absmax, self.gu_absmax2, self.gu_code2, self.gu_offset,
                          self.blocksize, self.gu_blocksize2)

    def down(self) -> NF4Operand:
        """The down weight, (E, H, I)."""
        return NF4Operand(self.dn_packed, self.dn_absmax, self.dn_absmax2, self.dn_code2, self.dn_offset,
                          self.blocksize, self.dn_blocksize2)

    def lora(self) -> tuple:
        """(A_up, B_up, A_down, B_down), Nones without LoRA."""
        return self.lora_a_up, self.lora_b_up, self.lora_a_down, self.lora_b_down


def _layer_out_shapes(x, top_k_index, sorted_pair_ids, gu_packed, dn_packed, lora_a_up, save: bool):
    """moe_experts' outputs, empty (its fake impl)."""
    p = sorted_pair_ids.shape[0] if save else 0
    rp = r_pad(lora_a_up.shape[1] if lora_a_up is not None else 0)
    return (x.new_empty(top_k_index.shape[0], dn_packed.shape[1]), x.new_empty(p, gu_packed.shape[1]),
            x.new_empty(p if lora_a_up is not None else 0, rp, dtype=torch.float32))


@_register("moe_experts")
def moe_experts(
    x: Tensor, top_k_index: Tensor, top_k_weights: Tensor, sorted_pair_ids: Tensor, expert_offsets: Tensor,
    gu_packed: Tensor, gu_absmax: Tensor, gu_absmax2: Optional[Tensor], gu_code2: Optional[Tensor],
    gu_offset: Optional[Tensor],
    dn_packed: Tensor, dn_absmax: Tensor, dn_absmax2: Optional[Tensor], dn_code2: Optional[Tensor],
    dn_offset: Optional[Tensor],
    lora_a_up: Optional[Tensor], lora_b_up: Optional[Tensor], lora_a_down: Optional[Tensor],
    lora_b_down: Optional[Tensor], scaling: float, act: str, blocksize: int, gu_blocksize2: int,
    dn_blocksize2: int, plan: str, xa_up: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(out (T, H), gu (P, 2I) pre-activation in sorted order, xa (P, R_PAD) fp32 x·A_upᵀ): the whole expert layer
    by the launch plan ``plan`` (its key).  gu and xa have 0 rows unless the plan saves pre-activations
    (training); ``xa_up``: the up X·Aᵀ from the routing launch (plan up_xa "routing")."""
    gate_up = NF4Operand(gu_packed, gu_absmax, gu_absmax2, gu_code2, gu_offset, blocksize, gu_blocksize2)
    down = NF4Operand(dn_packed, dn_absmax, dn_absmax2, dn_code2, dn_offset, blocksize, dn_blocksize2)
    return dispatch.layer_forward(
        LaunchPlan.from_key(plan), x, top_k_index, top_k_weights, sorted_pair_ids, expert_offsets, gate_up, down,
        (lora_a_up, lora_b_up, lora_a_down, lora_b_down), scaling, act, xa_up=xa_up, launcher=_launcher())


@_fake("moe_experts")
def _(x, top_k_index, top_k_weights, sorted_pair_ids, expert_offsets, gu_packed, gu_absmax, gu_absmax2, gu_code2,
      gu_offset, dn_packed, dn_absmax, dn_absmax2, dn_code2, dn_offset, lora_a_up, lora_b_up, lora_a_down,
      lora_b_down, scaling, act, blocksize, gu_blocksize2, dn_blocksize2, plan, xa_up=None):
    return _layer_out_shapes(x, top_k_index, sorted_pair_ids, gu_packed, dn_packed, lora_a_up,
                             LaunchPlan.from_key(plan).save_preact)


# ---------------------------------------------------------------------------------------------- training
# The backward of nf4moe::moe_experts (registered in nf4moe.moe_layers.autograd) runs these, one launch each.

@_register("moe_up_preact")
def moe_up_preact(
    x: Tensor, packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
    offset: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor], scaling: float,
    sorted_pair_ids: Tensor, expert_offsets: Tensor, top_k: int, blocksize: int, blocksize2: int, act: str,
    write_xa: bool, plan: str,
) -> tuple[Tensor, Tensor]:
    """Recompute mode: (gu (P, 2I) pre-activation, sorted order; xa (P, R_PAD) fp32 or 0 rows)."""
    w = NF4Operand(packed, absmax, absmax2, code2, offset, blocksize, blocksize2)
    return dispatch.up_preact(LaunchPlan.from_key(plan), x, w, lora_a, lora_b, scaling, sorted_pair_ids,
                              expert_offsets, top_k=top_k, act=act, write_xa=write_xa, launcher=_launcher())


@_fake("moe_up_preact")
def _(x, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, top_k,
      blocksize, blocksize2, act, write_xa, plan):
    p = sorted_pair_ids.shape[0]
    rp = r_pad(lora_a.shape[1] if lora_a is not None else 0)
    return (x.new_empty(p, packed.shape[1]),
            x.new_empty(p if write_xa and lora_a is not None else 0, rp, dtype=torch.float32))


@_register("moe_down_bwd")
def moe_down_bwd(
    dout: Tensor, gu: Tensor, top_k_weights: Tensor, packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor],
    code2: Optional[Tensor], offset: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor],
    scaling: float, sorted_pair_ids: Tensor, expert_offsets: Tensor, top_k: int, blocksize: int, blocksize2: int,
    act: str, need_dgu: bool, need_dw: bool, need_xa: bool, need_dzb: bool, plan: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Down + combine + SwiGLU backward (dispatch.down_backward) by the layer call's plan."""
    w = NF4Operand(packed, absmax, absmax2, code2, offset, blocksize, blocksize2)
    return dispatch.down_backward(LaunchPlan.from_key(plan), dout, gu, top_k_weights, w, lora_a, lora_b, scaling, sorted_pair_ids,
                                  expert_offsets, top_k=top_k, act=act, need_dgu=need_dgu, need_dw=need_dw,
                                  need_xa=need_xa, need_dzb=need_dzb, launcher=_launcher())


@_fake("moe_down_bwd")
def _(dout, gu, top_k_weights, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling, sorted_pair_ids,
      expert_offsets, top_k, blocksize, blocksize2, act, need_dgu, need_dw, need_xa, need_dzb, plan):
    p = sorted_pair_ids.shape[0]
    inter = packed.shape[2] * 2
    has_lora = lora_a is not None
    rp = r_pad(lora_a.shape[1] if has_lora else 0)
    f32 = torch.float32
    return (dout.new_empty(p if need_dgu else 0, 2 * inter), dout.new_empty(p if need_dw else 0, dtype=f32),
            dout.new_empty(p if (need_dzb and has_lora) else 0, rp, dtype=f32),
            dout.new_empty(p if (need_xa and has_lora) else 0, rp, dtype=f32))


@_register("moe_up_bwd")
def moe_up_bwd(
    dgu: Tensor, packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
    offset: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor], scaling: float,
    sorted_pair_ids: Tensor, expert_offsets: Tensor, blocksize: int, blocksize2: int, need_dx: bool,
    need_dzb: bool, plan: str,
) -> tuple[Tensor, Tensor]:
    """Up backward (dispatch.up_backward) by the layer call's plan."""
    w = NF4Operand(packed, absmax, absmax2, code2, offset, blocksize, blocksize2)
    return dispatch.up_backward(LaunchPlan.from_key(plan), dgu, w, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets, need_dx=need_dx,
                                need_dzb=need_dzb, launcher=_launcher())


@_fake("moe_up_bwd")
def _(dgu, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets,
      blocksize, blocksize2, need_dx, need_dzb, plan):
    p = sorted_pair_ids.shape[0]
    has_lora = lora_a is not None
    rp = r_pad(lora_a.shape[1] if has_lora else 0)
    return (dgu.new_empty(p if need_dx else 0, packed.shape[2] * 2),
            dgu.new_empty(p if (need_dzb and has_lora) else 0, rp, dtype=torch.float32))


@_register("lora_grad")
def lora_grad(
    lhs: Tensor, rhs: Tensor, sorted_pair_ids: Tensor, expert_offsets: Tensor, top_k_weights: Optional[Tensor],
    num_experts: int, da: int, db: int, scaling: float, top_k: int, lhs_is_rank: bool, lhs_gather: bool,
    rhs_gather: bool, rhs_gated: bool, act: str, dtype: torch.dtype,
) -> Tensor:
    """(E, da, db) per-expert LoRA gradient, a fixed-order reduction over each expert's rows (dispatch.lora_grad)."""
    return dispatch.lora_grad(lhs, rhs, sorted_pair_ids, expert_offsets, top_k_weights, num_experts=num_experts,
                              da=da, db=db, scaling=scaling, top_k=top_k, lhs_is_rank=lhs_is_rank,
                              lhs_gather=lhs_gather, rhs_gather=rhs_gather, rhs_gated=rhs_gated, act=act,
                              dtype=dtype, launcher=_launcher())


@_fake("lora_grad")
def _(lhs, rhs, sorted_pair_ids, expert_offsets, top_k_weights, num_experts, da, db, scaling, top_k, lhs_is_rank,
      lhs_gather, rhs_gather, rhs_gated, act, dtype):
    return lhs.new_empty(num_experts, da, db, dtype=dtype)


@_register("combine")
def combine(y: Tensor, top_k_index: Tensor, num_experts: int) -> Tensor:
    """(T, H): sum over each token's K slots of y, in slot order, fp32 accumulation."""
    return dispatch.combine(y, top_k_index, num_experts, launcher=_launcher())


@_fake("combine")
def _(y, top_k_index, num_experts):
    return y.new_empty(top_k_index.shape[0], y.shape[1])


# ---------------------------------------------------------------------------------------------- routing
@_register("routing")
def routing(top_k_index: Tensor, num_experts: int, check: bool = False, pdl: bool = False) -> tuple[Tensor, Tensor]:
    """(sorted_pair_ids (T*K,) int32, expert_offsets (E+1,) int32) of top_k_index (T, K), one or two launches;
    only for sizes ``routing.triton_fits`` accepts.  ``check``: the kernel asserts no id is negative (direct CUDA
    launches only); ``pdl``: the plan's programmatic dependent launch."""
    return launch_routing(top_k_index, num_experts, launcher=_launcher(), check=check, pdl=pdl)


@_fake("routing")
def _(top_k_index, num_experts, check=False, pdl=False):
    return (top_k_index.new_empty(top_k_index.numel(), dtype=torch.int32),
            top_k_index.new_empty(num_experts + 1, dtype=torch.int32))


def route(plan: LaunchPlan, top_k_index: Tensor, num_experts: int, *, check_ids: bool, x: Tensor | None = None,
          lora_a: Tensor | None = None) -> tuple[Routing, Tensor | None]:
    """The plan's routing of ``top_k_index`` (T, K): (Routing, the up X·Aᵀ partials by pair id or None).

    ``plan.routing``: "kernel" runs the routing op (a direct launch eagerly, the registered op when traced),
    "kernel_xa" its one-program sort with the up projection's X·Aᵀ in the same launch (``x``, ``lora_a``;
    direct launches only), "torch" torch's sort.  ``check_ids``: reject negative ids (check_routing_ids),
    without a host sync on a GPU: inside the routing kernel (a device-side assert) where the plan says so
    (``check_ids_in_kernel``); else on the offsets afterwards, two launches more on a GPU (a compare and
    torch._assert_async: 3.2 us of GPU time per Qwen3-30B-A3B T=1 CUDA-graph replay on an H200, NOTES v37)."""
    in_kernel = check_ids and plan.check_ids_in_kernel
    xa = None
    if plan.routing == "kernel_xa":
        pairs, offsets, xa = launch_routing_xa(top_k_index, num_experts, x, lora_a, r_pad(lora_a.shape[1]),
                                               check=in_kernel, pdl=plan.pdl)
    elif plan.routing == "kernel":
        pairs, offsets = run("routing", top_k_index, num_experts, in_kernel, plan.pdl)
    else:
        pairs, offsets = torch_routing(top_k_index, num_experts)
    if check_ids and not in_kernel:
        check_routing_ids(offsets)
    return Routing(sorted_pair_ids=pairs, expert_offsets=offsets, num_experts=num_experts,
                   top_k=top_k_index.shape[1]), xa
