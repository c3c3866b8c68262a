"""fwd+bwd of one expert layer (QLoRA training step of the layer): nf4moe against its peers, one run.

Peers: transformers grouped_mm autograd on bf16 weights (no LoRA, weights frozen); PEFT LoRA on the 3D
expert parameters (``target_parameters``) over the same bf16 grouped_mm; dequantize-then-grouped_mm
autograd (no LoRA).  Reported: median time of forward + backward, and the extra peak memory above the
weights and inputs (``torch.cuda.max_memory_allocated`` during the step minus before it).
"""
from __future__ import annotations

import torch

from .layer import SHAPES, Row, _bench, build_peers, dequant_peer, floor_ms, routing


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


def _step_fn(fn, x, idx, w, params):
    def step():
        for p in params:
            p.grad = None
        if x.grad is not None:
            x.grad = None
        out = fn(x, idx, w)
        out.backward(torch.ones_like(out))  # fixed upstream gradient; fresh inputs per shape

    return step


def _extra_peak_gib(step) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def run_fwdbwd(shape: str, tokens, rank: int, ceil: dict, rows: list):
    e, h, i, k = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    _, bf16, ours = build_peers(e, h, i, k, rank, gen)
    deq = dequant_peer(bf16, ours)
    peft_model = _peft_peer(bf16, rank)
    for t in tokens:
        if t < 1024:
            continue  # training shapes only
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
        idx, w = routing(t, e, k, gen)
        w = w.requires_grad_(True)
        fl = floor_ms(ceil, ours, idx, t, h, i, rank, backward=True)
        impls = {
            "transformers grouped_mm bf16 (no LoRA)": (lambda a, b, c: bf16(a, b, c), []),
            f"PEFT LoRA r={rank} on bf16 grouped_mm": (lambda a, b, c: peft_model(a, b, c),
                                                      [p for p in peft_model.parameters() if p.requires_grad]),
            "dequant(bnb) + grouped_mm (no LoRA)": (deq, []),
            f"nf4moe (LoRA r={rank})": (lambda a, b, c: ours(a, b, c), list(ours.parameters())),
        }
        for name, (fn, params) in impls.items():
            step = _step_fn(fn, x, idx, w, params)
            step()
            mem = _extra_peak_gib(step)
            ms = _bench(step)
            rows.append(Row(shape, "fwdbwd", t, name, ms, fl, None, mem))
            print(f"{shape:9s} T={t:6d} fwd+bwd {name:40s} {ms:8.3f} ms  extra peak {mem:6.2f} GiB  x{ms / fl:5.1f} floor",
                  flush=True)
    del bf16, ours, peft_model
    torch.cuda.empty_cache()
