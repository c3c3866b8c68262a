"""Model-facing code: replace_experts, the expert-class table, checkpoints, PEFT and bitsandbytes interop.

The only layer that imports transformers, PEFT and safetensors.  Importing it also registers the
name ``"nf4moe"`` in transformers' ``ExpertsInterface`` (where the installed transformers has one):
see :func:`nf4moe_experts_forward` for why that entry points users to :func:`from_pretrained`.
"""
from .atomic import LegacyCheckpointWarning
from .checkpoint import MemoryBoundWarning, from_pretrained, load_bnb_experts, save_pretrained
from .hf_quantizer import Nf4MoeConfig, Nf4MoeQuantizer
from .peft_io import load_adapter, save_adapter
from .replace import merge_and_unload, replace_experts
from .table import LAYOUTS, UNSUPPORTED_FLAGS, UnsupportedExpertsError, inspect_experts, supported_models

EXPERTS_IMPLEMENTATION = "nf4moe"


def nf4moe_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """The ``experts_implementation="nf4moe"`` entry of transformers' ExpertsInterface.

    The interface swaps the *forward function* of an expert module that still holds the bf16
    ``gate_up_proj`` / ``down_proj`` Parameters transformers loaded; nf4moe needs the module itself
    swapped (quantized buffers, LoRA parameters) before the weights arrive.  So this entry only makes
    the name known and says how to get the real thing, instead of silently running bf16 experts.
    """
    raise RuntimeError(
        f"experts_implementation='{EXPERTS_IMPLEMENTATION}' reached {type(self).__name__}, which still holds dense "
        "weights: transformers' ExpertsInterface can only swap the forward function, not the weights. Load the model "
        "with from_pretrained(name_or_path, quantization_config=nf4moe.Nf4MoeConfig(...)) (transformers' quantizer "
        "interface: experts quantized as they load; nf4moe.from_pretrained does the same) or call "
        "nf4moe.replace_experts(model) on a loaded model.")


def _register_experts_implementation() -> bool:
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError:  # a transformers without the experts registry: nothing to register in
        return False
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, nf4moe_experts_forward)
    return True


_register_experts_implementation()

__all__ = [
    "LAYOUTS",
    "UNSUPPORTED_FLAGS",
    "LegacyCheckpointWarning",
    "MemoryBoundWarning",
    "Nf4MoeConfig",
    "Nf4MoeQuantizer",
    "UnsupportedExpertsError",
    "from_pretrained",
    "inspect_experts",
    "load_adapter",
    "load_bnb_experts",
    "merge_and_unload",
    "nf4moe_experts_forward",
    "replace_experts",
    "save_adapter",
    "save_pretrained",
    "supported_models",
]
