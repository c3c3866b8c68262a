"""torch.compile's mutation analysis of every kernel a training step (and a decode-size inference call)
launches (tests/traced_analysis.py).

On a GPU, a kernel whose lowering fails in torch's analysis is taken to write every tensor argument, and a
compiled layer's backward then fails on the routing weights (a leaf that requires grad): H100, torch 2.11,
session 22, from ``tl.multiple_of`` on a scalar that torch 2.11 makes a constant.  CI has no GPU, so this
replays a real CPU step's op calls in a subprocess without the interpreter and checks each launch there.
"""
from __future__ import annotations

import json

import pytest
import torch

import nf4moe
from nf4moe.kernels import ops
from nf4moe.kernels.plan import LaunchPlan
from triton_cases import DEV, inference_step_calls, run_uninterpreted, training_step_calls


@pytest.mark.skipif(DEV != "cpu", reason="replays a CPU step's calls; on a GPU test_torch_compile runs for real")
@pytest.mark.parametrize("t", [2, 40])  # decode sizes; the MMA GEMM with precomputed X·Aᵀ and the combine kernel
def test_every_traced_launch_passes_torchs_mutation_analysis(monkeypatch, tmp_path, t):
    """At the decode size the calls of one inference call are replayed too, as torch.compile traces it (the plan
    of a traced call: no routing launch with X·Aᵀ), so the decode GEMV with its fused combine is analysed
    whichever kernel the training forward's plan runs."""
    calls = training_step_calls(monkeypatch, t, seed=90)
    train_plan = LaunchPlan.from_key(ops.LayerInputs(*next(a for name, a in calls if name == "moe_experts")).plan)
    kernels_of = {"gemv": "nf4_moe_gemv_kernel", "gemm": "nf4_moe_gemm_kernel"}
    want = {kernels_of[train_plan.up], kernels_of[train_plan.down], "nf4_moe_gemm_t_kernel", "lora_grad_kernel",
            "lora_xa_kernel", "routing_kernel", "combine_kernel"}
    if t == 2:
        with nf4moe.plan_overrides(xa_in_routing=False):
            infer = inference_step_calls(monkeypatch, t, seed=91)
        plan = LaunchPlan.from_key(ops.LayerInputs(*infer[-1][1]).plan)
        assert plan.kernels == ("gemv", "gemv") and plan.combine == "gemv" and plan.up_xa == "kernel", plan
        calls += infer
        want.add("nf4_moe_gemv_kernel")
    torch.save(calls, tmp_path / "calls.pt")
    report = json.loads(run_uninterpreted("traced_analysis.py", str(tmp_path / "calls.pt")))
    kernels = {r["kernel"] for r in report}
    assert want <= kernels, kernels
    for r in report:
        where = f"{r['op']}: {r['kernel']}"
        assert r["torch_error"] is None, f"{where}: torch's analysis failed ({r['torch_error']})"
        assert r["constant_scalars_error"] is None, \
            f"{where}: does not lower with constant scalars (torch 2.11's analysis): {r['constant_scalars_error']}"
        assert not r["written_float_inputs"], f"{where}: torch takes inputs {r['written_float_inputs']} as written"
        assert r["writes"], f"{where}: no output found written"
