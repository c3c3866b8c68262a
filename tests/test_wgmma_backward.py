"""The backward's Gluon GEMMs (grouped_gemm_wgmma_bwd.py, the launch plan's ``bwd="wgmma"``) on an sm_90 GPU.

Every gradient against the fp64 reference (test_triton_backward.check) with the outputs' buffers NaN-poisoned, over
the cases the kernel's masks and tile table must get right: T = 0 and 1, a tile's worth and more of rows per expert,
empty experts, one hot expert, sentinel ids, column tiles cut by I and H (odd multiples of 64), KR of a few steps,
LoRA ranks 0, 8 (padded to 16) and 16, fp16 and bf16, double quant on and off, frozen inputs, recompute mode.  Then
the Gluon and Triton backward against each other on one call.  Skipped without an sm_90 GPU and Gluon.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

import nf4moe

from test_triton_backward import ALL, check, run_layer
from triton_cases import DEV, make_layer, routing

_SM90 = DEV == "cuda" and torch.cuda.get_device_capability() == (9, 0)
_GLUON = importlib.util.find_spec("triton.experimental.gluon.language.nvidia.hopper") is not None
pytestmark = pytest.mark.skipif(not (_SM90 and _GLUON), reason="needs an sm_90 GPU with Triton's Gluon")

WGMMA = dict(bwd="wgmma")
CASES = [
    # (T, E, H, I, K, mode)
    (1, 4, 128, 64, 2, "random"),
    (7, 4, 192, 320, 2, "random"),
    (300, 4, 256, 128, 2, "random"),       # > 128 rows per expert: several row tiles per expert
    (200, 8, 192, 320, 3, "sentinels"),    # column tiles cut by I (320) and H (192), dropped pairs
    (150, 6, 128, 192, 2, "one_expert"),   # one hot expert, the others empty
    (64, 16, 128, 64, 4, "random"),        # experts without rows
]


def _layer(e, h, i, dtype, *, rank=16, nested=True, seed=0, act="silu"):
    """A layer (fp32 LoRA factors) whose calls take ``dtype`` activations."""
    return make_layer(e, h, i, rank=rank, nested=nested, seed=seed, act=act)


@pytest.mark.parametrize("t,e,h,i,k,mode", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradients_against_fp64(t, e, h, i, k, mode, dtype, nan_new_empty):
    m = _layer(e, h, i, dtype, seed=t + e)
    x = torch.randn(t, h, generator=torch.Generator().manual_seed(t)).to(DEV, dtype)
    idx, w = routing(t, e, k, seed=t + 1, mode=mode)
    with nf4moe.plan_overrides(**WGMMA):
        assert m.launch_plan(x, idx, w).bwd == "wgmma"
        check(m, x, idx, w.to(dtype), seed=t + 2)


@pytest.mark.parametrize("rank,nested,act", [(0, True, "silu"), (8, False, "silu"), (16, True, "gelu_tanh"),
                                             (16, False, "gelu")])
def test_ranks_quantization_and_activations(rank, nested, act, nan_new_empty):
    m = _layer(8, 192, 320, torch.bfloat16, rank=rank, nested=nested, seed=rank + 3, act=act)
    x = torch.randn(180, 192, generator=torch.Generator().manual_seed(4)).to(DEV, torch.bfloat16)
    idx, w = routing(180, 8, 2, seed=5)
    with nf4moe.plan_overrides(**WGMMA):
        check(m, x, idx, w.to(torch.bfloat16), seed=6)


@pytest.mark.parametrize("wants", [("x",), ("w",), ("A.down_proj",), ("B.down_proj",), ("A.gate_up_proj",),
                                   ("B.gate_up_proj",), ("x", "w"), ("A.gate_up_proj", "B.down_proj")])
def test_frozen_inputs(wants, nan_new_empty):
    m = _layer(8, 128, 192, torch.bfloat16, seed=7)
    x = torch.randn(160, 128, generator=torch.Generator().manual_seed(8)).to(DEV, torch.bfloat16)
    idx, w = routing(160, 8, 2, seed=9)
    with nf4moe.plan_overrides(**WGMMA):
        check(m, x, idx, w.to(torch.bfloat16), wants, seed=10)


def test_recompute_mode(nan_new_empty):
    m = _layer(8, 192, 320, torch.bfloat16, seed=11)
    m.recompute = True
    x = torch.randn(170, 192, generator=torch.Generator().manual_seed(12)).to(DEV, torch.bfloat16)
    idx, w = routing(170, 8, 3, seed=13, mode="sentinels")
    with nf4moe.plan_overrides(**WGMMA):
        check(m, x, idx, w.to(torch.bfloat16), seed=14)


def test_t_zero():
    m = _layer(4, 128, 64, torch.bfloat16)
    x = torch.randn(0, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    with nf4moe.plan_overrides(**WGMMA):
        out = m(x, torch.zeros(0, 2, dtype=torch.long, device=DEV), torch.rand(0, 2, device=DEV))
        out.sum().backward()
    assert x.grad.shape == (0, 128)
    for p in m.lora_A.values():
        assert torch.equal(p.grad, torch.zeros_like(p))


def test_gluon_and_triton_backward_agree():
    """Both backward kernels on one larger call (the forward the same): each gradient within bf16 rounding of the
    other's, and the Gluon backward deterministic (bit-identical on a second run)."""
    m = _layer(16, 512, 256, torch.bfloat16, seed=15)
    g = torch.Generator().manual_seed(16)
    x = torch.randn(2048, 512, generator=g).to(DEV, torch.bfloat16)
    idx, w = routing(2048, 16, 4, seed=17)
    w = w.to(torch.bfloat16)
    dout = torch.randn(2048, 512, generator=g).to(DEV, torch.bfloat16)
    res = {}
    for kernel in ("gemm", "wgmma", "wgmma"):
        with nf4moe.plan_overrides(bwd=kernel):
            res.setdefault(kernel, []).append(run_layer(m, x, idx, w, dout, ALL)[1])
    a, b = res["wgmma"]
    for name in ALL:
        assert torch.equal(a[name], b[name]), f"d{name} differs between two runs"
        ref = res["gemm"][0][name].double()
        err = float((a[name].double() - ref).norm() / ref.norm())
        assert err < 2e-2, f"d{name}: Gluon and Triton backward differ by {err:.3g}"
