"""The Triton path of QuantGroupedExperts: device routing -> fused up (SwiGLU + LoRA) -> fused down
(routing weight + LoRA) -> deterministic combine (inside the down GEMV at decode sizes).  The only
intermediates are the sorted (T*K, I) activation and the (T*K, H) weighted slot outputs.

The whole layer runs as the single op ``nf4moe::moe_experts``: with a gradient needed it saves the
pre-activations and its backward is registered in ``autograd.py`` (saved activations and recompute mode are
described there); for inference it saves nothing (``save_preact=False``).  One op rather than moe_up then
moe_down_combine: one dispatch fewer per eager call (host-bound at small T), and both projections of a call
share what depends only on the routing (the Gluon GEMM's tile tables: one launch fewer from 8192 routed rows).
"""
from __future__ import annotations

import torch

from ..kernels import ops
from ..kernels.configs import env, env_flag, layer_call
from ..kernels.grouped_gemv import gemv_takes
from ..kernels.operands import r_pad
from ..kernels.routing import build_routing, build_routing_xa, routing_xa_fits
from . import autograd  # noqa: F401  (registers the backward of nf4moe::moe_experts)


def _nf4_args(w):
    return (w.packed, w.absmax, w.absmax2, w.code2, w.offset)


def xa_in_routing() -> bool:
    """``NF4MOE_XA_IN_ROUTING`` (default 1, read at import): an eager inference call that takes the decode GEMV
    computes the up projection's LoRA X·Aᵀ in the routing launch, by pair id (routing.routing_xa_kernel): one
    launch fewer per call (0: a lora_xa launch as before).  NOTES v39, measured in session 15 on an H200: Qwen3
    T=1 under a CUDA graph 0.0316 ms against 0.0339."""
    return env_flag("NF4MOE_XA_IN_ROUTING", default=True)


_XA_IN_ROUTING = xa_in_routing()


def recompute_enabled(mod) -> bool:
    """Recompute mode: ``mod.recompute`` if set, else the NF4MOE_RECOMPUTE environment variable."""
    flag = getattr(mod, "recompute", None)
    if flag is None:
        return env("NF4MOE_RECOMPUTE", "0") == "1"
    return bool(flag)


def _needs_grad(mod, *tensors) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in tensors)


def triton_forward(mod, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Triton launches go to the current CUDA device: a layer placed on another GPU (a model split over
    several, e.g. ``device_map="auto"``) runs under a guard for its own device."""
    if hidden_states.is_cuda and hidden_states.device.index != torch.cuda.current_device():
        with torch.cuda.device(hidden_states.device):
            return _forward(mod, hidden_states, top_k_index, top_k_weights)
    return _forward(mod, hidden_states, top_k_index, top_k_weights)


def _forward(mod, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    with layer_call():  # switches, capture state and device read once per call (configs.layer_call)
        return _layer(mod, hidden_states, top_k_index, top_k_weights)


def _layer(mod, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    e = mod.num_experts
    check_ids = getattr(mod, "check_ids", True)
    gu, dn = mod.gate_up_nf4, mod.down_nf4
    la = lb = da = db = None
    if mod.lora_rank > 0:
        la, lb = mod.lora_A["gate_up_proj"], mod.lora_B["gate_up_proj"]
        da, db = mod.lora_A["down_proj"], mod.lora_B["down_proj"]
    grad = _needs_grad(mod, hidden_states, top_k_weights, la, lb, da, db)
    xa_up = None
    if (_XA_IN_ROUTING and la is not None and not grad and gemv_takes(top_k_index.numel())
            and routing_xa_fits(top_k_index, e) and ops.runs_direct((hidden_states, top_k_index, la))):
        routing, xa_up = build_routing_xa(top_k_index, e, hidden_states, la, r_pad(la.shape[1]), check_ids=check_ids)
    else:
        routing = build_routing(top_k_index, e, check_ids=check_ids)
    args = (hidden_states, top_k_index.contiguous(), top_k_weights.contiguous(), routing.sorted_pair_ids,
            routing.expert_offsets, *_nf4_args(gu), *_nf4_args(dn), la, lb, da, db, mod.scaling, mod.act,
            gu.blocksize, gu.blocksize2, dn.blocksize2)
    if grad:
        out, _, _ = ops.moe_experts(*args, not recompute_enabled(mod))
        return out
    out, _, _ = ops.run("moe_experts", *args, False, xa_up)
    return out
