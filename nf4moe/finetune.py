"""QLoRA fine-tuning helpers shared by ``python -m nf4moe demo`` and ``examples/finetune_qlora.py``.

Application code on top of :mod:`nf4moe.adapters` (it imports transformers and PEFT like that layer,
and nothing below it needs it):

- :class:`ByteTokenizer` and the packaged defaults (:data:`DEFAULT_CONFIG`, :data:`DEFAULT_CORPUS`):
  a tiny Qwen3-MoE model and a text corpus that need no download.
- :func:`add_lora`: experts through :func:`nf4moe.replace_experts` (NF4 base + LoRA), other linear
  layers (attention, shared experts, dense MLPs) through PEFT LoRA injected in place, in one model.
- :func:`save_lora` / :func:`load_lora`: both kinds of LoRA in one PEFT-format adapter directory
  (``target_parameters`` for the experts, as :func:`nf4moe.save_adapter` writes them, plus
  ``target_modules`` for the linear layers), so ``peft.PeftModel.from_pretrained(bf16_model, dir)``
  loads all of it onto the original model, and :func:`load_lora` onto an nf4moe model.
- :func:`merge_lora`: folds both into dense weights (PEFT for linear layers,
  :func:`nf4moe.merge_and_unload` for experts).
- :class:`Meter`: tokens/s and peak memory (CUDA allocator peak, or peak RSS on a CPU).
"""
from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

DATA_DIR = Path(__file__).resolve().parent / "data"
DEFAULT_CONFIG = DATA_DIR / "tiny_qwen3_moe.json"
DEFAULT_CORPUS = DATA_DIR / "tiny_stories.txt"
# Linear layers of attention blocks across the supported families (Qwen3-MoE, Mixtral, GLM4-MoE,
# DeepSeek-V3's MLA projections).  Names absent from a model are simply not matched by PEFT.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa",
                     "kv_b_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------- tokenizer
class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, then pad, bos and eos: the packaged model's vocabulary (259).

    ``__call__`` mimics the part of a transformers tokenizer the example script uses.
    """

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259

    def encode(self, text: str, *, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if add_bos else []) + ids + ([self.eos_token_id] if add_eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def __call__(self, text: str, **_) -> dict:
        return {"input_ids": self.encode(text)}


def check_vocab(model: nn.Module, tokenizer) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    need = getattr(tokenizer, "vocab_size", 0)
    if isinstance(tokenizer, ByteTokenizer) and vocab < need:
        raise ValueError(f"the byte tokenizer needs a vocabulary of at least {need} ids; the model has {vocab}")


# ---------------------------------------------------------------------------------------------- model
def load_config(path: str | os.PathLike | None = None):
    """A transformers config from a config JSON file or a checkpoint directory (default: the packaged one)."""
    import transformers

    path = Path(path) if path is not None else DEFAULT_CONFIG
    if path.is_dir():
        return transformers.AutoConfig.from_pretrained(path)
    with open(path) as fh:
        fields = json.load(fh)
    model_type = fields.pop("model_type", None)
    if model_type is None:
        raise ValueError(f"{path}: a config JSON needs a 'model_type' field")
    fields.pop("architectures", None)
    return transformers.AutoConfig.for_model(model_type, **fields)


def has_weights(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("*.bin")))


def random_model(config, *, seed: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> nn.Module:
    """The model of ``config`` with random weights drawn from ``seed``: the same seed gives the same weights."""
    import transformers

    torch.manual_seed(seed)
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)


# ---------------------------------------------------------------------------------------------- LoRA
def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``peft.PeftModel`` (module names as the checkpoint has them)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and hasattr(model, "peft_config") else model


def _lora_linears(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers on linear modules, by qualified name; PEFT's wrappers of 3-D parameters are refused."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ParamWrapper):
            raise ValueError(f"'{name}' is a PEFT target_parameters wrapper; expert weights belong to "
                             "nf4moe.replace_experts here, not to PEFT")
        if isinstance(module, LoraLayer):
            found[name] = module
    return found


@dataclass
class LoraCounts:
    experts: int
    linear: int
    linear_modules: int


def linear_targets(model: nn.Module, targets) -> list[str]:
    """Qualified names of the ``nn.Linear`` modules (bitsandbytes' 4-bit Linear included) that get PEFT LoRA.

    ``targets``: ``"all-linear"`` (every linear layer but the output head) or module names matched
    on the last name component (``["q_proj", "o_proj"]``).  Nothing inside an expert module is a
    target; a name that matches no linear layer is an error.
    """
    from nf4moe import QuantGroupedExperts

    inside_experts = {f"{n}." for n, m in model.named_modules() if isinstance(m, QuantGroupedExperts)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and m is not head and not n.startswith(tuple(inside_experts))}
    if isinstance(targets, str) and targets == "all-linear":
        return sorted(linears)
    wanted = [targets] if isinstance(targets, str) else list(targets)
    found = sorted(n for n in linears if n.rpartition(".")[2] in wanted)
    missing = sorted(set(wanted) - {n.rpartition(".")[2] for n in found})
    if missing:
        raise ValueError(f"target modules {missing} match no linear layer of {type(model).__name__} "
                         f"(linear layers: {sorted({n.rpartition('.')[2] for n in linears})})")
    return found


class _Holder(nn.Module):
    """A parent without ``config`` for PEFT injection.

    PEFT >= 0.20 rewrites the LoraConfig of transformers v5 MoE models (v4 -> v5 conversion): a target
    named ``gate_proj`` / ``up_proj`` / ``down_proj`` (a shared expert, a dense MLP) or ``all-linear``
    becomes ``target_parameters`` ``gate_up_proj`` / ``down_proj``, which would then wrap the
    ``lora_A.gate_up_proj`` parameters of QuantGroupedExperts.  The conversion only runs on a module with a
    transformers ``config``, so the model is injected through this holder, with explicit module names.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


def inject_linear_lora(model: nn.Module, names: list[str], *, rank: int, alpha: float, dropout: float = 0.0,
                       use_rslora: bool = False) -> None:
    """PEFT LoRA on exactly the named linear modules of ``model``, in place (no PeftModel wrapper)."""
    from peft import LoraConfig, inject_adapter_in_model

    if not names:
        return
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none", use_rslora=use_rslora,
                     target_modules=[f"model.{n}" for n in names])
    inject_adapter_in_model(cfg, _Holder(model))
    _lora_linears(model)  # raises if PEFT wrapped anything but linear layers


def add_lora(model: nn.Module, *, rank: int, alpha: float, backend: str, target_modules=ATTENTION_TARGETS,
             dropout: float = 0.0, device: torch.device | str | None = None) -> LoraCounts:
    """In place: experts -> NF4 + LoRA (nf4moe), ``target_modules`` -> PEFT LoRA; only LoRA stays trainable.

    ``target_modules``: ``"all-linear"`` or names (see :func:`linear_targets`); empty or None: LoRA
    on the experts only.  Experts are replaced first, so PEFT never sees the dense 3-D expert weights.
    """
    import nf4moe

    nf4moe.replace_experts(model, lora_rank=rank, lora_alpha=alpha, backend=backend, device=device)
    if target_modules:
        inject_linear_lora(model, linear_targets(model, target_modules), rank=rank, alpha=alpha, dropout=dropout)
    for name, p in model.named_parameters():
        p.requires_grad_(_is_lora_param(name))
    return count_lora(model)


def _is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def count_lora(model: nn.Module) -> LoraCounts:
    from nf4moe import QuantGroupedExperts

    inner = _unwrap(model)
    experts = sum(p.numel() for m in inner.modules() if isinstance(m, QuantGroupedExperts) for p in m.parameters())
    linears = _lora_linears(inner)
    linear = sum(p.numel() for m in linears.values() for n, p in m.named_parameters() if _is_lora_param("." + n))
    return LoraCounts(experts=experts, linear=linear, linear_modules=len(linears))


def _linear_lora_tensors(model: nn.Module, r: int, alpha: float) -> tuple[dict[str, torch.Tensor], list[str], float]:
    tensors, targets, dropout = {}, set(), 0.0
    for name, layer in _lora_linears(model).items():
        (adapter,) = layer.active_adapters
        if layer.r[adapter] != r or float(layer.lora_alpha[adapter]) != float(alpha):
            raise ValueError(f"'{name}': PEFT LoRA r={layer.r[adapter]}, alpha={layer.lora_alpha[adapter]} differs "
                             f"from the experts' r={r}, alpha={alpha:g}; one adapter file holds one r and alpha")
        if getattr(layer, "use_dora", {}).get(adapter, False) or layer.lora_bias.get(adapter, False):
            raise ValueError(f"'{name}': DoRA / LoRA bias cannot be saved with the experts' adapter")
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter].weight.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter].weight.detach().contiguous()
        drop = layer.lora_dropout[adapter]
        dropout = max(dropout, float(getattr(drop, "p", 0.0)))
        targets.add(name.rpartition(".")[2])
    return tensors, sorted(targets), dropout


def save_lora(model: nn.Module, directory: str | os.PathLike) -> dict:
    """One PEFT-format adapter: experts' LoRA (``nf4moe.save_adapter``) plus the PEFT LoRA of linear layers.

    Returns the adapter config written.  PEFT loads the directory onto the original bf16 model
    (``PeftModel.from_pretrained``); :func:`load_lora` loads it onto a model after ``replace_experts``.
    """
    from .adapters.peft_io import adapter_state_dict, write_adapter

    inner = _unwrap(model)
    experts, target_parameters, r, alpha = adapter_state_dict(inner)
    tensors, targets, dropout = _linear_lora_tensors(inner, r, alpha)
    clash = sorted(set(experts) & set(tensors))
    if clash:
        raise ValueError(f"adapter keys of experts and linear layers collide: {clash[:3]}")
    write_adapter(inner, directory, {**experts, **tensors}, target_parameters, r, alpha,
                  target_modules=targets, lora_dropout=dropout)
    with open(Path(directory) / ADAPTER_CONFIG) as fh:
        return json.load(fh)


def load_lora(model: nn.Module, directory: str | os.PathLike) -> dict:
    """Load an adapter written by :func:`save_lora` (or ``save_adapter``) into a model after ``replace_experts``.

    Experts go through :func:`nf4moe.load_adapter`; ``target_modules`` are injected with PEFT and
    filled by name.  Every tensor of the file must land somewhere.  Returns the adapter config.
    """
    import nf4moe
    from safetensors.torch import load_file

    directory = Path(directory)
    with open(directory / ADAPTER_CONFIG) as fh:
        config = json.load(fh)
    inner = _unwrap(model)
    targets = config.get("target_modules") or []
    # linear-layer LoRA in the file is skipped there and checked below; the expert tensors are checked strictly
    nf4moe.load_adapter(inner, directory, skip_other_lora=bool(targets))
    if targets:
        if not _lora_linears(inner):
            inject_linear_lora(inner, linear_targets(inner, targets), rank=int(config["r"]),
                               alpha=config["lora_alpha"], dropout=float(config.get("lora_dropout", 0.0)),
                               use_rslora=bool(config.get("use_rslora", False)))
        tensors = load_file(directory / ADAPTER_WEIGHTS)
        expected, _, _ = _linear_lora_tensors(inner, int(config["r"]), float(config["lora_alpha"]))
        in_file = {k for k in tensors if not k.startswith(tuple(f"{PEFT_PREFIX}{n}." for n, _ in _experts(inner)))}
        missing, extra = sorted(set(expected) - in_file), sorted(in_file - set(expected))
        if missing or extra:
            raise ValueError(f"adapter {directory} does not fit the model's LoRA layers: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        layers = _lora_linears(inner)
        with torch.no_grad():
            for name, layer in layers.items():
                (adapter,) = layer.active_adapters
                for ab in ("A", "B"):
                    w = getattr(layer, f"lora_{ab}")[adapter].weight
                    w.copy_(tensors[f"{PEFT_PREFIX}{name}.lora_{ab}.weight"])
    for name, p in inner.named_parameters():
        p.requires_grad_(_is_lora_param(name))
    return config


def _experts(model: nn.Module):
    from nf4moe import QuantGroupedExperts

    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantGroupedExperts)]


def merge_lora(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Dense model: PEFT LoRA merged into its linear layers, experts by ``nf4moe.merge_and_unload``."""
    import nf4moe

    inner = _unwrap(model)
    for name, layer in _lora_linears(inner).items():
        layer.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = inner.get_submodule(parent_name) if parent_name else inner
        setattr(parent, child, layer.get_base_layer())
    nf4moe.merge_and_unload(inner, dtype=dtype)
    return inner


# ---------------------------------------------------------------------------------------------- metering
def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: the allocator's peak since the last reset.  CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_label(device: torch.device) -> str:
    return "peak CUDA alloc" if device.type == "cuda" else "peak RSS"


class Meter:
    """Tokens per second over a window of recent steps, and peak memory."""

    def __init__(self, device: torch.device, window: int = 20):
        self.device = device
        self.window = window
        self.marks: list[tuple[float, int]] = []
        self.tokens = 0
        self.start = time.perf_counter()

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, tokens: int) -> None:
        self.sync()
        self.tokens += tokens
        self.marks.append((time.perf_counter(), self.tokens))
        self.marks = self.marks[-(self.window + 1):]

    @property
    def tokens_per_s(self) -> float:
        if len(self.marks) < 2:
            return self.tokens / max(time.perf_counter() - self.start, 1e-9)
        (t0, n0), (t1, n1) = self.marks[0], self.marks[-1]
        return (n1 - n0) / max(t1 - t0, 1e-9)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def peak_gib(self) -> float:
        return peak_memory_bytes(self.device) / 2**30
