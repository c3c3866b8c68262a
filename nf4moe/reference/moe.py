"""The expert layer in plain PyTorch: gather by routing, SwiGLU expert MLP with LoRA, weighted combine.

Convention (transformers v5): ``gate_up_proj[e]`` is (2I, H) with rows [0:I] the gate and [I:2I] the
up projection; ``down_proj[e]`` is (H, I).  LoRA per projection: A (E, r, in), B (E, out, r) and
``delta = scaling * (x @ A[e].T) @ B[e].T``.

All math runs in ``compute_dtype`` (fp32 by default, fp64 in gradient tests).  Expert weights may be
given as full tensors or as a callable ``e -> weight of expert e`` so the CPU path dequantizes one
expert at a time instead of materialising the whole (E, out, in) tensor.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F

from .routing import route

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")

WeightSource = Union[torch.Tensor, Callable[[int], torch.Tensor]]


@dataclass
class Lora:
    """LoRA factors of one projection for all experts: A (E, r, in), B (E, out, r)."""

    A: torch.Tensor
    B: torch.Tensor


def activation(x: torch.Tensor, act: str) -> torch.Tensor:
    if act == "silu":
        return F.silu(x)
    if act == "gelu":
        return F.gelu(x)
    if act == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if act == "relu":
        return F.relu(x)
    raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


@dataclass(frozen=True)
class Gate:
    """The gating of the up projection's halves g (gate) and u (up), as data:

        g' = min(g, gate_limit)              (no clamp when None)
        a  = g' * sigmoid(alpha * g')         act "silu" (alpha 1: SiLU), else act(g')
        a  = min(a, act_limit)               (no clamp when None)
        u' = clamp(u, -up_limit, up_limit)   (no clamp when None)
        h  = a * (u' + up_offset)

    ``Gate(act)`` is the plain ``act(g) * u``.  gpt-oss: ``Gate("silu", alpha=1.702, gate_limit=7, up_limit=7,
    up_offset=1)``; DeepSeek-V4 / GLM-5-next: ``Gate("silu", gate_limit=L, up_limit=L)``; Step-3.7 / Bailing:
    ``Gate(act, act_limit=L, up_limit=L)``.
    """

    act: str = "silu"
    alpha: float = 1.0
    gate_limit: float | None = None
    act_limit: float | None = None
    up_limit: float | None = None
    up_offset: float = 0.0

    def __post_init__(self):
        if self.act not in ACTIVATIONS:
            raise ValueError(f"Gate: act must be one of {ACTIVATIONS}, got {self.act!r}")
        if self.alpha != 1.0 and self.act != "silu":
            raise ValueError(f"Gate: alpha scales the sigmoid of act 'silu' only, got act {self.act!r}")
        for name in ("alpha", "gate_limit", "act_limit", "up_limit", "up_offset"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise ValueError(f"Gate: {name} must be a finite number{' or None' if 'limit' in name else ''}, "
                                 f"got {v!r}")
        if self.up_limit is not None and self.up_limit < 0:
            raise ValueError(f"Gate: up_limit must be >= 0, got {self.up_limit}")

    @property
    def plain(self) -> bool:
        """``act(g) * u``: what every kernel computes."""
        return (self.alpha == 1.0 and self.gate_limit is None and self.act_limit is None and self.up_limit is None
                and self.up_offset == 0.0)

    def formula(self, symbolic: bool = True) -> str:
        """The gate as a formula: limits and alpha as L and alpha (``symbolic``) or as their values."""
        lim = (lambda v: "L") if symbolic else (lambda v: f"{v:g}")
        g = f"min(g, {lim(self.gate_limit)})" if self.gate_limit is not None else "g"
        if self.act == "silu" and self.alpha != 1.0:
            a = f"{g}·sigmoid({'alpha' if symbolic else f'{self.alpha:g}'}·{g})"
        else:
            a = f"{self.act}({g})"
        if self.act_limit is not None:
            a = f"min({a}, {lim(self.act_limit)})"
        u = f"clamp(u, ±{lim(self.up_limit)})" if self.up_limit is not None else "u"
        if self.up_offset:
            u = f"({u} + {self.up_offset:g})"
        return f"{a}·{u}"

    def to_dict(self) -> dict:
        return asdict(self)


def apply_gate(g: torch.Tensor, u: torch.Tensor, gate: Gate) -> torch.Tensor:
    if gate.gate_limit is not None:
        g = g.clamp(max=gate.gate_limit)
    a = g * torch.sigmoid(gate.alpha * g) if gate.act == "silu" and gate.alpha != 1.0 else activation(g, gate.act)
    if gate.act_limit is not None:
        a = a.clamp(max=gate.act_limit)
    if gate.up_limit is not None:
        u = u.clamp(min=-gate.up_limit, max=gate.up_limit)
    return a * (u + gate.up_offset) if gate.up_offset else a * u


def _expert_weight(src: WeightSource, e: int, dtype: torch.dtype) -> torch.Tensor:
    w = src(e) if callable(src) else src[e]
    return w.to(dtype)


def _lora_delta(x: torch.Tensor, lora: Lora | None, e: int, scaling: float) -> torch.Tensor | None:
    if lora is None or lora.A.shape[1] == 0:
        return None
    a = lora.A[e].to(x.dtype)
    b = lora.B[e].to(x.dtype)
    return scaling * ((x @ a.T) @ b.T)


def expert_mlp(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    *,
    act: str = "silu",
    lora_gate_up: Lora | None = None,
    lora_down: Lora | None = None,
    lora_scaling: float = 1.0,
    expert: int = 0,
    gate: Gate | None = None,
    bias_gate_up: torch.Tensor | None = None,
    bias_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """One expert on its rows x (n, H): down(gate(g, u)) with g, u the halves of x·W_gate_upᵀ (+ bias), LoRA terms
    of expert ``expert`` added; ``gate`` None is ``act(g) * u``.  Biases: (2I,) and (H,) of this expert."""
    gu = x @ w_gate_up.T
    if bias_gate_up is not None:
        gu = gu + bias_gate_up.to(gu.dtype)
    d = _lora_delta(x, lora_gate_up, expert, lora_scaling)
    if d is not None:
        gu = gu + d
    inter = w_gate_up.shape[0] // 2
    h = apply_gate(gu[:, :inter], gu[:, inter:], gate or Gate(act))
    y = h @ w_down.T
    if bias_down is not None:
        y = y + bias_down.to(y.dtype)
    d = _lora_delta(h, lora_down, expert, lora_scaling)
    if d is not None:
        y = y + d
    return y


def combine(y_pairs: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k top_k_weights[t, k] * y_pairs[t*K + k]; rows of dropped pairs must be zero."""
    t, k = top_k_weights.shape
    # Explicit last dim: with T == 0 or K == 0 a -1 would be ambiguous and view() would raise.
    y = y_pairs.view(t, k, y_pairs.shape[-1])
    return (y * top_k_weights.to(y.dtype).unsqueeze(-1)).sum(dim=1)


def moe_forward(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: WeightSource,
    down_proj: WeightSource,
    *,
    num_experts: int | None = None,
    act: str = "silu",
    lora_gate_up: Lora | None = None,
    lora_down: Lora | None = None,
    lora_scaling: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
    static: bool = False,
    gate: Gate | None = None,
    bias_gate_up: torch.Tensor | None = None,
    bias_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """The whole expert layer: (T, H) -> (T, H) in ``compute_dtype``.  Differentiable (LoRA, inputs).

    ``static=True``: no host synchronisation or data-dependent branch, for torch.compile(fullgraph=True).
    Every expert runs on every token and its output is weighted by the token's routing weight for that
    expert (zero where the token did not pick it; ids >= E are sentinels and never match): E times the
    work of the routed form, fine for the reference path of small models, and the graph stays static.
    """
    if num_experts is None:
        if callable(gate_up_proj):
            raise ValueError("num_experts is required when weights are given as a callable")
        num_experts = gate_up_proj.shape[0]
    t, hdim = hidden_states.shape
    k = top_k_index.shape[1]
    x = hidden_states.to(compute_dtype)
    mlp = dict(act=act, lora_gate_up=lora_gate_up, lora_down=lora_down, lora_scaling=lora_scaling, gate=gate)

    def biases(e: int) -> dict:
        return dict(bias_gate_up=None if bias_gate_up is None else bias_gate_up[e],
                    bias_down=None if bias_down is None else bias_down[e])

    if static:
        w = top_k_weights.to(compute_dtype)
        out = x.new_zeros(t, hdim)
        for e in range(num_experts):
            picked = ((top_k_index == e).to(compute_dtype) * w).sum(dim=1, keepdim=True)  # (T, 1)
            out = out + picked * expert_mlp(x, _expert_weight(gate_up_proj, e, compute_dtype),
                                            _expert_weight(down_proj, e, compute_dtype), expert=e, **mlp,
                                            **biases(e))
        return out
    routing = route(top_k_index, num_experts)
    offsets = routing.expert_offsets.tolist()  # host loop over experts: this is the slow oracle
    pieces, rows = [], []
    for e in range(num_experts):
        lo, hi = offsets[e], offsets[e + 1]
        if hi == lo:
            continue
        pairs = routing.sorted_pair_ids[lo:hi].long()
        y = expert_mlp(
            x[pairs // k],
            _expert_weight(gate_up_proj, e, compute_dtype),
            _expert_weight(down_proj, e, compute_dtype),
            expert=e,
            **mlp,
            **biases(e),
        )
        pieces.append(y)
        rows.append(pairs)
    y_pairs = x.new_zeros(t * k, hdim)
    if pieces:
        y_pairs = y_pairs.index_copy(0, torch.cat(rows), torch.cat(pieces))
    return combine(y_pairs, top_k_weights.to(compute_dtype))

