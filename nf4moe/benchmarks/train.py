"""fwd+bwd of one expert layer (QLoRA training step of the layer): nf4moe against its peers, one run.

Peers, all on the same weights, routing, inputs and upstream gradient:
- the split-LoRA method of MoE fine-tuning libraries (split_lora.py), with the same LoRA values as nf4moe: on bf16
  weights; on the NF4 weights dequantized by bitsandbytes per call and again in the backward; and the same keeping
  the dequantized weights for the backward.  Their output, dX, d(top_k_weights) and LoRA gradients are checked
  against nf4moe's (the table's rel err: the largest of them);
- transformers grouped_mm autograd on bf16 weights and dequantize-then-grouped_mm, both without LoRA; PEFT LoRA on
  the 3D expert parameters (``target_parameters``) over the bf16 grouped_mm.
nf4moe's own variants beside its default row: the backward's Gluon GEMMs (plan ``bwd="wgmma"``, sm_90) where the
default is the Triton backward, recompute mode, and the training forward alone (the backward's time is a row's
minus it).
Reported: ``ms``, the headline, is N steps back to back with one synchronize, divided by N (what an N-layer model
sees), the median of alternating rounds; the note holds the synchronized per-step latency (Triton's do_bench) and
the extra peak memory above the weights and inputs (``torch.cuda.max_memory_allocated`` during a step minus
before it).
"""
from __future__ import annotations

import statistics
import time

import torch

from .layer import SHAPES, Row, _bench, build_peers, dequant_peer, floor_ms, routing
from .split_lora import SplitLoraExperts, rel_errors, step_grads

STEPS = 8  # steps back to back per timing


class _Holder(torch.nn.Module):
    """PEFT wraps modules of a model; a bare experts module is held in one."""

    def __init__(self, experts):
        super().__init__()
        self.experts = experts

    def forward(self, x, idx, w):
        return self.experts(x, idx, w)


def _peft_peer(bf16_mod, rank: int):
    import copy

    from peft import LoraConfig, get_peft_model

    holder = _Holder(copy.deepcopy(bf16_mod))
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[], target_parameters=["experts.gate_up_proj",
                                                                                         "experts.down_proj"])
    model = get_peft_model(holder, cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    return model


def _step_fn(fn, x, idx, w, params, gout, backward: bool = True):
    def step():
        for p in params:
            p.grad = None
        if x.grad is not None:
            x.grad = None
        if w.grad is not None:
            w.grad = None
        out = fn(x, idx, w)
        if backward:
            out.backward(gout)

    return step


def fn_mod(fn, mod):
    """``fn`` with ``mod``'s LoRA factors attached (split_lora.step_grads reads lora_A / lora_B of what it runs)."""

    class _Call:
        lora_A, lora_B = mod.lora_A, mod.lora_B

        def __call__(self, a, b, c):
            return fn(a, b, c)

    return _Call()


def back_to_back_ms(step, n: int = STEPS) -> float:
    """``n`` steps launched back to back, one synchronize, wall time / n."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - t0) / n


def _extra_peak_gib(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _ours_variants(ours, x, idx, w, rank: int) -> dict:
    """nf4moe's rows beside the default: {name: (fn, params, backward)}.  The backward kernel other than the plan's
    default where this GPU can run both, recompute mode, and the training forward alone."""
    import nf4moe

    params = list(ours.parameters())
    out = {}
    default = ours.launch_plan(x, idx, w).bwd
    other = "wgmma" if default == "gemm" else "gemm"
    try:
        with nf4moe.plan_overrides(bwd=other):
            ours.launch_plan(x, idx, w)
    except ValueError:  # not an sm_90 GPU with Gluon
        other = None
    if other is not None:
        label = "Gluon (sm_90) backward" if other == "wgmma" else "Triton backward"

        def with_other(a, b, c):
            with nf4moe.plan_overrides(bwd=other):
                return ours(a, b, c)

        out[f"nf4moe (LoRA r={rank}), {label}"] = (with_other, params, True)

    def recompute(a, b, c):
        ours.recompute = True
        try:
            return ours(a, b, c)
        finally:
            ours.recompute = False

    out[f"nf4moe (LoRA r={rank}), recompute mode"] = (recompute, params, True)
    out[f"nf4moe (LoRA r={rank}), training forward alone"] = (lambda a, b, c: ours(a, b, c), params, False)
    return out


def run_fwdbwd(shape: str, tokens, rank: int, ceil: dict, rows: list, rounds: int = 3):
    e, h, i, k = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    _, bf16, ours = build_peers(e, h, i, k, rank, gen)
    deq = dequant_peer(bf16, ours)
    peft_model = _peft_peer(bf16, rank)
    split = {f"split LoRA r={rank} on bf16 grouped_mm": SplitLoraExperts(ours, "bf16", (bf16.gate_up_proj, bf16.down_proj)),
             f"split LoRA r={rank}, NF4 dequant(bnb) per call and in bwd": SplitLoraExperts(ours, "nf4"),
             f"split LoRA r={rank}, NF4 dequant(bnb) per call, kept for bwd": SplitLoraExperts(ours, "nf4_keep")}
    ours_name = f"nf4moe (LoRA r={rank})"
    for t in tokens:
        if t < 1024:
            continue  # training shapes only
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
        idx, w = routing(t, e, k, gen)
        w = w.requires_grad_(True)
        gout = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen)
        fl = floor_ms(ceil, ours, idx, t, h, i, rank, backward=True)
        ref = step_grads(ours, x, idx, w, gout)
        errs = {name: max(rel_errors(step_grads(m, x, idx, w, gout), ref).values()) for name, m in split.items()}
        impls = {
            ours_name: (lambda a, b, c: ours(a, b, c), list(ours.parameters())),
            **{name: (m, list(m.parameters())) for name, m in split.items()},
            "transformers grouped_mm bf16 (no LoRA)": (lambda a, b, c: bf16(a, b, c), []),
            f"PEFT LoRA r={rank} on bf16 grouped_mm": (lambda a, b, c: peft_model(a, b, c),
                                                      [p for p in peft_model.parameters() if p.requires_grad]),
            "dequant(bnb) + grouped_mm (no LoRA)": (deq, []),
        }
        steps = {name: _step_fn(fn, x, idx, w, params, gout) for name, (fn, params) in impls.items()}
        variants = _ours_variants(ours, x, idx, w, rank)
        for name, (fn, params, backward) in variants.items():
            if backward:
                errs[name] = max(rel_errors(step_grads(fn_mod(fn, ours), x, idx, w, gout), ref).values())
            steps[name] = _step_fn(fn, x, idx, w, params, gout, backward)
        mem, lat = {}, {}
        for name, step in steps.items():
            step()
            mem[name] = _extra_peak_gib(step)
            lat[name] = _bench(step)
        per_round = {name: [] for name in steps}
        for r in range(rounds):  # alternating order: host and clock drift fall on every implementation alike
            for name in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                per_round[name].append(back_to_back_ms(steps[name]))
        for name in steps:
            ms = statistics.median(per_round[name])
            rows.append(Row(shape, "fwdbwd", t, name, ms, fl, errs.get(name), mem[name],
                            note=f"synchronized per step {lat[name]:.3f} ms", rounds_ms=per_round[name]))
            err = f"  rel err vs nf4moe {errs[name]:.1e}" if name in errs else ""
            print(f"{shape:9s} T={t:6d} fwd+bwd {name:56s} {ms:8.3f} ms (per step synchronized {lat[name]:8.3f})  "
                  f"extra peak {mem[name]:6.2f} GiB  x{ms / fl:5.1f} floor{err}", flush=True)
    del bf16, ours, peft_model, split
    torch.cuda.empty_cache()
