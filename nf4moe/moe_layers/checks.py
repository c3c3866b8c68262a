"""Input validation for the expert layer: every error names the argument and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def check_tensor(name: str, x, *, ndim: int, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(x.shape)}")


def check_expert_weights(gate_up_proj: torch.Tensor, down_proj: torch.Tensor, blocksize: int) -> tuple[int, int, int]:
    """Validate (E, 2I, H) and (E, H, I) expert weights; returns (E, H, I)."""
    check_tensor("gate_up_proj", gate_up_proj, ndim=3, what="(E, 2I, H)")
    check_tensor("down_proj", down_proj, ndim=3, what="(E, H, I)")
    for name, w in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if not w.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {w.dtype}")
    e, two_i, h = gate_up_proj.shape
    e2, h2, i = down_proj.shape
    if e != e2:
        raise ValueError(f"gate_up_proj has E={e} experts but down_proj has E={e2}")
    if two_i % 2:
        raise ValueError(f"gate_up_proj must have an even number of rows (2I), got {two_i}")
    if two_i != 2 * i:
        raise ValueError(f"gate_up_proj rows (2I={two_i}) must be twice down_proj's I={i}")
    if h2 != h:
        raise ValueError(f"down_proj rows (H={h2}) must equal gate_up_proj's H={h}")
    if gate_up_proj.device != down_proj.device:
        raise ValueError(f"gate_up_proj is on {gate_up_proj.device} but down_proj on {down_proj.device}")
    for name, inner in (("gate_up_proj", h), ("down_proj", i)):
        if inner % blocksize:
            raise ValueError(
                f"{name}'s input dimension ({inner}) must be a multiple of blocksize ({blocksize})"
            )
    return e, h, i


def check_forward_inputs(
    hidden_states,
    top_k_index,
    top_k_weights,
    *,
    hidden_size: int,
    device: torch.device,
    allow_float64: bool,
) -> None:
    check_tensor("hidden_states", hidden_states, ndim=2, what="(T, H)")
    check_tensor("top_k_index", top_k_index, ndim=2, what="(T, K)")
    check_tensor("top_k_weights", top_k_weights, ndim=2, what="(T, K)")
    ok_float = FLOAT_DTYPES if allow_float64 else FLOAT_DTYPES[:3]
    if hidden_states.dtype not in ok_float:
        raise TypeError(f"hidden_states must be one of {ok_float}, got {hidden_states.dtype}")
    if top_k_index.dtype not in INDEX_DTYPES:
        raise TypeError(f"top_k_index must be an integer tensor, got {top_k_index.dtype}")
    if top_k_weights.dtype not in FLOAT_DTYPES:
        raise TypeError(f"top_k_weights must be a floating-point tensor, got {top_k_weights.dtype}")
    t, h = hidden_states.shape
    if h != hidden_size:
        raise ValueError(f"hidden_states has H={h}, the experts expect H={hidden_size}")
    if top_k_index.shape[0] != t:
        raise ValueError(f"top_k_index has T={top_k_index.shape[0]} rows, hidden_states has T={t}")
    if top_k_weights.shape != top_k_index.shape:
        raise ValueError(
            f"top_k_weights shape {tuple(top_k_weights.shape)} must equal top_k_index shape {tuple(top_k_index.shape)}"
            " (same T and K)"
        )
    for name, x in (("hidden_states", hidden_states), ("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but the expert weights are on {device}")
