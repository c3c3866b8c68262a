"""Modules and autograd glue: the NF4 weight container and QuantGroupedExperts (no transformers import)."""
from .experts import BACKENDS, PROJECTIONS, QuantGroupedExperts
from .nf4_weight import NF4Weight

__all__ = ["BACKENDS", "PROJECTIONS", "NF4Weight", "QuantGroupedExperts"]
