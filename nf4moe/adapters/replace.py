"""replace_experts and merge_and_unload: swap transformers expert modules for QuantGroupedExperts and back.

Data flow of replace_experts, one module at a time: inspect the module against the layout table
(nothing is modified until every selected module passed) -> take its two 3-D weights (a transposed
layout is read through a transposed view; NF4Weight.quantize makes it contiguous a chunk of experts
at a time) -> quantize with bitsandbytes -> put a QuantGroupedExperts in the parent -> point the
original module's parameters at the meta device.  Peak extra memory is one module's weights.

The original module is kept, weightless ("the shell"), on the new module as ``nf4moe_origin``: it
is not a registered submodule (no state_dict entries, ``.to()`` skips it) and it is how
merge_and_unload gives back the original expert class with its flags, activation and config.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..moe_layers import NF4Weight, QuantGroupedExperts
from .table import WEIGHT_NAMES, ExpertsSpec, Layout, find_experts, inspect_experts

ORIGIN_ATTR = "nf4moe_origin"


@dataclass
class Origin:
    """The replaced transformers module (weights on meta) and how its weights were laid out."""

    shell: nn.Module
    layout: Layout
    param_order: tuple[str, ...]


def origin_of(module: QuantGroupedExperts, name: str = "") -> Origin:
    origin = getattr(module, ORIGIN_ATTR, None)
    if origin is None:
        raise ValueError(
            f"QuantGroupedExperts at '{name}' was not created by nf4moe.replace_experts / nf4moe.from_pretrained, "
            "so the transformers expert class it stands for is unknown")
    return origin


def quant_experts(model: nn.Module) -> list[tuple[str, QuantGroupedExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantGroupedExperts)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def make_shell(module: nn.Module) -> nn.Module:
    """Point the module's own parameters at meta tensors of the same shape/dtype (frees their storage)."""
    for pname, p in list(module.named_parameters(recurse=False)):
        if p.device.type != "meta":
            meta = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
            setattr(module, pname, meta)
    return module


def stored_to_canonical(w: torch.Tensor, layout: Layout, proj: str = "down_proj") -> torch.Tensor:
    """A stored expert weight as (E, out, in), a view, no copy; an interleaved gate_up_proj as the 4-D view
    (E, 2, I, H) of its rows in [gate; up] order (NF4Weight.quantize reads it as (E, 2I, H))."""
    w = w.transpose(1, 2) if layout.transposed else w
    if layout.interleaved and proj == "gate_up_proj":
        e, two_i, h = w.shape
        w = w.view(e, two_i // 2, 2, h).transpose(1, 2)
    return w


def interleave_rows(t: torch.Tensor) -> torch.Tensor:
    """(E, 2I, ...) with rows in [gate; up] order -> rows [g0, u0, g1, u1, ...] (a copy)."""
    e, two_i = t.shape[:2]
    return t.reshape(e, 2, two_i // 2, *t.shape[2:]).transpose(1, 2).reshape(t.shape)


def deinterleave_rows(t: torch.Tensor) -> torch.Tensor:
    """(E, 2I, ...) with rows [g0, u0, g1, u1, ...] -> [gate; up] order (a copy)."""
    return torch.cat((t[:, 0::2], t[:, 1::2]), dim=1)


def canonical_to_stored(w: torch.Tensor, layout: Layout, proj: str) -> torch.Tensor:
    """The inverse of stored_to_canonical for a canonical (E, out, in) tensor: contiguous, as the class stores it."""
    if layout.interleaved and proj == "gate_up_proj":
        w = interleave_rows(w)
    return (w.transpose(1, 2) if layout.transposed else w).contiguous()


def bias_to_canonical(b: torch.Tensor, layout: Layout, proj: str) -> torch.Tensor:
    """A stored bias (E, out) in the order of the canonical rows ([gate; up] for gate_up_proj)."""
    return deinterleave_rows(b) if layout.interleaved and proj == "gate_up_proj" else b.clone()


def bias_to_stored(b: torch.Tensor, layout: Layout, proj: str) -> torch.Tensor:
    return interleave_rows(b) if layout.interleaved and proj == "gate_up_proj" else b.clone()


def quantize_weight(w: torch.Tensor, layout: Layout, *, blocksize: int, compress_statistics: bool,
                    device: torch.device | str | None = None, name: str = "w",
                    allow_non_finite: bool = False, proj: str | None = None) -> NF4Weight:
    """One stored expert weight -> NF4Weight (E, out, in).  A transposed or interleaved view is copied a chunk
    at a time.  ``name`` (the weight's qualified name) goes into the error for non-finite values
    (NF4Weight.quantize); ``proj`` (default: the last part of ``name``) says which weight it is."""
    if w.device.type == "meta":
        raise ValueError("expert weights are on the meta device; load them before quantizing")
    proj = proj or name.rpartition(".")[2]
    if layout.interleaved and proj not in WEIGHT_NAMES:
        raise ValueError(f"quantize_weight: proj must be one of {WEIGHT_NAMES} for the {layout.name} layout, "
                         f"got {proj!r}")
    w = w.detach()
    if device is not None:
        w = w.to(device)
    return NF4Weight.quantize(stored_to_canonical(w, layout, proj), blocksize, compress_statistics, name=name,
                              allow_non_finite=allow_non_finite)


def build_quant_experts(spec: ExpertsSpec, gate_up: NF4Weight, down: NF4Weight, shell: nn.Module, *,
                        lora_rank: int, lora_alpha: float | None, backend: str,
                        lora_dtype: torch.dtype | None) -> QuantGroupedExperts:
    """The QuantGroupedExperts for ``shell`` (its weights quantized as ``gate_up`` / ``down``); its biases, when
    the layout has them, taken from ``shell`` in [gate; up] order (on meta when the shell is a skeleton)."""
    biases = {}
    if spec.has_bias:
        for proj, key in (("gate_up_proj", "gate_up_bias"), ("down_proj", "down_bias")):
            b = getattr(shell, f"{proj}_bias")
            biases[key] = (torch.empty_like(b, device="meta") if b.device.type == "meta"
                           else bias_to_canonical(b.detach(), spec.layout, proj))
    qe = QuantGroupedExperts.from_nf4(gate_up, down, act=spec.act, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                      backend=backend, lora_dtype=lora_dtype, gate=spec.gate, **biases)
    setattr(qe, ORIGIN_ATTR, Origin(shell=make_shell(shell), layout=spec.layout, param_order=spec.param_order))
    return qe


def check_blocksize(specs: list[ExpertsSpec], blocksize: int) -> None:
    for s in specs:
        for what, dim in (("hidden_size", s.hidden_size), ("intermediate_size", s.intermediate_size)):
            if dim % blocksize:
                raise ValueError(f"{s.class_name} at '{s.name}': {what} {dim} is not a multiple of blocksize "
                                 f"{blocksize} (each NF4 block must lie inside one weight row)")


def set_trainable(model: nn.Module, *, biases: bool = False) -> None:
    """Freeze everything but the LoRA factors of QuantGroupedExperts (the QLoRA recipe); ``biases=True`` trains
    their per-expert biases too."""
    for p in model.parameters():
        p.requires_grad_(False)
    for _, qe in quant_experts(model):
        for p in list(qe.lora_A.values()) + list(qe.lora_B.values()):
            p.requires_grad_(True)
        if biases and qe.gate_up_bias is not None:
            qe.gate_up_bias.requires_grad_(True)
            qe.down_bias.requires_grad_(True)


def replace_experts(
    model: nn.Module,
    *,
    lora_rank: int = 16,
    lora_alpha: float | None = 32,
    blocksize: int = 64,
    compress_statistics: bool = True,
    modules=None,
    backend: str = "auto",
    lora_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    freeze_base: bool = True,
    allow_non_finite: bool = False,
    train_biases: bool = False,
) -> nn.Module:
    """Replace every (selected) transformers expert module of ``model`` by a QuantGroupedExperts, in place.

    Args:
        lora_rank, lora_alpha: LoRA on both projections of every expert (rank 0: no LoRA); scale alpha / rank.
        blocksize, compress_statistics: bitsandbytes NF4 quantization (double-quant when True).
        modules: restrict by qualified module name: a glob or regex string, a list of them, or a
            callable ``(name, module) -> bool``.  Unselected modules are left untouched.
        backend: ``"auto"`` (Triton on CUDA, reference on CPU), ``"reference"`` or ``"triton"``.
        lora_dtype: dtype of the LoRA factors (default: the weights' dtype).
        device: quantize on this device (each module's weights are moved there one module at a time).
        freeze_base: set ``requires_grad=False`` on every parameter but the LoRA factors.
        allow_non_finite: quantize weights holding NaN / Inf instead of raising ValueError (which names the
            module's weight, the experts and the counts; modules before it are already replaced).
        train_biases: with ``freeze_base``, also train the per-expert biases of classes that have them
            (gpt-oss); they are frozen otherwise.

    Shared experts, dense MLPs, routers and attention are not expert modules and stay as they are.
    Raises UnsupportedExpertsError (a NotImplementedError) naming class and flag for a layout the
    module cannot run, and ValueError when the model has no (selected) expert module.
    """
    found = find_experts(model, modules)
    if not found:
        already = quant_experts(model)
        what = "no expert module matches modules=%r" % (modules,) if modules is not None else "no expert modules"
        hint = (f"; it already holds {len(already)} QuantGroupedExperts (replace_experts ran before)" if already
                else "; nf4moe replaces classes decorated with transformers' @use_experts_implementation")
        raise ValueError(f"{type(model).__name__} has {what}{hint}")
    specs = [inspect_experts(m, n) for n, m in found]  # every module checked before any is touched
    check_blocksize(specs, blocksize)
    for (name, module), spec in zip(found, specs):
        gu, dn = (quantize_weight(getattr(module, w), spec.layout, blocksize=blocksize,
                                  compress_statistics=compress_statistics, device=device,
                                  name=f"{name}.{w}" if name else w, allow_non_finite=allow_non_finite, proj=w)
                  for w in ("gate_up_proj", "down_proj"))
        qe = build_quant_experts(spec, gu, dn, module, lora_rank=lora_rank, lora_alpha=lora_alpha,
                                 backend=backend, lora_dtype=lora_dtype)
        _set_submodule(model, name, qe)
        del gu, dn, qe
    if device is not None:
        model.to(device)
    if freeze_base:
        set_trainable(model, biases=train_biases)
    from .hf_quantizer import Nf4MoeConfig, attach

    attach(model, Nf4MoeConfig(lora_rank=lora_rank, lora_alpha=lora_alpha, blocksize=blocksize,
                               compress_statistics=compress_statistics, lora_dtype=lora_dtype,
                               modules=modules, backend=backend,
                               freeze_base=freeze_base, allow_non_finite=allow_non_finite,
                               train_biases=train_biases))
    return model


# ---------------------------------------------------------------------------------------------- merge
def merged_weight(qe: QuantGroupedExperts, proj: str, dtype: torch.dtype) -> torch.Tensor:
    """Dequantized weight of one projection with its LoRA delta, (E, out, in) in ``dtype``; fp32 per expert."""
    nf4 = qe.gate_up_nf4 if proj == "gate_up_proj" else qe.down_nf4
    out = torch.empty(nf4.shape, dtype=dtype, device=nf4.packed.device)
    lora = qe.lora(proj)
    with torch.no_grad():
        for e in range(qe.num_experts):
            w = nf4.dequantize_expert(e, torch.float32)
            if lora is not None:
                w = w + qe.scaling * (lora.B[e].float() @ lora.A[e].float())
            out[e].copy_(w)
    return out


def merge_and_unload(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Give back the original expert classes with ``W = dequant(NF4) + scaling * B @ A`` in ``dtype``, in place.

    Every QuantGroupedExperts (both projections, every expert) is merged; the result is a plain
    transformers model that ``save_pretrained`` / ``AutoModelForCausalLM.from_pretrained`` handle as usual.
    Memory: the merged weights are dense (the bf16 model size); each module is merged in turn.
    """
    found = quant_experts(model)
    if not found:
        raise ValueError(f"{type(model).__name__} has no QuantGroupedExperts to merge")
    origins = [origin_of(qe, name) for name, qe in found]  # fail before changing anything
    for (name, qe), origin in zip(found, origins):
        shell = origin.shell
        for proj in ("gate_up_proj", "down_proj"):
            w = canonical_to_stored(merged_weight(qe, proj, dtype), origin.layout, proj)
            old = getattr(shell, proj)
            if tuple(old.shape) != tuple(w.shape):
                raise ValueError(f"merged {proj} of '{name}' has shape {tuple(w.shape)}, the original class "
                                 f"{type(shell).__name__} holds {tuple(old.shape)}")
            setattr(shell, proj, nn.Parameter(w, requires_grad=old.requires_grad))
            bias = qe.gate_up_bias if proj == "gate_up_proj" else qe.down_bias
            if bias is not None:
                old = getattr(shell, f"{proj}_bias")
                setattr(shell, f"{proj}_bias", nn.Parameter(bias_to_stored(bias.detach(), origin.layout, proj).to(dtype),
                                                           requires_grad=old.requires_grad))
        _set_submodule(model, name, shell)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "nf4moe"):
        delattr(config, "nf4moe")
    from .hf_quantizer import detach

    detach(model)
    return model
