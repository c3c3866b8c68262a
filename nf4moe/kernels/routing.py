"""Routing metadata on the device, without a host synchronisation.

Pairs p = t*K + k are sorted by expert id with one stable sort of clamped keys: ids < 0 sort first
(so ``expert_offsets[0]`` counts them: a caller can assert it is 0 asynchronously), sentinels >= E last,
and ``searchsorted`` gives the (E+1) expert offsets.  Every shape depends only on T, K and E, so the
call can be captured in a CUDA graph and traced by torch.compile.
"""
from __future__ import annotations

import torch

from ..reference.routing import Routing


def build_routing(top_k_index: torch.Tensor, num_experts: int) -> Routing:
    flat = top_k_index.reshape(-1)
    if flat.dtype == torch.int64:  # clamp first: a huge int64 sentinel must not wrap when narrowed
        key = flat.clamp(-1, num_experts).to(torch.int32)
    else:
        key = flat.to(torch.int32).clamp(-1, num_experts)
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=torch.int32)
    offsets = torch.searchsorted(sorted_key, bounds, out_int32=True)
    return Routing(
        sorted_pair_ids=order.to(torch.int32),
        expert_offsets=offsets,
        num_experts=num_experts,
        top_k=top_k_index.shape[1],
    )
