"""Plain-PyTorch twins of every nf4moe op, computed in fp32 (or the dtype asked for).

They are the test oracle for the Triton kernels and the CPU path of ``QuantGroupedExperts``.
Nothing here imports the rest of nf4moe; the routing dataclass defined here is the one the kernels
use too, so both paths speak the same metadata.
"""
from .nf4 import NF4_CODE, dequantize_absmax, dequantize_nf4
from .routing import Routing, route
from .moe import ACTIVATIONS, Gate, Lora, activation, apply_gate, combine, expert_mlp, moe_forward

__all__ = [
    "Gate",
    "apply_gate",
    "NF4_CODE",
    "dequantize_absmax",
    "dequantize_nf4",
    "Routing",
    "route",
    "ACTIVATIONS",
    "Lora",
    "activation",
    "expert_mlp",
    "combine",
    "moe_forward",
]
