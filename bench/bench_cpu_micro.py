"""CPU microbenchmarks (pytest-benchmark): NF4 quantize, dequantize, and the reference expert layer.

The test suite collects this file with ``--benchmark-disable``, so each benchmark runs once as a
test (a few ms).  To time them:

    .venv/bin/python -m pytest bench/bench_cpu_micro.py --benchmark-enable --benchmark-group-by=group

Peers sit in the same group: bitsandbytes' own quantize/dequantize beside ours, and the reference
layer on NF4 weights beside the same layer on bf16 weights (the cost of dequantizing per call).
Shapes are Qwen3-30B-A3B's expert layer scaled down (E=16, H=256, I=128, top-8).
"""
from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from nf4moe import NF4Weight, QuantGroupedExperts
from nf4moe.reference import moe_forward

E, H, I, K, T = 16, 256, 128, 8, 64


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(1234)
    gate_up = (torch.randn(E, 2 * I, H, generator=g) / H**0.5).bfloat16()
    down = (torch.randn(E, H, I, generator=g) / I**0.5).bfloat16()
    return gate_up, down


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(99)
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.softmax(torch.randn(T, K, generator=g), dim=-1)
    return x, ids, w


@pytest.mark.benchmark(group="quantize")
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_nf4weight(benchmark, weights, double_quant):
    m = benchmark(NF4Weight.quantize, weights[0], 64, double_quant)
    assert m.shape == (E, 2 * I, H)


@pytest.mark.benchmark(group="quantize")
def test_quantize_bnb_peer(benchmark, weights):
    q, _ = benchmark(bnbf.quantize_4bit, weights[0], blocksize=64, compress_statistics=True, quant_type="nf4")
    assert q.numel() == E * 2 * I * H // 2


@pytest.mark.benchmark(group="dequantize")
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_nf4weight(benchmark, weights, double_quant):
    m = NF4Weight.quantize(weights[0], 64, double_quant)
    out = benchmark(m.dequantize, torch.bfloat16)
    assert out.shape == (E, 2 * I, H) and not out.isnan().any()


@pytest.mark.benchmark(group="dequantize")
def test_dequantize_one_expert(benchmark, weights):
    m = NF4Weight.quantize(weights[0], 64, True)
    out = benchmark(m.dequantize_expert, 3, torch.float32)
    assert out.shape == (2 * I, H)


@pytest.mark.benchmark(group="dequantize")
def test_dequantize_bnb_peer(benchmark, weights):
    q, st = bnbf.quantize_4bit(weights[0], blocksize=64, compress_statistics=True, quant_type="nf4")
    out = benchmark(bnbf.dequantize_4bit, q, st)
    assert out.shape == (E, 2 * I, H)


@pytest.mark.benchmark(group="forward")
@pytest.mark.parametrize("lora_rank", [0, 16])
def test_reference_forward_nf4(benchmark, weights, tokens, lora_rank):
    layer = QuantGroupedExperts.from_weights(*weights, lora_rank=lora_rank, backend="reference")
    with torch.no_grad():
        out = benchmark(layer, *tokens)
    assert out.shape == (T, H) and out.dtype == torch.bfloat16 and not out.isnan().any()


@pytest.mark.benchmark(group="forward")
def test_reference_forward_bf16_peer(benchmark, weights, tokens):
    x, ids, w = tokens
    with torch.no_grad():
        out = benchmark(moe_forward, x, ids, w, *weights)
    assert out.shape == (T, H)
