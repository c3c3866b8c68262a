"""nf4moe: fused NF4 + LoRA Triton kernels for the expert layer of Mixture-of-Experts transformers."""
from .moe_layers import NF4Weight, QuantGroupedExperts

__version__ = "0.1.0"

__all__ = ["NF4Weight", "QuantGroupedExperts", "__version__"]
