"""torch.compile(fullgraph=True) of the reference path (issue 34, part 3), CPU.

Eager, the reference forward routes on the host (expert offsets) and checks ids with a host read; under
tracing it runs its static dense twin (reference.moe.moe_forward(static=True)) and an asynchronous id assert.
Checked: the twin against the routed oracle in fp64 (sentinel ids included), one QuantGroupedExperts
compiled with fullgraph=True against eager, and a whole swapped tiny model's forward compiled with
fullgraph=True against eager (logits) for the three target families.
"""
from __future__ import annotations

import copy

import pytest
import torch

import nf4moe
from nf4moe import QuantGroupedExperts
from nf4moe.reference.moe import Lora, moe_forward

from test_adapters import PARAMS, logits, make_model, randomize_lora


def _inputs(t, e, k, h, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g, dtype=dtype)
    idx = torch.stack([torch.randperm(e + 2, generator=g)[:k] for _ in range(t)])  # ids E, E+1: sentinels
    w = torch.rand(t, k, generator=g, dtype=dtype)
    return x, idx, w


@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_dense_twin_matches_routed(act):
    e, h, i, k, r = 5, 16, 24, 3, 4
    g = torch.Generator().manual_seed(1)
    gu = torch.randn(e, 2 * i, h, generator=g, dtype=torch.float64)
    dn = torch.randn(e, h, i, generator=g, dtype=torch.float64)
    lg = Lora(torch.randn(e, r, h, generator=g, dtype=torch.float64), torch.randn(e, 2 * i, r, generator=g, dtype=torch.float64))
    ld = Lora(torch.randn(e, r, i, generator=g, dtype=torch.float64), torch.randn(e, h, r, generator=g, dtype=torch.float64))
    x, idx, w = _inputs(9, e, k, h, torch.float64, 2)
    kw = dict(num_experts=e, act=act, lora_gate_up=lg, lora_down=ld, lora_scaling=0.5, compute_dtype=torch.float64)
    want = moe_forward(x, idx, w, gu, dn, **kw)
    got = moe_forward(x, idx, w, gu, dn, static=True, **kw)
    assert (idx >= e).any()  # the case includes sentinels
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _module(seed=0):
    torch.manual_seed(seed)
    e, h, i = 4, 64, 128
    qe = QuantGroupedExperts.from_weights(torch.randn(e, 2 * i, h) * 0.05, torch.randn(e, h, i) * 0.05,
                                          lora_rank=4, backend="reference")
    with torch.no_grad():
        for p in qe.lora_B.values():
            p.normal_(0, 0.05)
    return qe


def test_module_fullgraph_matches_eager():
    torch._dynamo.reset()
    qe = _module()
    x, idx, w = _inputs(7, qe.num_experts, 2, qe.hidden_size, torch.float32, 3)
    want = qe(x, idx, w)
    got = torch.compile(qe, fullgraph=True, backend="eager")(x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compiled_negative_id_still_fails():
    torch._dynamo.reset()
    qe = _module()
    x, idx, w = _inputs(4, qe.num_experts, 2, qe.hidden_size, torch.float32, 4)
    idx[1, 0] = -1
    with pytest.raises(ValueError, match="negative expert ids"):
        qe(x, idx, w)
    with pytest.raises(RuntimeError, match="negative expert ids"):
        torch.compile(qe, fullgraph=True, backend="eager")(x, idx, w)


@pytest.mark.parametrize("family", [p for p in PARAMS if p.id in ("Qwen3Moe", "Glm4Moe", "DeepseekV3")])
def test_swapped_model_forward_fullgraph(family):
    torch._dynamo.reset()
    model = nf4moe.replace_experts(make_model(family), lora_rank=4, backend="reference")
    randomize_lora(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    want = logits(model, ids)
    compiled = torch.compile(model.forward, fullgraph=True, backend="eager")
    got = compiled(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", [p for p in PARAMS if p.id in ("Qwen3Moe", "Glm4Moe", "DeepseekV3")])
def test_compiled_greedy_decode_matches_generate(family):
    """Greedy decoding through a static KV cache with forward compiled fullgraph (what transformers' compiled
    generate runs; its auto-compile only engages on GPUs) gives the tokens eager generate gives."""
    from transformers import StaticCache

    torch._dynamo.reset()
    model = nf4moe.replace_experts(make_model(family), lora_rank=4, backend="reference")
    randomize_lora(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(6))
    new = 4
    want = model.generate(ids, max_new_tokens=new, do_sample=False)
    fwd = torch.compile(model.forward, fullgraph=True, backend="eager")
    cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new)
    seq, pos, step_ids = ids, torch.arange(ids.shape[1]), ids
    with torch.no_grad():
        for _ in range(new):
            out = fwd(input_ids=step_ids, past_key_values=cache, cache_position=pos, use_cache=True)
            step_ids = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, step_ids], 1)
            pos = pos[-1:] + 1
    assert seq.tolist() == want.tolist()
