"""The Triton path of QuantGroupedExperts: one launch plan per call (kernels/plan.py), then device routing ->
fused up (SwiGLU + LoRA) -> fused down (routing weight + LoRA) -> deterministic combine (inside the down GEMV at
decode sizes).  The only intermediates are the sorted (T*K, I) activation and the (T*K, H) weighted slot rows.

The whole layer runs as the single op ``nf4moe::moe_experts``: with a gradient needed the plan saves the
pre-activations and the op's backward is registered in ``autograd.py`` (saved activations and recompute mode are
described there); for inference it saves nothing.  One op rather than one per projection: one dispatch fewer per
eager call (host-bound at small T), and both projections of a call share what depends only on the routing (the
Gluon GEMM's tile tables: one launch fewer from 8192 routed rows).
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from ..kernels import ops
from ..kernels.host import INTERPRET, rows_16b_aligned
from ..kernels.plan import LaunchPlan, PlanInputs, current_overrides, make_plan
from . import autograd  # noqa: F401  (registers the backward of nf4moe::moe_experts)


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    """The device's compute capability (cached: the query costs host time on every eager call otherwise)."""
    return torch.cuda.get_device_capability(device_index)


@functools.cache
def _gluon() -> bool:
    """Triton ships Gluon's Hopper API (3.6 and later)."""
    return importlib.util.find_spec("triton.experimental.gluon.language.nvidia.hopper") is not None


def _lora(mod) -> tuple:
    """(A_up, B_up, A_down, B_down), or four Nones without LoRA."""
    if mod.lora_rank == 0:
        return None, None, None, None
    return (mod.lora_A["gate_up_proj"], mod.lora_B["gate_up_proj"], mod.lora_A["down_proj"],
            mod.lora_B["down_proj"])


def plan_inputs(mod, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                lora: tuple) -> PlanInputs:
    """What this call is, for the plan (plan.PlanInputs)."""
    x = hidden_states
    tensors = (x, top_k_index, top_k_weights, *(t for t in lora if t is not None))
    traced = ops.traced(tensors)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    cuda = x.is_cuda
    live = cuda and not traced  # a traced call runs neither the Gluon GEMM nor PDL: no device queries to trace
    aligned = live and rows_16b_aligned(x)
    recompute = bool(getattr(mod, "recompute", False))
    return PlanInputs(
        tokens=x.shape[0], top_k=top_k_index.shape[1], num_experts=mod.num_experts, hidden=mod.hidden_size,
        intermediate=mod.intermediate_size, rank=mod.lora_rank, blocksize=mod.gate_up_nf4.blocksize, dtype=x.dtype,
        cuda=cuda, capability=_capability(x.device.index) if live else None, interpret=INTERPRET,
        gluon=live and _gluon(), index_ok=top_k_index.dtype in (torch.int32, torch.int64), x_aligned=aligned,
        training=training, recompute=recompute, capturing=live and torch.cuda.is_current_stream_capturing(),
        traced=traced)


def launch_plan(mod, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> LaunchPlan:
    """The plan a call with these inputs runs (under the overrides in force), without launching anything."""
    return _plan(plan_inputs(mod, hidden_states, top_k_index, top_k_weights, _lora(mod)))


def _plan(inp: PlanInputs) -> LaunchPlan:
    """make_plan under the overrides in force; torch.compile traces make_plan's body (its cache is for eager calls:
    Dynamo would skip it and warn)."""
    build = make_plan.__wrapped__ if torch.compiler.is_compiling() else make_plan
    return build(inp, current_overrides())


def triton_forward(mod, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Triton launches go to the current CUDA device: a layer placed on another GPU (a model split over
    several, e.g. ``device_map="auto"``) runs under a guard for its own device."""
    if hidden_states.is_cuda and hidden_states.device.index != torch.cuda.current_device():
        with torch.cuda.device(hidden_states.device):
            return _layer(mod, hidden_states, top_k_index, top_k_weights)
    return _layer(mod, hidden_states, top_k_index, top_k_weights)


def _layer(mod, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    lora = _lora(mod)
    plan = _plan(plan_inputs(mod, hidden_states, top_k_index, top_k_weights, lora))
    routing, xa_up = ops.route(plan, top_k_index, mod.num_experts, check_ids=getattr(mod, "check_ids", True),
                               x=hidden_states, lora_a=lora[0])
    inputs = ops.LayerInputs.of(hidden_states, top_k_index.contiguous(), top_k_weights.contiguous(), routing,
                                mod.gate_up_nf4.operand, mod.down_nf4.operand, lora, mod.scaling, mod.act, plan,
                                xa_up)
    out, _, _ = ops.run("moe_experts", *inputs)  # the registered op where autograd must record the call
    return out
