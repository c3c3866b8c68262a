"""The Triton path of QuantGroupedExperts: device routing -> fused up (SwiGLU + LoRA) -> fused down
(routing weight + LoRA) -> deterministic combine.  The only intermediates are the sorted (T*K, I)
activation and the (T*K, H) weighted slot outputs."""
from __future__ import annotations

import torch

from ..kernels import ops
from ..kernels.routing import build_routing


def _nf4_args(w):
    return (w.packed, w.absmax, w.absmax2, w.code2, w.offset)


def check_routing_ids(expert_offsets: torch.Tensor) -> None:
    """Negative ids sort before expert 0: expert_offsets[0] counts them.  CPU: raise now; CUDA: an
    asynchronous device assert (no host sync, so CUDA graphs and compile still work)."""
    if expert_offsets.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(expert_offsets[0]) != 0:
            raise ValueError("top_k_index has negative expert ids; ids must be >= 0 (ids >= E are sentinels)")
    else:
        torch._assert_async(expert_offsets[0] == 0, "top_k_index has negative expert ids")


def triton_forward(mod, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    e = mod.num_experts
    routing = build_routing(top_k_index, e)
    if getattr(mod, "check_ids", True):
        check_routing_ids(routing.expert_offsets)
    gu, dn = mod.gate_up_nf4, mod.down_nf4
    la = lb = da = db = None
    if mod.lora_rank > 0:
        la, lb = mod.lora_A["gate_up_proj"], mod.lora_B["gate_up_proj"]
        da, db = mod.lora_A["down_proj"], mod.lora_B["down_proj"]
    h = ops.moe_up(
        hidden_states, *_nf4_args(gu), la, lb, mod.scaling, routing.sorted_pair_ids, routing.expert_offsets,
        routing.top_k, gu.blocksize, gu.blocksize2, mod.act,
    )
    y = ops.moe_down(
        h, *_nf4_args(dn), da, db, mod.scaling, routing.sorted_pair_ids, routing.expert_offsets,
        top_k_weights.reshape(-1), dn.blocksize, dn.blocksize2,
    )
    return ops.combine(y, top_k_index.contiguous(), e)
