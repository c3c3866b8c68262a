"""The fwd+bwd benchmark's split-LoRA peers (nf4moe/benchmarks/split_lora.py) on the CPU: the same layer as nf4moe
by another method, so their outputs and gradients must agree with nf4moe's on the same NF4 weights and LoRA values
(bf16 grouped_mm operands, hence bf16 bounds), and the bf16-weight peer differs by the NF4 quantization error."""
from __future__ import annotations

import pytest
import torch

from nf4moe import QuantGroupedExperts
from nf4moe.benchmarks.split_lora import SplitLoraExperts, rel_errors, step_grads

# bf16 operands and products rounded once per grouped_mm (8 mantissa bits, ~4e-3 each; seen 6-7e-3 here), as the
# layer tests' bf16 bound
NF4_BOUND = 2e-2


@pytest.fixture(scope="module")
def layer_and_inputs():
    gen = torch.Generator().manual_seed(0)
    e, h, i, t, k = 4, 128, 64, 24, 2
    gu = (torch.randn(e, 2 * i, h, generator=gen) * h ** -0.5).to(torch.bfloat16)
    dn = (torch.randn(e, h, i, generator=gen) * i ** -0.5).to(torch.bfloat16)
    ours = QuantGroupedExperts.from_weights(gu, dn, lora_rank=16, lora_alpha=32, backend="reference")
    with torch.no_grad():
        for p in ours.lora_B.values():
            p.normal_(0, 0.05, generator=gen)
    ours = ours.to(torch.bfloat16)
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
    w = torch.rand(t, k, generator=gen).to(torch.bfloat16)
    gout = torch.randn(t, h, generator=gen).to(torch.bfloat16)
    return ours, (gu, dn), (x, idx, w, gout)


@pytest.mark.parametrize("weights", ["nf4", "nf4_keep"])
def test_nf4_split_lora_peers_match_nf4moe(layer_and_inputs, weights):
    ours, _, (x, idx, w, gout) = layer_and_inputs
    ref = step_grads(ours, x, idx, w, gout)
    peer = SplitLoraExperts(ours, weights)
    got = step_grads(peer, x, idx, w, gout)
    assert set(got) == set(ref) and len(ref) == 7  # out, dx, dw and the four LoRA gradients
    errs = rel_errors(got, ref)
    assert max(errs.values()) < NF4_BOUND, errs
    assert all(float(v.float().norm()) > 0 for v in got.values())


def test_the_redequantizing_peer_saves_no_weight(layer_and_inputs):
    """weights='nf4' dequantizes in the backward again: autograd's saved tensors hold no (E, out, in) weight."""
    ours, _, (x, idx, w, _) = layer_and_inputs
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    for weights, expect in (("nf4", False), ("nf4_keep", True)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            SplitLoraExperts(ours, weights)(x.requires_grad_(True), idx, w)
        assert any(s == tuple(ours.gate_up_nf4.shape) for s in saved) is expect, (weights, saved)


def test_the_bf16_peer_differs_by_the_quantization_error(layer_and_inputs):
    ours, bf16, (x, idx, w, gout) = layer_and_inputs
    ref = step_grads(ours, x, idx, w, gout)
    errs = rel_errors(step_grads(SplitLoraExperts(ours, "bf16", bf16), x, idx, w, gout), ref)
    nf4 = rel_errors(step_grads(SplitLoraExperts(ours, "nf4"), x, idx, w, gout), ref)
    assert NF4_BOUND < errs["out"] < 0.3 and errs["out"] > 2 * nf4["out"], (errs, nf4)


def test_peer_arguments_are_checked(layer_and_inputs):
    ours = layer_and_inputs[0]
    with pytest.raises(ValueError, match="weights must be one of"):
        SplitLoraExperts(ours, "fp8")
    with pytest.raises(ValueError, match="needs the bf16"):
        SplitLoraExperts(ours, "bf16")


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1", reason="the Triton backend interpreted")
def test_nf4moe_variant_rows(layer_and_inputs):
    """nf4moe's extra fwd+bwd rows: without an sm_90 GPU no second backward kernel; recompute mode gives the default
    row's gradients (its own kernels, the same math) and leaves the module's mode as it was; the forward alone runs
    no backward."""
    from nf4moe.benchmarks.train import _ours_variants, _step_fn, fn_mod

    ours_ref, _, (x, idx, w, gout) = layer_and_inputs
    ours = QuantGroupedExperts(4, 128, 64, lora_rank=16, lora_alpha=32, backend="triton")
    ours.load_state_dict(ours_ref.state_dict())
    x, w = x.float(), w.float()
    variants = _ours_variants(ours, x, idx, w, 16)
    assert [n.split(", ")[1] for n in variants] == ["recompute mode", "training forward alone"]
    fn, params, backward = variants["nf4moe (LoRA r=16), recompute mode"]
    assert backward and params == list(ours.parameters())
    got = step_grads(fn_mod(fn, ours), x, idx, w, gout.float())
    assert ours.recompute is False
    ref = step_grads(ours, x, idx, w, gout.float())
    assert max(rel_errors(got, ref).values()) < 1e-5
    fn, params, backward = variants["nf4moe (LoRA r=16), training forward alone"]
    assert not backward
    _step_fn(fn, x.requires_grad_(), idx, w, params, gout, backward)()
    assert all(p.grad is None for p in params)
