"""The one table of expert layouts nf4moe can run, and the inspection that matches modules against it.

transformers v5 marks its expert classes with ``@use_experts_implementation``; the decorator records
the layout on every instance (``has_gate``, ``is_concatenated``, ``is_transposed``, ``has_bias``,
``has_post_expert_norm``) and the class may override ``_apply_gate``; the activation is the
instance's ``act_fn``.  Those facts, and nothing model-specific, decide whether a module can become
a :class:`~nf4moe.QuantGroupedExperts`:

- :data:`LAYOUTS` lists the flag combinations the module runs (default; transposed, which is
  transposed once before quantizing).
- :data:`UNSUPPORTED_FLAGS` says, for each flag value outside those layouts, why it cannot run.
- :data:`ACTIVATIONS` maps ``act_fn`` (an ACT2FN class, a torch module or function) to the
  activation strings of ``nf4moe.reference``.

:func:`inspect_experts` applies the table to a live module (raising a clear error naming the class
and the flag); :func:`supported_models` applies the same verdict to every decorated class in the
installed transformers, read from source without importing the models (for the README).
"""
from __future__ import annotations

import ast
import fnmatch
import inspect
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..reference import ACTIVATIONS, Gate, activation, apply_gate

FLAGS = ("has_gate", "is_concatenated", "is_transposed", "has_bias", "has_post_expert_norm")
DEFAULT_FLAGS: Mapping[str, bool] = {
    "has_gate": True,
    "is_concatenated": True,
    "is_transposed": False,
    "has_bias": False,
    "has_post_expert_norm": False,
}
# Parameters a supported expert module holds, in (E, out, in) order unless the layout is transposed.
WEIGHT_NAMES = ("gate_up_proj", "down_proj")
# Parameter names that mark a module as holding stacked expert weights even without the decorator.
_EXPERT_LIKE_PARAMS = frozenset({"gate_up_proj", "down_proj", "up_proj", "gate_proj"})


@dataclass(frozen=True)
class Layout:
    """One supported flag combination.  ``transposed``: weights are stored (E, in, out)."""

    name: str
    flags: Mapping[str, bool]
    transposed: bool
    note: str
    interleaved: bool = False  # gate_up rows [g0, u0, g1, u1, ...]: put in [gate; up] order before quantizing

    def matches(self, flags: Mapping[str, bool]) -> bool:
        # Biases are carried by any layout (QuantGroupedExperts.gate_up_bias / down_bias).
        return all(bool(flags[f]) == self.flags[f] for f in FLAGS if f != "has_bias")


LAYOUTS: tuple[Layout, ...] = (
    Layout("default", dict(DEFAULT_FLAGS), transposed=False,
           note="gate_up_proj (E, 2I, H) = [gate; up], down_proj (E, H, I); quantized as stored"),
    Layout("transposed", {**DEFAULT_FLAGS, "is_transposed": True}, transposed=True,
           note="gate_up_proj (E, H, 2I), down_proj (E, I, H); transposed once, chunk by chunk, before quantizing"),
    Layout("interleaved", {**DEFAULT_FLAGS, "is_concatenated": False}, transposed=False, interleaved=True,
           note="gate_up_proj (E, 2I, H) rows [g0, u0, g1, u1, ...]: rows put in [gate; up] order, chunk by chunk, "
                "before quantizing (NF4 blocks run along H, so each row's bytes are those of the row); "
                "re-interleaved on merge"),
    Layout("interleaved_transposed", {**DEFAULT_FLAGS, "is_concatenated": False, "is_transposed": True},
           transposed=True, interleaved=True,
           note="gate_up_proj (E, H, 2I) columns [g0, u0, ...] (gpt-oss), down_proj (E, I, H): transposed and put in "
                "[gate; up] order before quantizing"),
)
LAYOUTS_BY_NAME = {layout.name: layout for layout in LAYOUTS}

# (flag, value) outside every layout -> why QuantGroupedExperts cannot run it.
UNSUPPORTED_FLAGS: Mapping[tuple[str, bool], str] = {
    ("has_gate", False): "QuantGroupedExperts computes a gate of two halves; a non-gated expert (up_proj only) is not supported",
    ("has_post_expert_norm", True): "a norm after each expert's down projection is not part of QuantGroupedExperts",
}
CUSTOM_GATE_REASON = ("the class's _apply_gate matches no nf4moe gate form (reference.Gate: act(min(g, L)) or "
                      "min(act(g), L) or min(g, L)·sigmoid(alpha·min(g, L)), times clamp(u, -L, L) + offset)")
BIAS_NAMES = ("gate_up_proj_bias", "down_proj_bias")


def _activation_table() -> dict[object, str]:
    """act_fn type (or function) -> nf4moe activation string; exact types only (a subclass may change the math)."""
    from transformers import activations as hf_act

    table: dict[object, str] = {nn.SiLU: "silu", nn.ReLU: "relu", F.silu: "silu", F.gelu: "gelu", F.relu: "relu",
                                torch.relu: "relu"}
    by_name = {
        "SiLUActivation": "silu",
        "GELUActivation": "gelu",  # erf GELU, torch or python formula
        # The tanh approximation, written out in four equivalent ways.
        "GELUTanh": "gelu_tanh",
        "NewGELUActivation": "gelu_tanh",
        "FastGELUActivation": "gelu_tanh",
        "AccurateGELUActivation": "gelu_tanh",
    }
    for name, act in by_name.items():
        cls = getattr(hf_act, name, None)
        if cls is not None:
            table[cls] = act
    return table


_ACTIVATIONS: dict[object, str] | None = None


def activation_name(act_fn) -> str | None:
    """The nf4moe activation string for an expert module's ``act_fn``; None when it has no equivalent."""
    global _ACTIVATIONS
    if _ACTIVATIONS is None:
        _ACTIVATIONS = _activation_table()
    if isinstance(act_fn, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act_fn.approximate)
    key = act_fn if not isinstance(act_fn, nn.Module) else type(act_fn)
    try:
        return _ACTIVATIONS.get(key)
    except TypeError:  # unhashable act_fn (e.g. a functools.partial of a list): not in the table
        return None


_LIMIT_ATTRS = ("limit", "swiglu_limit")
_ALPHA_ATTRS = ("alpha", "swiglu_alpha")


def _number(owner, names) -> float | None:
    for n in names:
        v = getattr(owner, n, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def gate_candidates(owner, act: str | None) -> list[Gate]:
    """The nf4moe gate forms a class's ``_apply_gate`` may compute, with the owner's limit / alpha attributes."""
    act = act or "silu"
    out = [Gate(act)]
    limit, alpha = _number(owner, _LIMIT_ATTRS), _number(owner, _ALPHA_ATTRS)
    if limit is not None:
        out += [Gate(act, gate_limit=limit, up_limit=limit), Gate(act, act_limit=limit, up_limit=limit)]
        if alpha is not None:
            out.append(Gate("silu", alpha=alpha, gate_limit=limit, up_limit=limit, up_offset=1.0))
    return out


def probe_gate(fn, owner, *, interleaved: bool, act: str | None) -> Gate | None:
    """The Gate that reproduces ``fn(owner, gate_up)`` (a class's ``_apply_gate``) on probe inputs, or None.

    Probed in float64 on values spread to three times the owner's limit (so every clamp is exercised) with
    the halves laid out as the class stores them (interleaved or [gate; up]); a match is within 1e-5 relative
    (a gate that computes in fp32 and casts back still matches)."""
    limit = _number(owner, _LIMIT_ATTRS)
    scale = 3 * abs(limit) if limit else 6.0
    gen = torch.Generator().manual_seed(0)  # on the CPU even inside a meta-device context (skeletons)
    g = (torch.rand(64, 16, generator=gen, dtype=torch.float64, device="cpu") * 2 - 1) * scale
    u = (torch.rand(64, 16, generator=gen, dtype=torch.float64, device="cpu") * 2 - 1) * scale
    x = torch.stack((g, u), dim=-1).flatten(-2) if interleaved else torch.cat((g, u), dim=-1)
    try:
        with torch.no_grad():
            out = fn(owner, x)
    except (TypeError, RuntimeError, AttributeError, ValueError):  # a gate of another signature or state
        return None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(g.shape):
        return None
    for cand in gate_candidates(owner, act):
        if torch.allclose(out.double(), apply_gate(g, u, cand), rtol=1e-5, atol=1e-6):
            return cand
    return None


def _is_default_gate(fn) -> bool:
    return getattr(fn, "__name__", None) == "_default_apply_gate" and getattr(fn, "__module__", "").startswith(
        "transformers.integrations"
    )


# ---------------------------------------------------------------------------------------------- verdict
def layout_verdict(
    flags: Mapping[str, bool], *, custom_gate: bool, extra_params: Iterable[str] = ()
) -> tuple[Layout | None, list[str]]:
    """(the matching layout, []) or (None, reasons it cannot run).  The one decision used everywhere."""
    reasons = []
    for f in FLAGS:
        value = bool(flags[f])
        if value != DEFAULT_FLAGS[f] and (f, value) in UNSUPPORTED_FLAGS:
            reasons.append(f"{f}={value}: {UNSUPPORTED_FLAGS[(f, value)]}")
    if custom_gate:
        reasons.append(f"custom _apply_gate: {CUSTOM_GATE_REASON}")
    allowed = set(WEIGHT_NAMES) | (set(BIAS_NAMES) if flags.get("has_bias") else set())
    extra = sorted(set(extra_params) - allowed)
    if extra:
        reasons.append(f"extra parameters {extra}: QuantGroupedExperts holds only {sorted(allowed)}")
    if reasons:
        return None, reasons
    for layout in LAYOUTS:
        if layout.matches(flags):
            return layout, []
    return None, [f"flags {dict(flags)} match no layout in nf4moe.adapters.table.LAYOUTS"]


class UnsupportedExpertsError(NotImplementedError):
    """An expert module whose layout QuantGroupedExperts cannot run (the message names class and flag)."""


@dataclass(frozen=True)
class ExpertsSpec:
    """What replace_experts needs to know about one expert module."""

    name: str
    class_name: str
    layout: Layout
    act: str
    num_experts: int
    hidden_size: int
    intermediate_size: int
    param_order: tuple[str, ...] = field(default=WEIGHT_NAMES)
    gate: Gate | None = None  # None: act(g) * u
    has_bias: bool = False


_RECORDED: tuple[str, ...] | None = None


def recorded_flags() -> tuple[str, ...]:
    """The flags the installed ``use_experts_implementation`` records on instances (its keyword arguments).

    Older transformers record fewer (e.g. no ``has_post_expert_norm``): a flag the decorator cannot
    set cannot be anything but its default, so :func:`module_flags` reads it as the default.
    """
    global _RECORDED
    if _RECORDED is None:
        try:
            from transformers.integrations.moe import use_experts_implementation
        except ImportError:  # no decorator at all: no module can be a decorated expert class
            _RECORDED = ()
        else:
            params = inspect.signature(use_experts_implementation).parameters
            _RECORDED = tuple(f for f in FLAGS if f in params)
    return _RECORDED


def module_flags(module: nn.Module) -> dict[str, bool]:
    return {f: bool(getattr(module, f)) if f in recorded_flags() else DEFAULT_FLAGS[f] for f in FLAGS}


def is_experts_module(module: nn.Module) -> bool:
    """True for instances of classes decorated with ``@use_experts_implementation`` (they carry the flags)."""
    flags = recorded_flags()
    return bool(flags) and all(hasattr(module, f) for f in flags) and not hasattr(module, "gate_up_nf4")


def is_expert_like(module: nn.Module) -> bool:
    """Holds stacked 3-D expert weights but no layout flags (an undecorated or remote-code expert class)."""
    if is_experts_module(module) or hasattr(module, "gate_up_nf4"):
        return False
    return any(n in _EXPERT_LIKE_PARAMS and p is not None and p.dim() == 3
               for n, p in module.named_parameters(recurse=False))


def _where(name: str, module: nn.Module) -> str:
    return f"{type(module).__name__} at '{name}'" if name else type(module).__name__


def inspect_experts(module: nn.Module, name: str = "") -> ExpertsSpec:
    """Match a decorated expert module against the table; raise UnsupportedExpertsError/ValueError if it can't run."""
    where = _where(name, module)
    if not is_experts_module(module):
        raise ValueError(f"{where} is not a transformers expert module (no @use_experts_implementation flags)")
    flags = module_flags(module)
    gate_fn = getattr(type(module), "_apply_gate", None)
    custom = gate_fn is not None and not _is_default_gate(gate_fn)
    params = [n for n, _ in module.named_parameters(recurse=False)]
    layout, reasons = layout_verdict(flags, custom_gate=False, extra_params=params)
    act = activation_name(getattr(module, "act_fn", None))
    gate = probe_gate(gate_fn, module, interleaved=layout.interleaved, act=act) if custom and layout else None
    if custom and layout is not None and gate is None:
        layout, reasons = None, [f"custom _apply_gate: {CUSTOM_GATE_REASON}"]
    if layout is None:
        raise UnsupportedExpertsError(f"{where} cannot be replaced by QuantGroupedExperts: " + "; ".join(reasons))
    missing = [n for n in WEIGHT_NAMES if getattr(module, n, None) is None]
    if missing:
        raise UnsupportedExpertsError(f"{where} has no parameter(s) {missing}")
    buffers = [n for n, _ in module.named_buffers(recurse=False)]
    children = [n for n, m in module.named_children() if n != "act_fn"]
    if buffers or children:
        raise UnsupportedExpertsError(
            f"{where} holds state QuantGroupedExperts would drop: buffers {buffers}, submodules {children}")
    if gate is not None:
        act = gate.act
    elif act is None:
        raise UnsupportedExpertsError(
            f"{where}: activation {getattr(module, 'act_fn', None)!r} has no nf4moe equivalent "
            f"(supported: {sorted(set(_ACTIVATIONS.values()))})")
    gu, dn = module.gate_up_proj, module.down_proj
    if gu.dim() != 3 or dn.dim() != 3:
        raise ValueError(f"{where}: expert weights must be 3-D, got gate_up_proj {tuple(gu.shape)}, "
                         f"down_proj {tuple(dn.shape)}")
    if layout.transposed:
        e, h, two_i = gu.shape
        e2, i, h2 = dn.shape
    else:
        e, two_i, h = gu.shape
        e2, h2, i = dn.shape
    if e != e2 or h != h2 or two_i != 2 * i:
        expect = "(E, H, 2I) and (E, I, H)" if layout.transposed else "(E, 2I, H) and (E, H, I)"
        raise ValueError(f"{where} ({layout.name} layout): gate_up_proj {tuple(gu.shape)} and down_proj "
                         f"{tuple(dn.shape)} are not {expect}")
    has_bias = bool(flags["has_bias"])
    if has_bias:
        got = {n: getattr(module, n, None) for n in BIAS_NAMES}
        want = {"gate_up_proj_bias": (e, 2 * i), "down_proj_bias": (e, h)}
        bad = {n: None if t is None else tuple(t.shape) for n, t in got.items()
               if t is None or tuple(t.shape) != want[n]}
        if bad:
            raise UnsupportedExpertsError(f"{where} has has_bias=True but biases {bad}; expected {want}")
    return ExpertsSpec(name=name, class_name=type(module).__name__, layout=layout, act=act, num_experts=e,
                       hidden_size=h, intermediate_size=i,
                       param_order=tuple(p for p in params if p not in BIAS_NAMES),
                       gate=gate if gate is not None and not gate.plain else None, has_bias=has_bias)


# ---------------------------------------------------------------------------------------------- selection


def module_selector(modules) -> Callable[[str, nn.Module], bool]:
    """``modules`` -> predicate on (qualified name, module).

    None selects every expert module.  A string (or a list of them) selects a module when a pattern
    matches its qualified name as a shell glob (``fnmatch``) or as a regular expression
    (``re.search``).  A callable ``(name, module) -> bool`` is used as is.
    """
    if modules is None:
        return lambda name, module: True
    if callable(modules):
        return modules
    patterns = [modules] if isinstance(modules, str) else list(modules)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"modules must be None, a pattern string, a list of them, or a callable; got {modules!r}")
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except re.error:
            compiled.append(None)  # not a regex (e.g. a glob like "*[0-3]*"): glob matching only
    return lambda name, module: any(
        fnmatch.fnmatchcase(name, p) or (rx is not None and rx.search(name)) for p, rx in zip(patterns, compiled))


def find_experts(model: nn.Module, modules=None) -> list[tuple[str, nn.Module]]:
    """Selected expert modules of ``model``, in module order.  Undecorated stacked-expert modules raise."""
    from ..moe_layers import QuantGroupedExperts

    select = module_selector(modules)
    found, replaced = [], []
    for name, module in model.named_modules():
        if isinstance(module, QuantGroupedExperts):
            replaced.append(name + ".")
        if any(name.startswith(r) for r in replaced):  # our own LoRA ParameterDicts hold 3-D "gate_up_proj"
            continue
        if is_expert_like(module) and select(name, module):
            raise UnsupportedExpertsError(
                f"{_where(name, module)} holds stacked expert weights but carries no @use_experts_implementation "
                f"flags, so its layout is unknown; nf4moe only replaces decorated transformers v5 expert classes")
        if is_experts_module(module) and select(name, module):
            found.append((name, module))
    return found


# ---------------------------------------------------------------------------------------------- listing
def _decorator_defaults() -> dict[str, bool]:
    from transformers.integrations import moe

    sig = inspect.signature(moe.use_experts_implementation)
    return {f: sig.parameters[f].default for f in recorded_flags()}


def _decorated_classes(tree: ast.Module):
    for node in ast.walk(tree):
        if not isinstance(node, ast.ClassDef):
            continue
        for dec in node.decorator_list:
            target = dec.func if isinstance(dec, ast.Call) else dec
            if isinstance(target, ast.Name) and target.id == "use_experts_implementation":
                kwargs = {}
                if isinstance(dec, ast.Call):
                    for kw in dec.keywords:
                        if isinstance(kw.value, ast.Constant):
                            kwargs[kw.arg] = kw.value.value
                yield node, kwargs


def _class_facts(node: ast.ClassDef) -> tuple[bool, list[str], str]:
    """(defines _apply_gate, parameter names assigned in __init__, act_fn source)."""
    custom_gate = any(isinstance(n, ast.FunctionDef) and n.name == "_apply_gate" for n in node.body)
    params, act = [], "None"
    for fn in node.body:
        if not (isinstance(fn, ast.FunctionDef) and fn.name == "__init__"):
            continue
        for stmt in ast.walk(fn):
            if not isinstance(stmt, ast.Assign):
                continue
            for tgt in stmt.targets:
                if not (isinstance(tgt, ast.Attribute) and isinstance(tgt.value, ast.Name) and tgt.value.id == "self"):
                    continue
                src = ast.unparse(stmt.value)
                if src.startswith(("nn.Parameter", "torch.nn.Parameter", "Parameter")):
                    params.append(tgt.attr)
                elif tgt.attr == "act_fn":
                    act = src
    return custom_gate, params, act


def _act_from_source(src: str) -> str:
    m = re.fullmatch(r"ACT2FN\[['\"]([\w.]+)['\"]\]", src)
    if m:
        from transformers.activations import ACT2FN

        return activation_name(ACT2FN[m.group(1)]) or f"unsupported ({m.group(1)})"
    if src.startswith("ACT2FN["):
        return "from config (" + src[len("ACT2FN["):-1] + ")"
    m = re.fullmatch(r"(?:torch\.nn\.functional|nn\.functional|F)\.(\w+)", src)
    if m and callable(getattr(F, m.group(1), None)):
        return activation_name(getattr(F, m.group(1))) or f"unsupported ({src})"
    return f"unsupported ({src})"


def _probe_source_gate(model_type: str, fname: str, class_name: str, interleaved: bool, act: str) -> Gate | None:
    """probe_gate on a class's own ``_apply_gate`` (its module imported) with stand-in limit / alpha / act_fn
    attributes: the form does not depend on their values, which come from the config when a module is replaced."""
    import importlib
    from types import SimpleNamespace

    try:
        module = importlib.import_module(f"transformers.models.{model_type}.{fname[:-3]}")
    except ImportError:
        return None
    fn = vars(getattr(module, class_name)).get("_apply_gate")
    known = act if act in ACTIVATIONS else None
    owner = SimpleNamespace(limit=3.0, swiglu_limit=3.0, alpha=1.5, swiglu_alpha=1.5,
                            act_fn=lambda x: activation(x, known or "silu"))
    return probe_gate(fn, owner, interleaved=interleaved, act=known) if fn is not None else None


def supported_models(transformers_root: str | os.PathLike | None = None) -> list[dict]:
    """One row per ``@use_experts_implementation`` class in the installed transformers, with nf4moe's verdict.

    Rows: ``model_type`` (the models/ folder), ``experts_class``, ``flags`` (non-default ones),
    ``layout`` (table row name or None), ``supported`` (bool), ``activation``, ``reason``.
    Read from source (``ast``), so listing does not import ~70 model files; the verdict is the
    same :func:`layout_verdict` that :func:`inspect_experts` applies to live modules.  Activations read
    from the config (``ACT2FN[config.hidden_act]``) are checked when a module is replaced.
    """
    if transformers_root is None:
        import transformers

        transformers_root = os.path.dirname(transformers.__file__)
    defaults = {**DEFAULT_FLAGS, **_decorator_defaults()}
    models_dir = os.path.join(transformers_root, "models")
    rows = []
    for model_type in sorted(os.listdir(models_dir)):
        folder = os.path.join(models_dir, model_type)
        if not os.path.isdir(folder):
            continue
        for fname in sorted(os.listdir(folder)):
            if not (fname.startswith("modeling_") and fname.endswith(".py")):
                continue
            with open(os.path.join(folder, fname), encoding="utf-8") as fh:
                src = fh.read()
            if "@use_experts_implementation" not in src:
                continue
            for node, kwargs in _decorated_classes(ast.parse(src)):
                flags = {f: bool(kwargs.get(f, defaults[f])) for f in FLAGS}
                custom_gate, params, act_src = _class_facts(node)
                layout, reasons = layout_verdict(flags, custom_gate=False, extra_params=params)
                act = _act_from_source(act_src)
                gate = None
                if layout is not None and custom_gate:
                    gate = _probe_source_gate(model_type, fname, node.name, layout.interleaved, act)
                    if gate is None:
                        layout, reasons = None, [f"custom _apply_gate: {CUSTOM_GATE_REASON}"]
                    else:
                        act = gate.act if gate.plain else gate.formula()
                if layout is not None and act.startswith("unsupported"):
                    layout, reasons = None, [f"activation {act}"]
                rows.append({
                    "model_type": model_type,
                    "experts_class": node.name,
                    "flags": {f: v for f, v in flags.items() if v != DEFAULT_FLAGS[f]},
                    "layout": layout.name if layout else None,
                    "supported": layout is not None,
                    "activation": act,
                    "reason": "; ".join(reasons),
                })
    return rows
