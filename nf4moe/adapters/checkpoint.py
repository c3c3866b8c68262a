"""Checkpoints: nf4moe's entry points over transformers' own from_pretrained / save_pretrained.

The format is transformers' with the nf4moe quantizer (``hf_quantizer.py``): safetensors under the
model's state_dict names and ``quantization_config`` (quant_method ``"nf4moe"``, with the module
table) in config.json.  :func:`from_pretrained` picks its way from the checkpoint itself:

1. An ordinary transformers checkpoint (hub or local, bf16/fp16/fp32): transformers'
   ``from_pretrained`` with an :class:`Nf4MoeConfig`, so its key renames and per-expert merges apply
   and each expert weight is quantized as it arrives.  The bf16 experts are never all resident: the
   peak is the NF4 model + the non-expert weights + one expert weight in flight.
2. An nf4moe checkpoint (``quantization_config.quant_method == "nf4moe"``): transformers'
   ``from_pretrained``, the quantizer swapping the skeleton's experts for empty QuantGroupedExperts
   first.  Bit-exact round trip.  The older format (an ``nf4moe`` section in config.json, written by
   nf4moe before the quantizer) still loads, through a meta skeleton and load_state_dict.
3. A local checkpoint whose expert weights are bitsandbytes 4-bit (``<module>.gate_up_proj`` packed
   uint8 plus ``<module>.gate_up_proj.absmax`` / ``.quant_map`` / ``.nested_*`` /
   ``.quant_state.bitsandbytes__nf4``, i.e. ``QuantState.as_dict(packed=True)``): the bytes are
   wrapped by ``NF4Weight.from_bnb`` without re-quantizing.

:func:`save_pretrained` is ``model.save_pretrained`` made atomic (``atomic.py``: written beside the
target, swapped in by renames, a manifest of sizes and sha256 written last).  A local directory is
checked before anything is built from it: its manifest when it has one; without one (written by
``model.save_pretrained``, or before manifests) the index's file list and every safetensors header.
"""
from __future__ import annotations

import os
import re
import warnings
import weakref
from contextlib import contextmanager
from typing import Mapping

import torch
from torch import nn

from ..moe_layers import NF4Weight
from ..moe_layers.experts import PROJECTIONS, marker_tensor
from .hf_quantizer import QUANT_METHOD, Nf4MoeConfig, attach, empty_experts
from .atomic import (
    MANIFEST_NAME,
    LegacyCheckpointWarning,
    atomic_directory,
    check_interrupted,
    check_safetensors,
    has_manifest,
    read_json,
    verify_manifest,
)
from .replace import (
    _set_submodule,
    build_quant_experts,
    check_blocksize,
    quant_experts,
    quantize_weight,
    set_trainable,
)
from .table import (
    WEIGHT_NAMES,
    ExpertsSpec,
    UnsupportedExpertsError,
    find_experts,
    inspect_experts,
    is_experts_module,
)

SECTION = "nf4moe"
FORMAT_VERSION = 1
SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# What save_pretrained owns in its directory: anything else there (a tokenizer) is carried into the new one.
_OWNED = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|config\.json|generation_config\.json")
BNB_STATE_SUFFIX = ".quant_state.bitsandbytes__nf4"
# Keyword arguments of from_pretrained that AutoConfig.from_pretrained understands too.
_CONFIG_KWARGS = ("revision", "token", "cache_dir", "trust_remote_code", "local_files_only", "subfolder",
                  "force_download", "proxies")


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size must be an int or like '5GB' / '500MiB', got {size!r}")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


# ---------------------------------------------------------------------------------------------- save
def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *, max_shard_size: int | str = "5GB") -> None:
    """``model.save_pretrained`` (with the nf4moe quantizer attached) made atomic, with a manifest.

    The checkpoint is transformers' own: safetensors under the model's state_dict names (NF4 bytes,
    absmax and nested statistics, LoRA factors, every non-expert weight) and ``config.json`` with
    the ``quantization_config`` of quant_method ``"nf4moe"``, so ``AutoModelForCausalLM.from_pretrained``
    (after ``import nf4moe``) and :func:`from_pretrained` restore it bit-exactly.  Atomic: a failure
    or kill at any point leaves ``save_directory`` as it was before or whole with the new checkpoint;
    other files already in it (a tokenizer) are kept; ``nf4moe_manifest.json`` (sizes and sha256 of
    every file) is written last and checked by :func:`from_pretrained`.
    """
    found = quant_experts(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no QuantGroupedExperts; use model.save_pretrained for a plain model")
    if getattr(model, "config", None) is None or not hasattr(model, "save_pretrained"):
        raise TypeError(f"save_pretrained needs a transformers model (with .config), got {type(model).__name__}")
    if attach(model) is None:
        raise ValueError(f"{type(model).__name__} carries the {model.hf_quantizer.quantization_config.quant_method} "
                         "quantizer; nf4moe cannot write a checkpoint that also restores its quantized weights")
    limit = _parse_size(max_shard_size)
    qc = model.hf_quantizer.quantization_config
    with atomic_directory(save_directory, _OWNED.fullmatch, "save_pretrained") as tmp, qc.writing_manifest(MANIFEST_NAME):
        model.save_pretrained(tmp, max_shard_size=limit)


# ---------------------------------------------------------------------------------------------- files
def _index_files(index: str) -> list[str]:
    """The shard names a safetensors index lists."""
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: corrupt safetensors index (no 'weight_map' table)")
    return sorted(set(weight_map.values()))


def _checkpoint_files(path: str) -> list[str]:
    """Local safetensors files of a checkpoint directory ([] when there are none); all the index lists must exist."""
    index = os.path.join(path, SAFE_INDEX_NAME)
    if os.path.isfile(index):
        names = _index_files(index)
        missing = [n for n in names if not os.path.isfile(os.path.join(path, n))]
        if missing:
            raise FileNotFoundError(f"{path} is a partial checkpoint: {SAFE_INDEX_NAME} lists {len(names)} shards, "
                                    f"{len(missing)} are missing: {missing[:8]}")
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, SAFE_WEIGHTS_NAME)
    return [single] if os.path.isfile(single) else []


def _resolve_files(name_or_path: str, download_kwargs: dict) -> list[str]:
    if os.path.isdir(name_or_path):
        files = _checkpoint_files(name_or_path)
    else:
        from transformers.utils import cached_file

        kw = {k: v for k, v in download_kwargs.items() if k in _CONFIG_KWARGS and k != "trust_remote_code"}
        index = cached_file(name_or_path, SAFE_INDEX_NAME, _raise_exceptions_for_missing_entries=False, **kw)
        if index is not None:
            files = [cached_file(name_or_path, n, **kw) for n in _index_files(index)]
        else:
            single = cached_file(name_or_path, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False, **kw)
            files = [single] if single is not None else []
    if not files:
        raise FileNotFoundError(f"no {SAFE_WEIGHTS_NAME} or {SAFE_INDEX_NAME} in {name_or_path}")
    return files


def _keys(files: list[str]) -> dict[str, str]:
    from safetensors import safe_open

    out = {}
    for f in files:
        check_safetensors(f)
        with safe_open(f, framework="pt") as fh:
            out.update({k: f for k in fh.keys()})
    return out


def _read(key_files: Mapping[str, str], keys, device) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for k in keys:
        by_file.setdefault(key_files[k], []).append(k)
    out = {}
    for f, ks in by_file.items():
        with safe_open(f, framework="pt", device=str(device or "cpu")) as fh:
            out.update({k: fh.get_tensor(k) for k in ks})
    return out


# ---------------------------------------------------------------------------------------------- skeleton
@contextmanager
def _params_on_meta():
    """Build modules with parameters on the meta device but real buffers (rotary tables, position ids)."""

    def to_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            return nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        return None

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


def _model_class(config, model_class_name: str | None, model_cls):
    if model_cls is not None:
        return model_cls
    import transformers

    for name in [model_class_name] + list(getattr(config, "architectures", None) or []):
        cls = getattr(transformers, name, None) if name else None
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    return transformers.AutoModelForCausalLM


def _instantiate(cls, config):
    # Auto classes (they carry a _model_mapping) build through from_config; model classes through their
    # constructor, which runs post_init.
    return cls.from_config(config) if hasattr(cls, "_model_mapping") else cls(config)


def _skeleton(config, model_class_name: str | None, model_cls) -> nn.Module:
    cls = _model_class(config, model_class_name, model_cls)
    with _params_on_meta():
        return _instantiate(cls, config)


def _check_shapes(model: nn.Module, sd: Mapping[str, torch.Tensor], where: str, modules: Mapping[str, dict]) -> None:
    """Name every tensor whose shape differs from the one the model built from the config expects.

    ``modules``: the nf4moe section's module entries, quoted for a tensor under one of them (its
    lora_rank and dims are what the skeleton was built from).
    """
    expected = model.state_dict()
    wrong = [(k, tuple(t.shape), tuple(expected[k].shape)) for k, t in sd.items()
             if k in expected and tuple(t.shape) != tuple(expected[k].shape)]
    if not wrong:
        return
    lines = []
    for k, got, want in wrong[:6]:
        line = f"'{k}' is {got} in the checkpoint, the model built from its config expects {want}"
        owner = next((m for m in modules if k.startswith(m + ".")), None)
        if owner is not None:
            e = modules[owner]
            line += (f" (config.json's {SECTION} section for '{owner}': lora_rank={e['lora_rank']}, "
                     f"E={e['num_experts']}, H={e['hidden_size']}, I={e['intermediate_size']}, "
                     f"blocksize={e['blocksize']})")
        lines.append(line)
    more = f"; and {len(wrong) - 6} more" if len(wrong) > 6 else ""
    raise ValueError(f"{where}: config and tensors disagree: " + "; ".join(lines) + more)


def _load_rest(model: nn.Module, sd: dict[str, torch.Tensor], aliases: Mapping[str, str], allowed_missing: set[str],
               where: str, modules: Mapping[str, dict] | None = None) -> None:
    for alias, target in aliases.items():
        sd[alias] = sd[target]
    _check_shapes(model, sd, where, modules or {})
    result = model.load_state_dict(sd, strict=False, assign=True)
    missing = sorted(set(result.missing_keys) - allowed_missing)
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(f"{where}: checkpoint does not match {type(model).__name__}: "
                         f"missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                         f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    if aliases and hasattr(model, "tie_weights"):
        model.tie_weights()


def _finish(model: nn.Module, device, freeze_base: bool, where: str) -> nn.Module:
    if device is not None:
        model.to(device)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise ValueError(f"{where}: {len(left)} tensors were not loaded (still on meta): {left[:8]}")
    if freeze_base:
        set_trainable(model)
    attach(model)  # model.save_pretrained now writes the nf4moe format
    return model.eval()


def _check_lora_override(value, saved, what: str, name: str) -> None:
    if value is not None and value != saved:
        raise ValueError(f"{what}={value!r} differs from the checkpoint's {saved!r} for '{name}'; "
                         "restored checkpoints keep their saved LoRA (leave it None, or call add_lora after loading)")


def _load_nf4moe(files, config, *, device, backend, lora_rank, lora_alpha, freeze_base, model_cls) -> nn.Module:
    """The format of nf4moe before its transformers quantizer: an ``nf4moe`` section in config.json."""
    section = getattr(config, SECTION)
    if section.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"nf4moe checkpoint format {section.get('format_version')!r} is not {FORMAT_VERSION}")
    model = _skeleton(config, section.get("model_class"), model_cls)
    for name, entry in section["modules"].items():
        _check_lora_override(lora_rank, entry["lora_rank"], "lora_rank", name)
        _check_lora_override(lora_alpha, entry["lora_alpha"], "lora_alpha", name)
        empty_experts(model, name, entry, backend=backend, where="nf4moe checkpoint")
    # That format predates the marker buffers: they are constants, made here.
    owned = {f"{n}.{w}" for n, _ in quant_experts(model) for w in PROJECTIONS}
    key_files = _keys(files)
    sd = _read(key_files, key_files.keys(), device)
    where = f"nf4moe checkpoint {os.path.dirname(files[0])}"
    _load_rest(model, sd, section.get("aliases", {}), owned, where, section["modules"])
    for _, qe in quant_experts(model):
        for w in PROJECTIONS:
            setattr(qe, w, marker_tensor(qe.gate_up_nf4.packed.device))
    return _finish(model, device, freeze_base, where)


# ---------------------------------------------------------------------------------------------- bitsandbytes
def _bnb_entries(keys, prefix: str) -> dict[str, str]:
    """{suffix: key} of one bitsandbytes weight ``prefix`` (packed bytes under '' and its QuantState items)."""
    return {k[len(prefix):]: k for k in keys if k == prefix or k.startswith(prefix + ".")}


def _nf4_from_bnb(tensors: Mapping[str, torch.Tensor], prefix: str, expect: tuple[int, int, int], device, *,
                  allow_non_finite: bool = False) -> NF4Weight:
    import bitsandbytes.functional as bnbf

    packed = tensors[prefix]
    qs_items = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    qs = bnbf.QuantState.from_dict(qs_items, device=torch.device(device or packed.device))
    if tuple(qs.shape) != expect:
        raise ValueError(f"bitsandbytes weight {prefix} has shape {tuple(qs.shape)}, the module needs {expect} (E, out, in)")
    return NF4Weight.from_bnb(packed.to(device) if device is not None else packed, qs, name=prefix,
                              allow_non_finite=allow_non_finite)


def has_bnb_experts(keys) -> bool:
    return any(k.endswith(tuple(f".{w}{BNB_STATE_SUFFIX}" for w in WEIGHT_NAMES)) for k in keys)


def load_bnb_experts(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    lora_rank: int = 16,
    lora_alpha: float | None = 32,
    modules=None,
    backend: str = "auto",
    lora_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    freeze_base: bool = True,
    allow_non_finite: bool = False,
) -> list[str]:
    """Replace expert modules whose weights ``state_dict`` holds as bitsandbytes NF4, without re-quantizing.

    For an expert module at ``P`` the entries are ``P.gate_up_proj`` / ``P.down_proj`` (packed uint8)
    and their ``QuantState.as_dict(packed=True)`` items (``P.gate_up_proj.absmax``, ...,
    ``P.gate_up_proj.quant_state.bitsandbytes__nf4``); the QuantState shape must be (E, out, in).
    Returns the state_dict keys consumed.  Modules with no bitsandbytes entries are left as they are.
    Non-finite statistics raise ValueError naming the weight, unless ``allow_non_finite=True``.
    """
    keys = list(state_dict.keys())
    consumed = []
    for name, module in find_experts(model, modules):
        prefix = f"{name}." if name else ""
        entries = {w: _bnb_entries(keys, prefix + w) for w in WEIGHT_NAMES}
        present = [w for w in WEIGHT_NAMES if BNB_STATE_SUFFIX in entries[w]]
        if not present:
            continue
        if len(present) != len(WEIGHT_NAMES):
            raise ValueError(f"'{name}': bitsandbytes entries for {present} only; both {list(WEIGHT_NAMES)} are needed")
        spec = inspect_experts(module, name)
        if spec.layout.transposed:
            raise UnsupportedExpertsError(
                f"{spec.class_name} at '{name}' stores its weights transposed (E, in, out): bitsandbytes blocks of the "
                "stored tensor run along the wrong axis for QuantGroupedExperts, and re-quantizing would not be bit-exact")
        if spec.layout.interleaved:
            raise UnsupportedExpertsError(
                f"{spec.class_name} at '{name}' interleaves gate and up rows: QuantGroupedExperts holds them in "
                "[gate; up] order, and reordering bitsandbytes' rows would break its nested absmax blocks "
                "(not bit-exact); load the bf16 checkpoint instead (quantized at load)")
        if spec.has_bias:
            raise UnsupportedExpertsError(
                f"{spec.class_name} at '{name}' has expert biases, which a bitsandbytes expert checkpoint does not "
                "carry in the entries nf4moe reads; load the bf16 checkpoint instead (quantized at load)")
        e, h, i = spec.num_experts, spec.hidden_size, spec.intermediate_size
        tensors = {k: state_dict[k] for w in WEIGHT_NAMES for k in entries[w].values()}
        gu = _nf4_from_bnb(tensors, prefix + "gate_up_proj", (e, 2 * i, h), device, allow_non_finite=allow_non_finite)
        dn = _nf4_from_bnb(tensors, prefix + "down_proj", (e, h, i), device, allow_non_finite=allow_non_finite)
        if gu.blocksize != dn.blocksize or gu.compress_statistics != dn.compress_statistics:
            raise ValueError(f"'{name}': gate_up_proj and down_proj were quantized with different bitsandbytes settings")
        qe = build_quant_experts(spec, gu, dn, module, lora_rank=lora_rank, lora_alpha=lora_alpha, backend=backend,
                                 lora_dtype=lora_dtype)
        _set_submodule(model, name, qe)
        consumed.extend(tensors)
    if not consumed:
        raise ValueError(f"no bitsandbytes NF4 expert weights for the expert modules of {type(model).__name__} "
                         f"(looked for '<module>.gate_up_proj{BNB_STATE_SUFFIX}')")
    if freeze_base:
        set_trainable(model)
    return consumed


def _load_bnb_checkpoint(files, config, *, device, backend, lora_rank, lora_alpha, lora_dtype, modules, freeze_base,
                         model_cls, allow_non_finite=False) -> nn.Module:
    key_files = _keys(files)
    model = _skeleton(config, None, model_cls)
    experts = find_experts(model, modules)
    bnb_keys = [k for k in key_files if any(k == f"{n}.{w}" or k.startswith(f"{n}.{w}.") for n, _ in experts
                                            for w in WEIGHT_NAMES)]
    consumed = load_bnb_experts(model, _read(key_files, bnb_keys, device), lora_rank=lora_rank, lora_alpha=lora_alpha,
                                modules=modules, backend=backend, lora_dtype=lora_dtype, device=device,
                                freeze_base=False, allow_non_finite=allow_non_finite)
    left = [n for n, m in find_experts(model, modules)]
    if left:
        raise ValueError(f"expert modules {left[:4]} have no bitsandbytes entries in the checkpoint")
    rest = [k for k in key_files if k not in set(consumed)]
    owned = {f"{n}.{k}" for n, qe in quant_experts(model) for k in qe.state_dict()}
    _load_rest(model, _read(key_files, rest, device), {}, owned, "bitsandbytes checkpoint")
    return _finish(model, device, freeze_base, "bitsandbytes checkpoint")


# ---------------------------------------------------------------------------------------------- quantize at load
def _with_device_map(hf_kwargs: Mapping, device) -> dict:
    """transformers' from_pretrained keyword arguments with ``device`` as its ``device_map``."""
    kwargs = dict(hf_kwargs)
    if device is not None:
        if "device_map" in kwargs:
            raise ValueError("pass either device= or device_map=, not both")
        kwargs["device_map"] = device
    return kwargs


def _load_quantizing(name_or_path, config, *, device, dtype, backend, lora_rank, lora_alpha, lora_dtype, blocksize,
                     compress_statistics, modules, freeze_base, model_cls, hf_kwargs, allow_non_finite=False):
    """transformers' from_pretrained with the nf4moe quantizer: experts quantized as their weights arrive."""
    import transformers

    if hf_kwargs.get("quantization_config") is not None:
        if isinstance(hf_kwargs["quantization_config"], Nf4MoeConfig):
            raise ValueError("from_pretrained builds the Nf4MoeConfig from its own arguments (lora_rank=, "
                             "blocksize=, ...); quantization_config= is for another quantizer of the other layers")
        return _load_with_hooks(name_or_path, config, device=device, dtype=dtype, backend=backend, lora_rank=lora_rank,
                                lora_alpha=lora_alpha, lora_dtype=lora_dtype, blocksize=blocksize,
                                compress_statistics=compress_statistics, modules=modules, freeze_base=freeze_base,
                                model_cls=model_cls, hf_kwargs=hf_kwargs, allow_non_finite=allow_non_finite)

    cls = model_cls or transformers.AutoModelForCausalLM
    qconfig = Nf4MoeConfig(lora_rank=lora_rank, lora_alpha=lora_alpha, blocksize=blocksize,
                           compress_statistics=compress_statistics, lora_dtype=lora_dtype, modules=modules,
                           backend=backend, freeze_base=freeze_base, allow_non_finite=allow_non_finite)
    kwargs = _with_device_map(hf_kwargs, device)
    model = cls.from_pretrained(name_or_path, config=config, dtype=dtype, quantization_config=qconfig, **kwargs)
    return model, model.hf_quantizer


def _load_quantized(name_or_path, config, *, device, backend, lora_rank, lora_alpha, freeze_base, model_cls, hf_kwargs):
    """A checkpoint whose config.json carries the nf4moe quantization_config: transformers' from_pretrained."""
    qc = config.quantization_config
    table = (qc.get("quantized_modules") if isinstance(qc, Mapping) else getattr(qc, "quantized_modules", None)) or {}
    for name, entry in table.items():
        _check_lora_override(lora_rank, entry.get("lora_rank"), "lora_rank", name)
        _check_lora_override(lora_alpha, entry.get("lora_alpha"), "lora_alpha", name)
    kwargs = _with_device_map(hf_kwargs, device)
    cls = _model_class(config, None, model_cls)
    model = cls.from_pretrained(name_or_path, config=config, **kwargs)
    for _, qe in quant_experts(model):
        qe.backend = backend
    if freeze_base:
        set_trainable(model)
    else:
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
    return model


class MemoryBoundWarning(UserWarning):
    """Quantize-at-load fell back to quantizing after a full load (correct result, memory not bounded)."""


class _ArrivalQuantizer:
    """Global torch hooks that quantize selected expert weights as transformers assigns them.

    Module-registration hook: remembers each module's parent and attribute name while the model is
    built, so a module's qualified name is known when its weights arrive.  Parameter-registration
    hook: for a selected expert module's gate_up_proj / down_proj with real data, quantize it and
    return a meta placeholder, so the module never keeps the dense tensor.
    """

    def __init__(self, specs: Mapping[str, ExpertsSpec], *, blocksize: int, compress_statistics: bool,
                 allow_non_finite: bool = False):
        self.specs = specs
        self.allow_non_finite = allow_non_finite
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.parents: dict[int, tuple[weakref.ref, weakref.ref, str]] = {}
        self.done: dict[str, dict[str, NF4Weight]] = {}
        self.max_inflight_bytes = 0

    def on_module(self, parent, name, submodule):
        if submodule is not None:
            self.parents[id(submodule)] = (weakref.ref(submodule), weakref.ref(parent), name)

    def path(self, module) -> str:
        parts, seen = [], set()
        while id(module) in self.parents and id(module) not in seen:
            seen.add(id(module))
            child_ref, parent_ref, name = self.parents[id(module)]
            parent = parent_ref()
            if child_ref() is not module or parent is None:
                break
            parts.append(name)
            module = parent
        return ".".join(reversed(parts))

    def on_param(self, module, name, param):
        if name not in WEIGHT_NAMES or param is None or param.device.type == "meta" or not is_experts_module(module):
            return None
        path = self.path(module)
        spec = self.specs.get(path)
        if spec is None:
            return None
        self.max_inflight_bytes = max(self.max_inflight_bytes, param.numel() * param.element_size())
        self.done.setdefault(path, {})[name] = quantize_weight(
            param, spec.layout, blocksize=self.blocksize, compress_statistics=self.compress_statistics,
            name=f"{path}.{name}" if path else name, allow_non_finite=self.allow_non_finite)
        placeholder = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        placeholder._is_hf_initialized = True  # transformers must not re-initialise it
        return placeholder

    @contextmanager
    def installed(self):
        from torch.nn.modules import module as torch_module

        h1 = torch_module.register_module_module_registration_hook(self.on_module)
        h2 = torch_module.register_module_parameter_registration_hook(self.on_param)
        try:
            yield self
        finally:
            h1.remove()
            h2.remove()


def _load_with_hooks(name_or_path, config, *, device, dtype, backend, lora_rank, lora_alpha, lora_dtype, blocksize,
                     compress_statistics, modules, freeze_base, model_cls, hf_kwargs, allow_non_finite=False):
    """Quantize-at-load beside another transformers quantizer (``quantization_config=BitsAndBytesConfig(...)`` for
    the linear layers): transformers takes one quantizer per load, so the experts are quantized by torch hooks
    as transformers assigns them.  The result carries the other quantizer; see ``hf_quantizer.attach``."""
    import transformers

    cls = model_cls or transformers.AutoModelForCausalLM
    # Validate on a meta skeleton first: an unsupported layout fails before gigabytes are read.
    with torch.device("meta"):
        skeleton = (cls.from_config(config, trust_remote_code=hf_kwargs.get("trust_remote_code", False))
                    if hasattr(cls, "_model_mapping") else cls(config))
    found = find_experts(skeleton, modules)
    if not found:
        raise ValueError(f"{type(skeleton).__name__} has no expert modules"
                         + (f" matching modules={modules!r}" if modules is not None else "")
                         + "; nf4moe replaces classes decorated with transformers' @use_experts_implementation")
    specs = {n: inspect_experts(m, n) for n, m in found}
    check_blocksize(list(specs.values()), blocksize)
    del skeleton, found
    kwargs = _with_device_map(hf_kwargs, device)
    quantizer = _ArrivalQuantizer(specs, blocksize=blocksize, compress_statistics=compress_statistics,
                                  allow_non_finite=allow_non_finite)
    with quantizer.installed():
        model = cls.from_pretrained(name_or_path, config=config, dtype=dtype, **kwargs)
    late = []
    for name, spec in specs.items():
        module = model.get_submodule(name)
        got = quantizer.done.get(name, {})
        if set(got) != set(WEIGHT_NAMES):
            late.append(name)
            got = {w: quantize_weight(getattr(module, w), spec.layout, blocksize=blocksize,
                                      compress_statistics=compress_statistics, name=f"{name}.{w}" if name else w,
                                      allow_non_finite=allow_non_finite) for w in WEIGHT_NAMES}
        qe = build_quant_experts(spec, got["gate_up_proj"], got["down_proj"], module, lora_rank=lora_rank,
                                 lora_alpha=lora_alpha, backend=backend, lora_dtype=lora_dtype)
        _set_submodule(model, name, qe)
    if late:
        warnings.warn(f"{len(late)} expert modules (e.g. '{late[0]}') were not assigned through register_parameter "
                      "during loading and were quantized after the full load: results are the same, but peak memory "
                      "held their dense weights", MemoryBoundWarning, stacklevel=3)
    if freeze_base:
        set_trainable(model)
    attach(model)
    return model, quantizer


def _quant_method(config) -> str | None:
    qc = getattr(config, "quantization_config", None)
    return qc.get("quant_method") if isinstance(qc, Mapping) else getattr(qc, "quant_method", None)


def _looks_local(path: str) -> bool:
    """A path the Hub client would misread as a repo id: absolute, ./ or ../, or under an existing directory."""
    parent = os.path.dirname(path)
    return (os.path.isabs(path) or path in (".", "..") or path.startswith(("./", "../", ".\\", "..\\"))
            or (bool(parent) and os.path.isdir(parent)))


def _check_local(name_or_path: str, *, needs_config: bool) -> str | None:
    """Refuse a missing or partial local checkpoint before transformers or the Hub client sees it.

    Returns None (not a local directory: a Hub id), "verified" (its manifest checked out) or
    "unverified" (a local directory without a manifest).
    """
    if not os.path.exists(name_or_path):
        check_interrupted(name_or_path)
        if _looks_local(name_or_path):
            parent = os.path.dirname(name_or_path)
            hint = (f" (its parent {parent!r} is a local directory, so it is read as a path; a Hub repo id must not "
                    "shadow a local directory)" if parent and not os.path.isabs(name_or_path)
                    and not name_or_path.startswith(".") else "")
            raise FileNotFoundError(f"from_pretrained: name_or_path {name_or_path!r} does not exist{hint}")
        return None
    if not os.path.isdir(name_or_path):
        raise NotADirectoryError(f"from_pretrained: name_or_path {name_or_path!r} is a file; pass the checkpoint's "
                                 "directory")
    verified = has_manifest(name_or_path)
    if verified:
        verify_manifest(name_or_path)
    if needs_config and not os.path.isfile(os.path.join(name_or_path, CONFIG_NAME)):
        raise FileNotFoundError(f"from_pretrained: {name_or_path} has no {CONFIG_NAME} (not a checkpoint directory, "
                                "or a partial one)")
    return "verified" if verified else "unverified"


def _check_manifest_promise(path: str, section: Mapping) -> None:
    if section.get("manifest"):
        raise ValueError(f"{path} is a partial checkpoint: its {CONFIG_NAME} says nf4moe.save_pretrained wrote "
                         f"{section['manifest']} last, and that file is missing (the save did not finish, or the "
                         "directory was copied in part)")


def _check_unverified(path: str, qconfig: Mapping, files: list[str]) -> None:
    """A directory without a manifest (model.save_pretrained): refused if its save promised one.  ``files``
    were resolved, so the index's file list is complete and every safetensors header intact."""
    _check_manifest_promise(path, qconfig)
    for f in files:
        check_safetensors(f)


def _check_legacy(path: str, section: Mapping, files: list[str]) -> None:
    """An nf4moe directory of the older format without a manifest: refuse it if its save wrote one, else warn."""
    _check_manifest_promise(path, section)
    warnings.warn(f"{path} has no {MANIFEST_NAME} (written before nf4moe wrote manifests): only its own file list "
                  f"({len(files)} safetensors files, all present, headers intact) was checked, not the sizes and "
                  "hashes of what was saved; save it again to get a manifest", LegacyCheckpointWarning, stacklevel=3)


def from_pretrained(
    name_or_path: str | os.PathLike,
    *,
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    blocksize: int = 64,
    compress_statistics: bool = True,
    modules=None,
    backend: str = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    lora_dtype: torch.dtype | None = None,
    freeze_base: bool = True,
    model_cls=None,
    allow_non_finite: bool = False,
    **hf_kwargs,
) -> nn.Module:
    """Load a transformers MoE model with its experts in NF4 (+ LoRA), never holding all bf16 experts.

    ``name_or_path`` may be:

    - a transformers checkpoint (hub id or folder): experts are quantized as transformers assigns
      them (``lora_rank`` default 16, ``lora_alpha`` default 32);
    - an nf4moe checkpoint (written by :func:`save_pretrained` or ``model.save_pretrained``: the nf4moe
      ``quantization_config`` in config.json; or the older ``nf4moe`` section): restored bit-exactly,
      saved LoRA included (``lora_rank`` / ``lora_alpha``, if given, must match it);
    - a local folder whose expert weights are bitsandbytes NF4 (``QuantState.as_dict(packed=True)``
      entries): wrapped without re-quantizing.

    ``device`` places the model (``device_map=`` in ``hf_kwargs`` works too for the first case),
    ``dtype`` is the dtype of the non-expert weights and of the expert weights before quantization,
    ``model_cls`` a transformers model class or Auto class (default: from config / AutoModelForCausalLM).
    ``allow_non_finite=True`` quantizes (or wraps bitsandbytes statistics of) expert weights holding NaN / Inf
    instead of raising ValueError naming the weight, the experts and the counts.
    Other keyword arguments go to transformers' ``from_pretrained``.  The first case is transformers' own
    ``from_pretrained(name, quantization_config=Nf4MoeConfig(...))``; ``quantization_config=`` here is for another
    quantizer of the other layers (``BitsAndBytesConfig`` for the linears), beside which the experts are quantized
    by torch hooks (transformers takes one quantizer per load), and such a model cannot be saved whole.

    A local path is checked before transformers (or the Hub client) sees it: a missing one raises
    FileNotFoundError naming it, a directory with an ``nf4moe_manifest.json`` must match it file by
    file, and one written by :func:`save_pretrained` without its manifest is refused as partial.
    """
    from transformers import AutoConfig

    name_or_path = os.path.expanduser(os.fspath(name_or_path))
    config = hf_kwargs.pop("config", None)
    local = _check_local(name_or_path, needs_config=config is None and not hf_kwargs.get("subfolder"))
    cfg_kwargs = {k: hf_kwargs[k] for k in _CONFIG_KWARGS if k in hf_kwargs}
    config = config or AutoConfig.from_pretrained(name_or_path, **cfg_kwargs)
    if _quant_method(config) == QUANT_METHOD:
        if modules is not None:
            raise ValueError("modules= selects experts to quantize; an nf4moe checkpoint restores the modules it saved")
        if local == "unverified":  # model.save_pretrained writes no manifest: the file list and headers are checked
            qc = config.quantization_config
            promise = qc.get("manifest") if isinstance(qc, Mapping) else qc.saved_manifest
            _check_unverified(name_or_path, {"manifest": promise}, _resolve_files(name_or_path, hf_kwargs))
        return _load_quantized(name_or_path, config, device=device, backend=backend, lora_rank=lora_rank,
                               lora_alpha=lora_alpha, freeze_base=freeze_base, model_cls=model_cls, hf_kwargs=hf_kwargs)
    if getattr(config, SECTION, None):
        if modules is not None:
            raise ValueError("modules= selects experts to quantize; an nf4moe checkpoint restores the modules it saved")
        files = _resolve_files(name_or_path, hf_kwargs)
        if local == "unverified":
            _check_legacy(name_or_path, getattr(config, SECTION), files)
        return _load_nf4moe(files, config, device=device, backend=backend, lora_rank=lora_rank, lora_alpha=lora_alpha,
                            freeze_base=freeze_base, model_cls=model_cls)
    rank = 16 if lora_rank is None else lora_rank
    alpha = 32 if lora_alpha is None else lora_alpha
    local_files = _checkpoint_files(name_or_path) if local else []
    if local_files:
        keys = _keys(local_files)
        if has_bnb_experts(keys):
            return _load_bnb_checkpoint(local_files, config, device=device, backend=backend, lora_rank=rank,
                                        lora_alpha=alpha, lora_dtype=lora_dtype, modules=modules,
                                        freeze_base=freeze_base, model_cls=model_cls,
                                        allow_non_finite=allow_non_finite)
        if any(".gate_up_nf4." in k for k in keys):
            raise ValueError(f"{name_or_path} holds nf4moe NF4 tensors but its config.json has neither the nf4moe "
                             f"quantization_config nor an '{SECTION}' section, which say how to rebuild the modules "
                             "(was config.json replaced, or written by a model.save_pretrained before nf4moe "
                             "attached its quantizer?)")
    model, _ = _load_quantizing(name_or_path, config, device=device, dtype=dtype, backend=backend, lora_rank=rank,
                                lora_alpha=alpha, lora_dtype=lora_dtype, blocksize=blocksize,
                                compress_statistics=compress_statistics, modules=modules, freeze_base=freeze_base,
                                model_cls=model_cls, hf_kwargs=hf_kwargs, allow_non_finite=allow_non_finite)
    return model
