"""Layers and routings shared by the Triton forward and backward tests (CPU interpreter or GPU)."""
from __future__ import annotations

import torch

import nf4moe

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def count_calls(monkeypatch, owner, name: str) -> list:
    """Replace ``owner.name`` (for the rest of the test) by a wrapper that records each call in the
    returned list, then calls the original."""
    calls = []
    real = getattr(owner, name)
    monkeypatch.setattr(owner, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def make_layer(e, h, i, *, rank=0, nested=True, act="silu", blocksize=64, seed=0, lora_dtype=torch.float32):
    """A triton-backend layer on fresh random weights; LoRA B non-zero so the LoRA paths (and the
    LoRA gradients) really carry signal."""
    g = torch.Generator().manual_seed(seed)
    gu = (torch.randn(e, 2 * i, h, generator=g) * h ** -0.5).to(DEV)
    dn = (torch.randn(e, h, i, generator=g) * i ** -0.5).to(DEV)
    m = nf4moe.QuantGroupedExperts.from_weights(gu, dn, lora_rank=rank, lora_alpha=2 * rank if rank else None,
                                                compress_statistics=nested, act=act, blocksize=blocksize,
                                                backend="triton", lora_dtype=lora_dtype)
    with torch.no_grad():
        for p in m.lora_B.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def routing(t, e, k, *, seed, mode="random"):
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
    elif mode == "one_expert":  # every token's first slot to expert 1; other slots sentinels
        idx = torch.full((t, k), e + 5)
        idx[:, 0] = 1
    elif mode == "sentinels":
        idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        idx[torch.rand(t, k, generator=g) < 0.3] = e  # expert-parallel sentinels
    w = torch.rand(t, k, generator=g) + 0.1
    return idx.to(DEV), w.to(DEV)
