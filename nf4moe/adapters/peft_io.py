"""PEFT interop: the LoRA of QuantGroupedExperts as a PEFT ``target_parameters`` adapter, both ways.

PEFT (>= 0.19.1, the layout of PEFT 0.21) wraps a 3-D expert parameter in ``lora.ParamWrapper``;
for a module that stores (E, out, in) (``is_transposed`` False) it swaps in/out so that

    lora_A.weight: (r*E, in)   rows e*r .. e*r+r-1 are A[e]                (A[e] = rows of expert e)
    lora_B.weight: (out, r*E)  column j*E + e is B[e][:, j]                (rank-major, expert-minor)
    delta[e] = scaling * B[e] @ A[e]       (E, out, in), added to the parameter

which is exactly our (E, r, in) / (E, out, r) factors, reshaped.  Earlier PEFT releases ("legacy",
PEFT <= 0.19.0) read every 3-D parameter positionally as (E, in, out): for a (E, out, in) weight
their lora_A is (r*E, out) and lora_B (in, r*E), i.e. A and B swapped and transposed.  For modules
stored transposed, (E, in, out), both readings agree.  Several parameters of one module nest their
wrappers (``experts.lora_A`` outermost, ``experts.base_layer.lora_A`` next, ...): the nesting order
is asked of the installed PEFT when writing, and solved from the shapes when reading.

The layout of a file is detected from the tensor shapes of all modules together; when no shape can
tell (every targeted projection square: 2I == H for gate_up_proj alone, I == H for down_proj alone)
``layout=`` must be given.  Nothing is guessed.

Writing is atomic (``atomic.py``): the adapter directory is swapped in whole, with a manifest of
sizes and sha256.  Reading checks the manifest when there is one (PEFT's own adapters have none)
and, with ``strict``, that the tensors are exactly what ``adapter_config.json`` targets.
"""
from __future__ import annotations

import itertools
import math
import os
import pickle
from functools import lru_cache

import torch
from torch import nn

from ..moe_layers import QuantGroupedExperts
from .atomic import atomic_directory, check_interrupted, check_safetensors, has_manifest, read_json, verify_manifest
from .replace import deinterleave_rows, interleave_rows, origin_of, quant_experts

LAYOUTS = ("current", "legacy")
PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PROJ = ("gate_up_proj", "down_proj")
# What write_adapter owns in its directory: anything else there (a tokenizer, a README) is carried over.
_OWNED = frozenset({CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin"})


def _in_out(qe: QuantGroupedExperts, proj: str) -> tuple[int, int]:
    h, i = qe.hidden_size, qe.intermediate_size
    return (h, 2 * i) if proj == "gate_up_proj" else (i, h)


# ---------------------------------------------------------------------------------------------- export
@lru_cache(maxsize=None)
def _peft_nesting(param_order: tuple[str, ...], targets: tuple[str, ...], is_transposed: bool) -> dict[str, str]:
    """{param name: wrapper path ('' outermost, 'base_layer.' next, ...)} as the installed PEFT nests them."""
    from peft import LoraConfig, inject_adapter_in_model

    experts = nn.Module()
    for name in param_order:  # shapes do not affect nesting; tiny meta tensors keep it cheap
        experts.register_parameter(name, nn.Parameter(torch.empty(2, 4, 4, device="meta")))
    experts.is_transposed = is_transposed
    root = nn.Module()
    root.experts = experts
    cfg = LoraConfig(r=1, lora_alpha=1, target_modules=[], target_parameters=[f"experts.{t}" for t in targets])
    inject_adapter_in_model(cfg, root, low_cpu_mem_usage=True)
    out, module, path = {}, root.experts, ""
    while hasattr(module, "parameter_name") and hasattr(module, "base_layer"):
        out[module.parameter_name] = path
        module, path = module.base_layer, path + "base_layer."
    if set(out) != set(targets):
        raise RuntimeError(f"installed PEFT wrapped {sorted(out)} instead of {sorted(targets)}; cannot name adapter keys")
    return out


def _uniform(values: dict[str, float], what: str):
    distinct = set(values.values())
    if len(distinct) != 1:
        raise ValueError(f"save_adapter needs one {what} for all expert modules, got {sorted(distinct)}")
    return distinct.pop()


def adapter_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[str], int, float]:
    """(PEFT-named tensors, target_parameters, r, lora_alpha) for every QuantGroupedExperts with LoRA."""
    found = [(n, qe) for n, qe in quant_experts(model) if qe.lora_rank > 0]
    if not found:
        raise ValueError(f"{type(model).__name__} has no QuantGroupedExperts with LoRA (lora_rank > 0)")
    trained = [n for n, qe in found if qe.gate_up_bias is not None
               and (qe.gate_up_bias.requires_grad or qe.down_bias.requires_grad)]
    if trained:
        raise ValueError(f"expert biases of {trained[:3]} are trainable (train_biases=True), and a PEFT LoRA adapter "
                         "holds no base biases: they would be lost. Save the model with model.save_pretrained / "
                         "nf4moe.save_pretrained (NF4 + LoRA + biases), or merge_and_unload it")
    r = _uniform({n: qe.lora_rank for n, qe in found}, "lora_rank")
    alpha = _uniform({n: qe.lora_alpha for n, qe in found}, "lora_alpha")
    tensors, targets = {}, []
    for name, qe in found:
        origin = origin_of(qe, name)
        nesting = _peft_nesting(origin.param_order, _PROJ, origin.layout.transposed)
        e = qe.num_experts
        for proj in _PROJ:
            a, b = qe.lora_A[proj].detach(), qe.lora_B[proj].detach()
            if origin.layout.interleaved and proj == "gate_up_proj":  # B's rows in the order the class stores them
                b = interleave_rows(b)
            fan_in, fan_out = _in_out(qe, proj)
            key = f"{PREFIX}{name}.{nesting[proj]}"
            tensors[key + "lora_A.weight"] = a.reshape(e * r, fan_in).contiguous()
            tensors[key + "lora_B.weight"] = b.permute(1, 2, 0).reshape(fan_out, r * e).contiguous()
            targets.append(f"{name}.{proj}")
    return tensors, targets, r, alpha


def save_adapter(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Write the experts' LoRA as a PEFT adapter (``target_parameters``) for the bf16 base model.

    ``peft.PeftModel.from_pretrained(base_model, save_directory)`` loads it onto the original
    (unquantized) transformers model; :func:`load_adapter` reads it back.
    """
    tensors, targets, r, alpha = adapter_state_dict(model)
    write_adapter(model, save_directory, tensors, targets, r, alpha)


def write_adapter(
    model: nn.Module,
    save_directory: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    target_parameters: list[str],
    r: int,
    alpha: float,
    *,
    target_modules: list[str] = (),
    lora_dropout: float = 0.0,
) -> None:
    """Write one PEFT adapter directory (weights + ``adapter_config.json``) in a single, atomic pass.

    ``tensors`` hold the experts' factors (``adapter_state_dict``) and, for a combined adapter, the
    PEFT-named factors of ``target_modules`` linear layers sharing the same r and alpha.  A failure
    or kill leaves ``save_directory`` as it was or whole with the new adapter.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    cfg = LoraConfig(
        r=r,
        lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
        lora_dropout=lora_dropout,
        bias="none",
        target_modules=list(target_modules),
        target_parameters=target_parameters,
        base_model_name_or_path=getattr(config, "_name_or_path", None) or None,
    )
    with atomic_directory(save_directory, _OWNED.__contains__, "save_adapter") as tmp:
        save_file({k: v.cpu() for k, v in tensors.items()}, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
        cfg.save_pretrained(tmp)


# ---------------------------------------------------------------------------------------------- import
def _convert(layout: str, transposed: bool, a_w: torch.Tensor, b_w: torch.Tensor, e: int, r: int, fan_in: int,
             fan_out: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """PEFT (lora_A.weight, lora_B.weight) -> our (A (E, r, in), B (E, out, r)), or None if shapes don't fit."""
    if layout == "current" or transposed:
        if tuple(a_w.shape) != (r * e, fan_in) or tuple(b_w.shape) != (fan_out, r * e):
            return None
        return a_w.reshape(e, r, fan_in), b_w.reshape(fan_out, r, e).permute(2, 0, 1)
    # legacy on an (E, out, in) weight: lora_A reads out, lora_B writes in; delta[e] = A_w[e].T @ B_w[:, :, e].T
    if tuple(a_w.shape) != (r * e, fan_out) or tuple(b_w.shape) != (fan_in, r * e):
        return None
    a_leg = a_w.reshape(e, r, fan_out)
    b_leg = b_w.reshape(fan_in, r, e)
    return b_leg.permute(2, 1, 0), a_leg.transpose(1, 2)


def _read_adapter(directory: str) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    if not os.path.isdir(directory):
        check_interrupted(directory)
        raise FileNotFoundError(f"load_adapter: adapter_dir {directory!r} is not a directory")
    if has_manifest(directory):
        verify_manifest(directory)
    config_path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"load_adapter: no {CONFIG_NAME} in {directory}")
    config = read_json(config_path)
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        check_safetensors(path)
        return config, load_file(path)
    legacy_bin = os.path.join(directory, "adapter_model.bin")
    if os.path.isfile(legacy_bin):
        try:
            return config, torch.load(legacy_bin, map_location="cpu", weights_only=True)
        except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
            raise ValueError(f"{legacy_bin}: truncated or corrupt torch file ({e})") from None
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or adapter_model.bin) in {directory}")


def _group(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, dict[str, dict[str, torch.Tensor]]], list[str]]:
    """{module name: {wrapper path: {'A': .., 'B': ..}}} and keys that are not ParamWrapper LoRA weights."""
    import re

    groups: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    other = []
    pattern = re.compile(r"^(?:base_model\.model\.)?(.+?)\.((?:base_layer\.)*)lora_([AB])(?:\.default)?\.weight$")
    for key, t in tensors.items():
        m = pattern.match(key)
        if not m:
            other.append(key)
            continue
        groups.setdefault(m.group(1), {}).setdefault(m.group(2), {})[m.group(3)] = t
    return groups, other


def _selects(target: str, key: str) -> bool:
    """PEFT's target_parameters rule: the parameter's qualified name equals the target or ends in '.' + target."""
    return key == target or key.endswith("." + target)


def _targeted(name: str, targets: list[str]) -> list[str]:
    """Projections of the expert module ``name`` that ``target_parameters`` select."""
    return [p for p in _PROJ if any(_selects(t, f"{name}.{p}") for t in targets)]


def _check_coverage(experts: dict[str, QuantGroupedExperts], groups: dict[str, dict], targets: list[str],
                    adapter_dir: str) -> None:
    """strict load: the adapter's tensors are exactly one LoRA pair per projection its config targets."""
    problems = [f"target_parameters entry {t!r} matches no parameter of the model's QuantGroupedExperts"
                for t in targets if not any(_selects(t, f"{n}.{p}") for n in experts for p in _PROJ)]
    for name in experts:
        want, have = _targeted(name, targets), groups.get(name, {})
        keys = [f"{name}.{w}lora_A/B" for w in have]
        if want and not have:
            problems.append(f"'{name}': {want} targeted, no tensors in the file (missing)")
        elif have and not want:
            problems.append(f"'{name}': tensors {keys} in the file, none of its parameters targeted (extra)")
        elif len(have) != len(want):
            problems.append(f"'{name}': {want} targeted, {len(have)} LoRA pair(s) in the file: {keys} "
                            + ("(missing)" if len(have) < len(want) else "(extra)"))
    if problems:
        raise ValueError(f"adapter {adapter_dir}: {CONFIG_NAME} and {WEIGHTS_NAME} disagree: "
                         + "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
                         + " (pass strict=False to load what fits; projections without tensors get a zero delta)")


def _shape_mismatch(experts, groups, candidates, r: int, layout: str | None, adapter_dir: str) -> str:
    """The error for adapter tensors that fit no layout: each module that fits none, its shapes and the expected."""
    lays = LAYOUTS if layout is None else (layout,)
    bad = [n for n in candidates if not any(candidates[n][lay] for lay in lays)] or list(candidates)
    lines = []
    for name in bad[:4]:
        qe = experts[name]
        got = {f"{w}lora_A/B": (tuple(ab["A"].shape), tuple(ab["B"].shape)) for w, ab in groups[name].items()}
        want = {p: ((r * qe.num_experts, _in_out(qe, p)[0]), (_in_out(qe, p)[1], r * qe.num_experts)) for p in _PROJ}
        lines.append(f"'{name}': {got}; expected (current layout) {want}")
    return (f"adapter {adapter_dir}: tensor shapes fit no {'layout' if layout is None else repr(layout) + ' layout'} "
            f"for r={r} (adapter_config.json): " + "; ".join(lines)
            + (f"; and {len(bad) - 4} more modules" if len(bad) > 4 else ""))


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, *, layout: str | None = None,
                 strict: bool = True, skip_other_lora: bool = False) -> str:
    """Load a PEFT LoRA adapter on 3-D expert parameters into the model's QuantGroupedExperts.

    Reads ``adapter_config.json`` (r, lora_alpha, use_rslora, target_parameters) and the adapter
    weights.  ``layout``: None (detect from shapes), ``"current"`` (PEFT >= 0.19.1) or ``"legacy"``
    (PEFT <= 0.19.0, A and B swapped and transposed).  Modules and projections the adapter does
    not cover get a zero delta.  ``strict`` (default): raise, naming them, on adapter tensors that
    are not expert LoRA (e.g. LoRA on attention) and on any disagreement between
    ``target_parameters`` and the tensors (a targeted projection without tensors, tensors for one
    not targeted, a target matching no QuantGroupedExperts); ``strict=False`` ignores all of
    these and loads what fits.  Wrongly shaped tensors are refused either way.  ``skip_other_lora``: tensors of
    LoRA on other modules (attention, dense layers) are left to the caller, who loads them, while the expert
    tensors are still checked as ``strict`` says (nf4moe.finetune.load_lora).  Returns the layout used.
    """
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"layout must be None or one of {LAYOUTS}, got {layout!r}")
    config, tensors = _read_adapter(os.fspath(adapter_dir))
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{adapter_dir} is a {config.get('peft_type')} adapter, not LoRA")
    for field in ("rank_pattern", "alpha_pattern"):
        if config.get(field):
            raise NotImplementedError(f"adapter_config.{field} is set; per-module ranks are not supported")
    for field, ok in (("use_dora", False), ("lora_bias", False)):
        if config.get(field, ok) != ok:
            raise NotImplementedError(f"adapter_config.{field}={config.get(field)!r} is not supported by QuantGroupedExperts")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    targets = config.get("target_parameters") or []
    target_projs = {t.rpartition(".")[2] for t in targets}
    unsupported = target_projs - set(_PROJ)
    if unsupported:
        raise NotImplementedError(f"adapter targets parameters {sorted(unsupported)}; QuantGroupedExperts has "
                                  f"LoRA on {list(_PROJ)} only")
    groups, other = _group(tensors)
    experts = dict(quant_experts(model))
    foreign = sorted(other) + sorted(f"{m}.*" for m in groups if m not in experts)
    if foreign and strict and not skip_other_lora:
        raise ValueError(f"adapter holds tensors that are not LoRA on QuantGroupedExperts: {foreign[:6]}"
                         f"{'...' if len(foreign) > 6 else ''} (pass strict=False to ignore them)")
    if strict:
        _check_coverage(experts, groups, targets, os.fspath(adapter_dir))
    groups = {m: g for m, g in groups.items() if m in experts}
    if not groups:
        raise ValueError(f"adapter {adapter_dir} has no LoRA for any QuantGroupedExperts of {type(model).__name__}")

    # Per module and layout: the assignments of wrappers to projections that fit every shape.
    candidates: dict[str, dict[str, list[dict[str, tuple[torch.Tensor, torch.Tensor]]]]] = {}
    for name, wrappers in groups.items():
        qe = experts[name]
        transposed = origin_of(qe, name).layout.transposed
        projs = [p for p in _PROJ if p in target_projs] or list(_PROJ)
        for w, ab in wrappers.items():
            if set(ab) != {"A", "B"}:
                raise ValueError(f"adapter has lora_{set('AB') - set(ab)} missing for '{name}.{w}'")
        per_layout = {}
        for lay in (LAYOUTS if layout is None else (layout,)):
            fits = []
            for perm in itertools.permutations(projs, len(wrappers)):
                conv = {}
                for (w, ab), proj in zip(wrappers.items(), perm):
                    c = _convert(lay, transposed, ab["A"], ab["B"], qe.num_experts, r, *_in_out(qe, proj))
                    if c is None:
                        break
                    conv[proj] = c
                else:
                    fits.append(conv)
            per_layout[lay] = fits
        candidates[name] = per_layout
    possible = [lay for lay in (LAYOUTS if layout is None else (layout,))
                if all(candidates[n][lay] for n in candidates)]
    if not possible:
        raise ValueError(_shape_mismatch(experts, groups, candidates, r, layout, os.fspath(adapter_dir)))

    def same(x, y) -> bool:
        return x.keys() == y.keys() and all(all(torch.equal(p, q) for p, q in zip(x[k], y[k])) for k in x)

    for name in candidates:
        for lay in possible:
            if len(candidates[name][lay]) > 1 and not all(same(candidates[name][lay][0], c)
                                                          for c in candidates[name][lay][1:]):
                raise ValueError(f"'{name}': several projections fit the adapter tensors' shapes; cannot tell them apart")
    if len(possible) > 1:
        differ = any(not same(candidates[n][possible[0]][0], candidates[n][possible[1]][0]) for n in candidates)
        if differ:
            raise ValueError(
                "adapter layout is ambiguous: every targeted projection is square (2I == H for gate_up_proj, "
                "I == H for down_proj), so the current PEFT layout and the legacy one (PEFT <= 0.19.0, A and B "
                "swapped) fit the same shapes; pass layout='current' or layout='legacy'")
    chosen = possible[0]

    with torch.no_grad():
        for name, qe in experts.items():
            conv = candidates[name][chosen][0] if name in candidates else {}
            dtype = next(iter(qe.lora_A.values())).dtype if qe.lora_rank else qe.gate_up_nf4.dtype
            requires_grad = next(iter(qe.lora_A.values())).requires_grad if qe.lora_rank else True
            # alpha such that our scaling alpha / r equals the adapter's (rsLoRA included)
            qe.add_lora(r, scaling * r, dtype=dtype)
            interleaved = origin_of(qe, name).layout.interleaved
            for proj in _PROJ:
                if proj in conv:
                    a, b = conv[proj]
                    if interleaved and proj == "gate_up_proj":  # [g0, u0, ...] rows -> [gate; up]
                        b = deinterleave_rows(b)
                    qe.lora_A[proj].copy_(a)
                    qe.lora_B[proj].copy_(b)
                else:
                    qe.lora_B[proj].zero_()
            for p in list(qe.lora_A.values()) + list(qe.lora_B.values()):
                p.requires_grad_(requires_grad)
    return chosen
