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
    "Nf4MoeConfig",
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


def _register_quantizer_on_import() -> None:
    """Register the ``"nf4moe"`` quantizer with transformers when its quantizer registry is imported.

    ``import nf4moe`` does not import transformers (a kernel benchmark never needs it), yet a plain
    ``AutoModelForCausalLM.from_pretrained`` of an nf4moe checkpoint must find the quantizer after it:
    registered now if transformers' registry is already imported, else right after it is.
    """
    import importlib
    import importlib.abc
    import importlib.util
    import sys

    target = "transformers.quantizers.auto"

    def register():
        # The module registers itself when its import finishes; one already importing (the import of
        # transformers' registry can start inside it) registers when it finishes.
        if "nf4moe.adapters.hf_quantizer" not in sys.modules:
            importlib.import_module("nf4moe.adapters.hf_quantizer")

    if target in sys.modules:
        register()
        return

    class _AfterImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target_module=None):
            if name != target:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def exec_then_register(module):
                exec_module(module)
                register()

            spec.loader.exec_module = exec_then_register
            return spec

    sys.meta_path.insert(0, _AfterImport())


_register_quantizer_on_import()
