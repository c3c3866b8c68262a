"""nf4moe: fused NF4 + LoRA Triton kernels for the expert layer of Mixture-of-Experts transformers."""
from .moe_layers import NF4Weight, QuantGroupedExperts

__version__ = "0.1.0"

# Model-facing API, imported on first use so `import nf4moe` does not import transformers / PEFT.
_KERNELS_API = ("plan_overrides",)  # imports triton: on first use too
_ADAPTERS_API = (
    "replace_experts",
    "from_pretrained",
    "save_pretrained",
    "save_adapter",
    "load_adapter",
    "load_bnb_experts",
    "merge_and_unload",
    "supported_models",
    "UnsupportedExpertsError",
)


def __getattr__(name):
    if name in _ADAPTERS_API:
        from . import adapters

        return getattr(adapters, name)
    if name in _KERNELS_API:
        from .kernels import plan

        return getattr(plan, name)
    raise AttributeError(f"module 'nf4moe' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_ADAPTERS_API) + list(_KERNELS_API))


__all__ = ["NF4Weight", "QuantGroupedExperts", "__version__", *_ADAPTERS_API, *_KERNELS_API]
