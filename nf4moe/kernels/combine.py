"""Deterministic combine of each token's K slot outputs: out[t] = sum_k y[t*K + k] (fixed order, fp32).

The down kernel already multiplied each slot by its routing weight.  Slots whose expert id is outside
[0, E) (expert-parallel sentinels) were never written and are skipped here, so ``y`` needs no zero-fill.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import pdl_enter, slot_sum
from .host import cdiv, pow2
from .launch import launch, pdl_options


@triton.jit
def combine_kernel(
    y_ptr,     # (T*K, H) slot outputs, weighted; rows of dropped slots are garbage and skipped
    idx_ptr,   # (T, K) expert ids (any integer dtype), contiguous
    out_ptr,   # (T, H) output
    H, E,
    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, PDL: tl.constexpr,
):
    """Grid: (T, cdiv(H, BLOCK_H))."""
    pdl_enter(PDL)
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    acc = slot_sum(y_ptr, H, idx_ptr, t, offs, mask, E, TOP_K, BLOCK_H, "")
    tl.store(out_ptr + t * H + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def launch_combine(y: torch.Tensor, top_k_index: torch.Tensor, out: torch.Tensor, num_experts: int, *, pdl: bool = False,
                   launcher=None) -> torch.Tensor:
    """out (T, H) = each token's K slot rows of ``y`` (P, H) summed in slot order; ``pdl``: the plan's choice."""
    t, k = top_k_index.shape
    h = out.shape[1]
    block_h = min(1024, pow2(h))
    launch(combine_kernel, (t, cdiv(h, block_h)), launcher, y, top_k_index, out, h, num_experts, TOP_K=k,
           BLOCK_H=block_h, **pdl_options(pdl, launcher))
    return out
