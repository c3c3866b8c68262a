"""torch.library registration of the kernels, so torch.compile traces them and CUDA graphs capture them.

On a GPU each op is a ``triton_op`` whose body launches through ``wrap_triton`` (Inductor sees the
Triton kernel).  Under the Triton interpreter (CPU tests) ``triton_op`` cannot be traced with fake
tensors, so the same bodies are registered as opaque ``custom_op``s with explicit fake impls; the CPU
tests exercise torch.compile through that path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .combine import launch_combine
from .configs import interpreting
from .grouped_gemm import launch_nf4_moe_gemm

_INTERPRET = interpreting()
if _INTERPRET:
    _LAUNCHER = None
else:
    from torch.library import wrap_triton as _LAUNCHER


def _register(name: str):
    def deco(fn):
        if _INTERPRET:
            return torch.library.custom_op(f"nf4moe::{name}", mutates_args=())(fn)
        from torch.library import triton_op

        return triton_op(f"nf4moe::{name}", mutates_args=())(fn)

    return deco


@_register("moe_up")
def moe_up(
    x: Tensor, packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
    offset: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor], scaling: float,
    sorted_pair_ids: Tensor, expert_offsets: Tensor, top_k: int, blocksize: int, blocksize2: int, act: str,
) -> Tensor:
    """act(x W_gateᵀ + LoRA) * (x W_upᵀ + LoRA) for every routed pair, (T*K, I) in sorted order."""
    inter = packed.shape[1] // 2
    out = x.new_empty(sorted_pair_ids.numel(), inter)
    return launch_nf4_moe_gemm(
        x, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets,
        None, out, n=inter, top_k=top_k, blocksize=blocksize, blocksize2=blocksize2, gated=True, act=act,
        launcher=_LAUNCHER,
    )


@_register("moe_down")
def moe_down(
    h: Tensor, packed: Tensor, absmax: Tensor, absmax2: Optional[Tensor], code2: Optional[Tensor],
    offset: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor], scaling: float,
    sorted_pair_ids: Tensor, expert_offsets: Tensor, top_k_weights: Tensor, blocksize: int, blocksize2: int,
) -> Tensor:
    """w[p] * (h W_downᵀ + LoRA) per pair, (T*K, H) indexed by pair id (dropped pairs unwritten)."""
    hidden = packed.shape[1]
    out = h.new_empty(sorted_pair_ids.numel(), hidden)
    return launch_nf4_moe_gemm(
        h, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets,
        top_k_weights, out, n=hidden, top_k=1, blocksize=blocksize, blocksize2=blocksize2, gated=False,
        launcher=_LAUNCHER,
    )


@_register("combine")
def combine(y: Tensor, top_k_index: Tensor, num_experts: int) -> Tensor:
    """(T, H): sum over each token's K slots of y, in slot order, fp32 accumulation."""
    t = top_k_index.shape[0]
    out = y.new_empty(t, y.shape[1])
    return launch_combine(y, top_k_index, out, num_experts, launcher=_LAUNCHER)


if _INTERPRET:

    @moe_up.register_fake
    def _(x, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets,
          top_k, blocksize, blocksize2, act):
        return x.new_empty(sorted_pair_ids.shape[0], packed.shape[1] // 2)

    @moe_down.register_fake
    def _(h, packed, absmax, absmax2, code2, offset, lora_a, lora_b, scaling, sorted_pair_ids, expert_offsets,
          top_k_weights, blocksize, blocksize2):
        return h.new_empty(sorted_pair_ids.shape[0], packed.shape[1])

    @combine.register_fake
    def _(y, top_k_index, num_experts):
        return y.new_empty(top_k_index.shape[0], y.shape[1])
