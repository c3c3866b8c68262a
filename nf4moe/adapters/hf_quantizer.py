"""The nf4moe quantizer of transformers: ``from_pretrained`` / ``save_pretrained`` of NF4 experts through transformers itself.

Registered with transformers' ``register_quantization_config`` / ``register_quantizer`` under the
method name ``"nf4moe"`` (``nf4moe/__init__.py`` arranges it as soon as transformers' quantizer
registry is imported, so ``import nf4moe`` is enough).  Three paths:

- **Quantize at load**: ``AutoModelForCausalLM.from_pretrained(name, quantization_config=Nf4MoeConfig(...))``.
  transformers runs the model's own key renames and per-expert merges; for a selected expert weight
  (``<module>.gate_up_proj`` / ``.down_proj``) it then hands the merged tensor to
  :class:`QuantizeExperts`, which quantizes it with bitsandbytes and returns a meta placeholder, so
  the dense experts are never all resident (on-the-fly quantization loads synchronously, one weight
  in flight).  After loading, each module becomes a QuantGroupedExperts.
- **Pre-quantized load**: a ``config.json`` whose ``quantization_config`` has ``quant_method: "nf4moe"``.
  Before any tensor is read the skeleton's expert modules become empty QuantGroupedExperts as the
  config's module table describes; the tensors then load by name, and after loading every tensor the
  table promises must have come from the checkpoint with its shape and dtype.  Bit-exact.
- **Save**: ``model.save_pretrained`` of a model holding QuantGroupedExperts (from any of the paths
  above or ``replace_experts``, which attaches this quantizer) writes their NF4 buffers and LoRA
  under the module's own names and the module table into ``config.json``.

No silent loss without nf4moe: a QuantGroupedExperts holds, under the dense weight names
(``gate_up_proj`` / ``down_proj``), 24-byte marker buffers of shape (2, 4, 3) (``moe_layers/experts.py``),
so every save carries them.  A transformers that does not know ``"nf4moe"`` skips the quantization
config with a warning, builds the dense experts class, meets a checkpoint tensor whose shape differs
from its weights and raises (``ignore_mismatched_sizes=True`` is the explicit way to accept random
experts).  With nf4moe the markers load into the markers.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Mapping

import torch
from torch import nn
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .. import __version__
from ..moe_layers import NF4Weight, QuantGroupedExperts
from ..moe_layers.nf4_weight import _BNB_BLOCKSIZES
from ..reference import Gate
from .replace import _set_submodule, build_quant_experts, check_blocksize, quant_experts, quantize_weight, set_trainable
from .table import WEIGHT_NAMES, ExpertsSpec, find_experts, inspect_experts

QUANT_METHOD = "nf4moe"
FORMAT_VERSION = 1
# Arguments that say how to load and run, not what was saved: not written into config.json.
_RUNTIME = ("backend", "freeze_base", "allow_non_finite", "modules", "train_biases")
# What a module-table entry holds (written by ``module_entry``).
_ENTRY_KEYS = frozenset({"experts_class", "layout", "act", "num_experts", "hidden_size", "intermediate_size",
                         "blocksize", "blocksize2", "compress_statistics", "quant_dtype", "lora_rank", "lora_alpha",
                         "lora_dtype"})


def dtype_name(dtype: torch.dtype | None) -> str | None:
    return None if dtype is None else str(dtype).removeprefix("torch.")


def parse_dtype(name, what: str) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"{what}: unknown dtype {name!r}")
    return dt


def module_entry(name: str, qe: QuantGroupedExperts) -> dict:
    """One module-table entry: what a skeleton needs to hold this module's saved tensors."""
    from .replace import origin_of

    origin = origin_of(qe, name)
    gu, dn = qe.gate_up_nf4, qe.down_nf4
    if gu.dtype != dn.dtype:
        raise ValueError(f"'{name}': gate_up and down were quantized from different dtypes ({gu.dtype}, {dn.dtype})")
    lora_dtype = next(iter(qe.lora_A.values())).dtype if qe.lora_rank else None
    return {
        "experts_class": type(origin.shell).__name__,
        "layout": origin.layout.name,
        "act": qe.act,
        "num_experts": qe.num_experts,
        "hidden_size": qe.hidden_size,
        "intermediate_size": qe.intermediate_size,
        "blocksize": gu.blocksize,
        "blocksize2": gu.blocksize2,
        "compress_statistics": gu.compress_statistics,
        "quant_dtype": dtype_name(gu.dtype),
        "lora_rank": qe.lora_rank,
        "lora_alpha": qe.lora_alpha,
        "lora_dtype": dtype_name(lora_dtype),
        "gate": qe.gate.to_dict() if qe.gate is not None else None,
        "bias_dtype": dtype_name(qe.gate_up_bias.dtype) if qe.gate_up_bias is not None else None,
    }


def resolve_name(model: nn.Module, name: str, where: str) -> str:
    """A module-table name in ``model``: as written, or across transformers' base-model prefix (a table written
    for ``model.model`` read into the ``...ForCausalLM`` around it, or the other way round)."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    for cand in (name, f"{prefix}.{name}" if prefix else None, name.removeprefix(f"{prefix}.") if prefix else None):
        if cand is None:
            continue
        try:
            model.get_submodule(cand)
        except AttributeError:
            continue
        return cand
    raise ValueError(f"{where}: the module table names '{name}', which {type(model).__name__} does not have")


def empty_experts(model: nn.Module, name: str, entry: Mapping, *, backend: str, where: str,
                  float_dtype: torch.dtype | None = None) -> QuantGroupedExperts:
    """Swap the expert module at ``name`` of a skeleton for a QuantGroupedExperts on meta, as ``entry`` describes.
    ``float_dtype``: the dtype of the LoRA factors and biases (default: as saved, so the load is bit-exact)."""
    missing = sorted(_ENTRY_KEYS - set(entry))
    if missing:
        raise ValueError(f"{where}: the module table entry for '{name}' lacks {missing}")
    module = model.get_submodule(name)
    spec = inspect_experts(module, name)
    if spec.class_name != entry["experts_class"] or spec.layout.name != entry["layout"]:
        raise ValueError(f"{where}: '{name}' is {spec.class_name} ({spec.layout.name}) in the model but "
                         f"{entry['experts_class']} ({entry['layout']}) in the checkpoint")
    dims = (spec.num_experts, spec.hidden_size, spec.intermediate_size)
    saved = (entry["num_experts"], entry["hidden_size"], entry["intermediate_size"])
    if dims != saved:
        raise ValueError(f"{where}: '{name}': model dims (E, H, I) = {dims} differ from the checkpoint's {saved}")
    kw = dict(blocksize=entry["blocksize"], compress_statistics=entry["compress_statistics"],
              dtype=parse_dtype(entry["quant_dtype"], f"{where}: '{name}' quant_dtype"), device="meta",
              blocksize2=entry["blocksize2"])
    e, h, i = saved
    gu, dn = NF4Weight(e, 2 * i, h, **kw), NF4Weight(e, h, i, **kw)
    gate = entry.get("gate")  # absent in tables written before gates were data
    try:
        gate = Gate(**gate) if gate is not None else None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: '{name}': the module table's gate {entry['gate']!r} is not a valid Gate: {err}") from None
    if gate != spec.gate:
        raise ValueError(f"{where}: '{name}': the checkpoint's gate {gate} is not the one {spec.class_name} computes "
                         f"({spec.gate})")
    bias_dtype = parse_dtype(entry.get("bias_dtype"), f"{where}: '{name}' bias_dtype")
    if bias_dtype is not None and float_dtype is not None:
        bias_dtype = float_dtype
    if (bias_dtype is not None) != spec.has_bias:
        raise ValueError(f"{where}: '{name}': the checkpoint {'has' if bias_dtype else 'has no'} expert biases, "
                         f"{spec.class_name} {'has' if spec.has_bias else 'has none'}")
    spec = ExpertsSpec(**{**spec.__dict__, "act": entry["act"], "gate": gate})
    qe = build_quant_experts(spec, gu, dn, module, lora_rank=entry["lora_rank"], lora_alpha=entry["lora_alpha"],
                             backend=backend, lora_dtype=float_dtype or parse_dtype(entry["lora_dtype"],
                                                                                  f"{where}: '{name}' lora_dtype"))
    if spec.has_bias:  # the skeleton's biases are in the model's dtype; the checkpoint's are in bias_dtype
        qe.gate_up_bias = nn.Parameter(torch.empty(e, 2 * i, dtype=bias_dtype, device="meta"), requires_grad=False)
        qe.down_bias = nn.Parameter(torch.empty(e, h, dtype=bias_dtype, device="meta"), requires_grad=False)
    _set_submodule(model, name, qe)
    return qe


class Nf4MoeConfig(QuantizationConfigMixin):
    """quantization_config of nf4moe: NF4 experts (bitsandbytes blocks) with LoRA, for transformers' from_pretrained.

    Quantize-at-load arguments (as :func:`nf4moe.replace_experts`): ``lora_rank`` (0: no LoRA),
    ``lora_alpha`` (scale alpha / rank), ``blocksize``, ``compress_statistics`` (double quantization),
    ``lora_dtype`` (default: the weights' dtype), ``modules`` (a glob / regex string, a list of them or a
    callable ``(name, module) -> bool``, selecting expert modules by qualified name).  Run-time arguments, never saved: ``backend``,
    ``freeze_base`` (requires_grad only on the LoRA factors), ``train_biases`` (and on the per-expert biases of
    classes that have them), ``allow_non_finite``.
    ``quantized_modules`` is the module table a saved checkpoint carries (set by nf4moe; leave it None).
    """

    def __init__(self, lora_rank: int = 16, lora_alpha: float | None = 32, blocksize: int = 64,
                 compress_statistics: bool = True, lora_dtype: str | torch.dtype | None = None,
                 modules: str | list[str] | None = None, backend: str = "auto", freeze_base: bool = True,
                 allow_non_finite: bool = False, train_biases: bool = False,
                 quantized_modules: Mapping[str, Mapping] | None = None,
                 format_version: int = FORMAT_VERSION, nf4moe_version: str | None = None, quant_method: str = QUANT_METHOD,
                 manifest: str | None = None, **unknown):
        if unknown:
            raise TypeError(f"Nf4MoeConfig: unknown arguments {sorted(unknown)}")
        if quant_method != QUANT_METHOD:
            raise ValueError(f"Nf4MoeConfig: quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
            raise ValueError(f"Nf4MoeConfig: lora_rank must be an int >= 0, got {lora_rank!r}")
        if blocksize not in _BNB_BLOCKSIZES:
            raise ValueError(f"Nf4MoeConfig: blocksize must be one of {_BNB_BLOCKSIZES} (bitsandbytes), got {blocksize!r}")
        if modules is not None and not isinstance(modules, str) and not callable(modules) and not (
                isinstance(modules, (list, tuple)) and all(isinstance(m, str) for m in modules)):
            raise TypeError(f"Nf4MoeConfig: modules must be a glob / regex string, a list of them or a callable "
                            f"(name, module) -> bool, got {type(modules).__name__}")
        if format_version != FORMAT_VERSION:
            raise ValueError(f"Nf4MoeConfig: format_version {format_version!r} is not {FORMAT_VERSION} (this nf4moe "
                             f"is {__version__}; the checkpoint was written by nf4moe {nf4moe_version})")
        self.quant_method = QUANT_METHOD
        self.lora_rank = lora_rank
        self.lora_alpha = lora_alpha
        self.blocksize = blocksize
        self.compress_statistics = bool(compress_statistics)
        self.lora_dtype = dtype_name(parse_dtype(lora_dtype, "Nf4MoeConfig: lora_dtype"))
        self.modules = list(modules) if isinstance(modules, (list, tuple)) else modules
        self.backend = backend
        self.freeze_base = bool(freeze_base)
        self.allow_non_finite = bool(allow_non_finite)
        self.train_biases = bool(train_biases)
        self.quantized_modules = {k: dict(v) for k, v in quantized_modules.items()} if quantized_modules else None
        self.format_version = FORMAT_VERSION
        self.nf4moe_version = nf4moe_version or __version__
        # The manifest a directory's config.json says was written last: read back from a checkpoint (loaders
        # refuse such a directory without it), written only by nf4moe.save_pretrained (see ``writing_manifest``).
        self._manifest_saved = manifest
        self._manifest_next: str | None = None

    @property
    def saved_manifest(self) -> str | None:
        """The manifest the checkpoint this config was read from says its save wrote last (None: no promise)."""
        return self._manifest_saved

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in super().to_dict().items() if k not in _RUNTIME and not k.startswith("_")}
        out["nf4moe_version"] = __version__
        if self._manifest_next:
            out["manifest"] = self._manifest_next
        return out

    @contextmanager
    def writing_manifest(self, name: str):
        """While a save that writes the manifest ``name`` last runs, config.json says so."""
        self._manifest_next = name
        try:
            yield
        finally:
            self._manifest_next = None

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def get(self, key: str, default=None):
        """Dict access: transformers' quantizer lookup reads ``config.quantization_config`` as the dict of a
        config.json, and a loaded model's config holds this object (``from_pretrained(config=model.config)``)."""
        return self.to_dict().get(key, default)


class QuantizeExperts:
    """The conversion op transformers applies to each selected dense expert weight when quantizing at load.

    Receives ``{"<module>.gate_up_proj": tensor}`` after the model's own renames and merges, quantizes
    it with bitsandbytes into an NF4Weight kept on the quantizer, and returns a meta placeholder so the
    module never holds the dense tensor.
    """

    def __init__(self, quantizer: "Nf4MoeQuantizer"):
        self.quantizer = quantizer

    def convert(self, input_dict: dict, model=None, **kwargs) -> dict:
        out = {}
        for key, value in input_dict.items():
            if isinstance(value, (list, tuple)):
                if len(value) != 1:
                    raise ValueError(f"nf4moe: {len(value)} tensors arrived for {key}, expected the one merged weight")
                value = value[0]
            out[key] = self.quantizer.quantize_arrival(key, value)
        return out


def _expert_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """{qualified name: tensor} of every QuantGroupedExperts' state (the tensors themselves, flags included)."""
    return {f"{n}.{k}" if n else k: t for n, qe in quant_experts(model) for k, t in qe.state_dict(keep_vars=True).items()}


def _expected(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """{name: (shape, dtype)} of every tensor of the (empty) QuantGroupedExperts of a skeleton."""
    return {k: (tuple(t.shape), t.dtype) for k, t in _expert_tensors(model).items()}


def _check_loaded(model: nn.Module, expected: Mapping[str, tuple], where: str) -> None:
    """Every tensor the module table promised came from the checkpoint (transformers flags what it assigned;
    a missing one it would have initialised randomly), with the shape and dtype the table gives."""
    got = _expert_tensors(model)
    problems = []
    for key, (shape, dtype) in expected.items():
        t = got.get(key)
        if t is None or t.device.type == "meta" or not getattr(t, "_is_hf_initialized", False):
            problems.append(f"'{key}' is missing")
        elif (tuple(t.shape), t.dtype) != (shape, dtype):
            problems.append(f"'{key}' is {tuple(t.shape)} {t.dtype} in the checkpoint, the module table gives "
                            f"{shape} {dtype}")
    if problems:
        more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        raise ValueError(f"{where}: the checkpoint does not hold the NF4 experts its quantization_config describes "
                         "(a partial or edited checkpoint?): " + "; ".join(problems[:6]) + more)


class Nf4MoeQuantizer(HfQuantizer):
    """transformers' HfQuantizer for nf4moe (see the module docstring for the three paths)."""

    requires_calibration = False
    requires_parameters_quantization = True

    def __init__(self, quantization_config: Nf4MoeConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.specs: dict[str, ExpertsSpec] = {}
        self.done: dict[str, dict[str, NF4Weight]] = {}  # quantized during loading, not yet in their module
        self.quantized: list[str] = []  # the modules quantized at load
        self.expected: dict[str, tuple] = {}  # pre-quantized: the tensors the module table promises
        self.failed: ValueError | None = None  # the first weight that could not be quantized
        self.max_inflight_bytes = 0

    # ----------------------------------------------------------------- environment
    def validate_environment(self, *args, device_map=None, **kwargs):
        if not isinstance(self.quantization_config, Nf4MoeConfig):
            raise TypeError(f"nf4moe quantizer needs an Nf4MoeConfig, got {type(self.quantization_config).__name__}")
        if isinstance(device_map, Mapping) and "disk" in set(device_map.values()):
            raise ValueError("nf4moe: device_map with 'disk' offload is not supported (NF4 experts stay resident)")
        if not self.pre_quantized:
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                raise ImportError("nf4moe quantizes at load with bitsandbytes: pip install bitsandbytes")

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, _, leaf = param_name.rpartition(".")
        return not self.pre_quantized and leaf in WEIGHT_NAMES and module in self.specs

    def param_element_size(self, model, param_name: str, param: torch.Tensor) -> float:
        if self.param_needs_quantization(model, param_name):
            return 0.5 + 1 / self.quantization_config.blocksize
        return param.element_size()

    def get_quantize_ops(self):
        return QuantizeExperts(self)

    # ----------------------------------------------------------------- loading
    def _process_model_before_weight_loading(self, model, dtype=None, **kwargs):
        cfg = self.quantization_config
        where = f"nf4moe from_pretrained of {type(model).__name__}"
        _declare_fp32(model)
        if self.pre_quantized:
            table = cfg.quantized_modules
            if not table:
                raise ValueError(f"{where}: the checkpoint's quantization_config (quant_method 'nf4moe') has no "
                                 "quantized_modules table; it was not written by nf4moe")
            # LoRA factors and biases keep their saved dtype (a bit-exact reload) unless from_pretrained asks for
            # a dtype other than the checkpoint's own (config.dtype), as it does for every other weight.
            saved = getattr(model.config, "dtype", None)
            saved = parse_dtype(saved, "config.dtype") if isinstance(saved, str) else saved
            float_dtype = dtype if isinstance(dtype, torch.dtype) and saved is not None and dtype != saved else None
            for name, entry in table.items():
                empty_experts(model, resolve_name(model, name, where), entry, backend=cfg.backend, where=where,
                              float_dtype=float_dtype)
            self.expected = _expected(model)
            return model
        found = find_experts(model, cfg.modules)
        if not found:
            raise ValueError(f"{where}: no expert modules" + (f" matching modules={cfg.modules!r}" if cfg.modules else "")
                             + "; nf4moe replaces classes decorated with transformers' @use_experts_implementation")
        self.specs = {n: inspect_experts(m, n) for n, m in found}
        check_blocksize(list(self.specs.values()), cfg.blocksize)
        self.done = {}
        return model

    def quantize_arrival(self, key: str, tensor: torch.Tensor) -> nn.Parameter:
        module, _, leaf = key.rpartition(".")
        spec = self.specs.get(module)
        if spec is None or leaf not in WEIGHT_NAMES:
            raise ValueError(f"nf4moe: asked to quantize {key}, which is not a selected expert weight")
        cfg = self.quantization_config
        self.max_inflight_bytes = max(self.max_inflight_bytes, tensor.numel() * tensor.element_size())
        if self.failed is None:
            try:
                self.done.setdefault(module, {})[leaf] = quantize_weight(
                    tensor, spec.layout, blocksize=cfg.blocksize, compress_statistics=cfg.compress_statistics,
                    name=key, allow_non_finite=cfg.allow_non_finite, proj=leaf)
            except ValueError as e:
                # transformers would fold it into a RuntimeError pointing at its log: keep ours (it names the weight,
                # the experts and the counts), skip the remaining weights, raise it when loading ends.
                self.failed = e
        placeholder = nn.Parameter(torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"), requires_grad=False)
        placeholder._is_hf_initialized = True
        return placeholder

    def _process_model_after_weight_loading(self, model, **kwargs):
        cfg = self.quantization_config
        where = f"nf4moe from_pretrained of {type(model).__name__}"
        if self.failed is not None:
            failed, self.failed, self.done = self.failed, None, {}
            raise failed
        if not self.pre_quantized:
            absent = [f"{n}.{w}" for n in self.specs for w in WEIGHT_NAMES if w not in self.done.get(n, {})]
            if absent:
                raise ValueError(f"{where}: {len(absent)} selected expert weights were not in the checkpoint, e.g. "
                                 f"{absent[:4]}; transformers would have initialised them randomly")
            lora_dtype = parse_dtype(cfg.lora_dtype, "Nf4MoeConfig: lora_dtype")
            self.quantized = sorted(self.specs)
            for name, spec in self.specs.items():
                got = self.done.pop(name)
                qe = build_quant_experts(spec, got["gate_up_proj"], got["down_proj"], model.get_submodule(name),
                                         lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, backend=cfg.backend,
                                         lora_dtype=lora_dtype)
                _set_submodule(model, name, qe)
        else:
            _check_loaded(model, self.expected, where)
        if cfg.freeze_base:
            set_trainable(model, biases=cfg.train_biases)
        self.refresh_table(model)
        _not_read_only(model)
        return model

    # ----------------------------------------------------------------- saving
    def refresh_table(self, model) -> dict:
        found = quant_experts(model)
        if not found:
            raise ValueError(f"{type(model).__name__} carries the nf4moe quantizer but holds no QuantGroupedExperts "
                             "(after nf4moe.merge_and_unload the quantizer is removed; was a module swapped by hand?)")
        self.quantization_config.quantized_modules = {name: module_entry(name, qe) for name, qe in found}
        return self.quantization_config.quantized_modules

    def get_state_dict_and_metadata(self, model, *args, **kwargs):
        self.refresh_table(model)
        return None, {"nf4moe_version": __version__}

    def is_serializable(self, *args, **kwargs) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        # The quantized modules carry their own trainable LoRA factors: transformers' Trainer may train them
        # without a PEFT wrapper (it otherwise refuses "purely quantized" models).
        return True

    @property
    def is_compileable(self) -> bool:
        return True


FP32_MODULES = ("gate_up_nf4", "down_nf4")


def _declare_fp32(model: nn.Module) -> None:
    """NF4 statistics are fp32 whatever the model's dtype (NF4Weight keeps them through casts): declared in
    transformers' own list of modules that stay fp32, so its dtype plan and checks agree."""
    for m in model.modules():
        if hasattr(m, "_keep_in_fp32_modules_strict") and hasattr(m, "config"):
            m._keep_in_fp32_modules_strict = set(m._keep_in_fp32_modules_strict or ()) | set(FP32_MODULES)


def _not_read_only(model: nn.Module) -> None:
    # transformers reads ``is_quantized`` to refuse ``.half()`` / ``.float()`` (the weights could not be cast
    # back) and, in Trainer, to demand PEFT adapters.  Neither applies: NF4 buffers keep their dtypes under
    # any cast (NF4Weight._apply), and the LoRA factors are the modules' own parameters.  The quantizer stays
    # attached (``hf_quantizer``), which is what save_pretrained reads.
    model.is_quantized = False


def attach(model: nn.Module, config: Nf4MoeConfig | None = None) -> Nf4MoeQuantizer | None:
    """Make ``model.save_pretrained`` write nf4moe checkpoints: attach the quantizer and its config to a model
    holding QuantGroupedExperts (idempotent).  Returns None for a model that is not a transformers model or
    carries another quantizer (bitsandbytes linears, say), which nf4moe cannot save for it."""
    import warnings

    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    current = getattr(model, "hf_quantizer", None)
    if isinstance(current, Nf4MoeQuantizer):
        current.refresh_table(model)
        return current
    if current is not None:
        warnings.warn(f"{type(model).__name__} is also quantized with {current.quantization_config.quant_method}, "
                      "and transformers saves one quantization_config: model.save_pretrained writes the NF4 experts "
                      "but a reload cannot rebuild them (it fails on the modules' marker tensors, never with random "
                      "experts); nf4moe.save_pretrained refuses the model. Save the LoRA with nf4moe.save_adapter",
                      UserWarning, stacklevel=3)
        return None
    quantizer = Nf4MoeQuantizer(config or Nf4MoeConfig(), pre_quantized=True)
    quantizer.refresh_table(model)
    model.hf_quantizer = quantizer
    model.config.quantization_config = quantizer.quantization_config
    model.quantization_method = QUANT_METHOD
    _not_read_only(model)
    _declare_fp32(model)
    return quantizer


def detach(model: nn.Module) -> None:
    """Undo :func:`attach` (merge_and_unload gives back a plain transformers model)."""
    if isinstance(getattr(model, "hf_quantizer", None), Nf4MoeQuantizer):
        model.hf_quantizer.remove_quantization_config(model)


def register() -> None:
    """Register ``"nf4moe"`` in transformers' quantization registries (idempotent)."""
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(Nf4MoeConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(Nf4MoeQuantizer)


register()
