"""Routing metadata: the T*K (token, slot) pairs sorted by expert.

Pair p = t * K + k is slot k of token t.  Ids outside [0, E) are expert-parallel sentinels (another
rank owns that expert) and are dropped: they appear in no expert's range.  The kernels consume the
same dataclass, built on the device without a host synchronisation (``nf4moe.kernels.routing``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Routing:
    """Which (token, slot) pairs each expert serves.

    Attributes:
        sorted_pair_ids: (T*K,) int32.  Pair indices p = t*K + k ordered by expert id (stable, so
            within an expert pairs keep token order).  Entries past ``expert_offsets[E]`` belong to
            dropped ids and must not be read.
        expert_offsets: (E+1,) int32.  Expert e serves ``sorted_pair_ids[expert_offsets[e]:
            expert_offsets[e+1]]``; ``expert_offsets[0]`` is the start of real ids (always 0 for
            valid input).
        num_experts: E.
        top_k: K.
    """

    sorted_pair_ids: torch.Tensor
    expert_offsets: torch.Tensor
    num_experts: int
    top_k: int

    @property
    def counts(self) -> torch.Tensor:
        """(E,) number of pairs per expert."""
        return self.expert_offsets[1:] - self.expert_offsets[:-1]


def route(top_k_index: torch.Tensor, num_experts: int) -> Routing:
    """Sort the (token, slot) pairs by expert id; ids < 0 or >= E are dropped."""
    flat = top_k_index.reshape(-1).to(torch.int64)
    # Send every dropped id past the last expert so a plain stable sort puts them last.
    key = torch.where((flat >= 0) & (flat < num_experts), flat, torch.full_like(flat, num_experts))
    order = torch.sort(key, stable=True).indices
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=torch.int64)
    offsets = torch.searchsorted(key[order], bounds)
    return Routing(
        sorted_pair_ids=order.to(torch.int32),
        expert_offsets=offsets.to(torch.int32),
        num_experts=num_experts,
        top_k=top_k_index.shape[-1] if top_k_index.dim() else 1,
    )
