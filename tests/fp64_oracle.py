"""An fp64 expert layer written independently of nf4moe.reference: a dense loop over tokens and slots.

It shares no code with ``nf4moe.reference.moe_forward`` (no routing metadata, no sort, no gather, no
combine; activations spelled out from their formulas) so the reference is checked against a second,
obviously-correct implementation rather than against itself.  Slow by design: tests keep T*K small.
"""
from __future__ import annotations

import math

import torch


def act_fp64(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return x / (1.0 + torch.exp(-x))
    if act == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    if act == "gelu_tanh":
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if act == "relu":
        return torch.where(x > 0, x, torch.zeros_like(x))
    raise AssertionError(act)


def dense_moe_fp64(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    *,
    act: str = "silu",
    lora: dict | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """out[t] = sum over slots k with 0 <= id < E of w[t,k] * expert_id(x[t]), all in fp64.

    ``lora``: optional {"gate_up_proj": (A (E, r, H), B (E, 2I, r)), "down_proj": (A (E, r, I), B (E, H, r))}.
    Differentiable in every floating input.
    """
    num_experts, two_i, hdim = gate_up.shape
    inter = two_i // 2
    xd = x.double()
    wd = top_k_weights.double()
    gu = gate_up.double()
    dn = down.double()
    ids = top_k_index.tolist()
    rows = []
    for t in range(xd.shape[0]):
        acc = torch.zeros(hdim, dtype=torch.float64)
        for k, e in enumerate(ids[t]):
            if e < 0 or e >= num_experts:
                continue  # expert-parallel sentinel: another rank's expert contributes here
            g = torch.mv(gu[e], xd[t])
            if lora is not None:
                a, b = lora["gate_up_proj"]
                g = g + scaling * torch.mv(b[e].double(), torch.mv(a[e].double(), xd[t]))
            h = act_fp64(g[:inter], act) * g[inter:]
            y = torch.mv(dn[e], h)
            if lora is not None:
                a, b = lora["down_proj"]
                y = y + scaling * torch.mv(b[e].double(), torch.mv(a[e].double(), h))
            acc = acc + wd[t, k] * y
        rows.append(acc)
    if not rows:
        return torch.zeros(0, hdim, dtype=torch.float64)
    return torch.stack(rows)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; ref must not be all zeros."""
    out, ref = out.detach().double(), ref.detach().double()
    denom = ref.norm()
    assert denom > 0, "reference is all zeros: the test data is degenerate"
    return float((out - ref).norm() / denom)
