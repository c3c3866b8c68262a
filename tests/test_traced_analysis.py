"""torch.compile's mutation analysis of every kernel a training step launches (tests/traced_analysis.py).

On a GPU, a kernel whose lowering fails in torch's analysis is taken to write every tensor argument, and a
compiled layer's backward then fails on the routing weights (a leaf that requires grad): H100, torch 2.11,
session 22, from ``tl.multiple_of`` on a scalar that torch 2.11 makes a constant.  CI has no GPU, so this
replays a real CPU step's op calls in a subprocess without the interpreter and checks each launch there.
"""
from __future__ import annotations

import json

import pytest
import torch

from triton_cases import DEV, run_uninterpreted, training_step_calls


@pytest.mark.skipif(DEV != "cpu", reason="replays a CPU step's calls; on a GPU test_torch_compile runs for real")
@pytest.mark.parametrize("t", [2, 40])  # the decode GEMV with its fused combine; the MMA GEMM and the combine kernel
def test_every_traced_launch_passes_torchs_mutation_analysis(monkeypatch, tmp_path, t):
    calls = training_step_calls(monkeypatch, t, seed=90)
    torch.save(calls, tmp_path / "calls.pt")
    report = json.loads(run_uninterpreted("traced_analysis.py", str(tmp_path / "calls.pt")))
    kernels = {r["kernel"] for r in report}
    gemm = "nf4_moe_gemv_kernel" if t == 2 else "nf4_moe_gemm_kernel"
    assert {gemm, "nf4_moe_gemm_t_kernel", "lora_grad_kernel", "routing_kernel"} <= kernels, kernels
    for r in report:
        where = f"{r['op']}: {r['kernel']}"
        assert r["torch_error"] is None, f"{where}: torch's analysis failed ({r['torch_error']})"
        assert r["constant_scalars_error"] is None, \
            f"{where}: does not lower with constant scalars (torch 2.11's analysis): {r['constant_scalars_error']}"
        assert not r["written_float_inputs"], f"{where}: torch takes inputs {r['written_float_inputs']} as written"
        assert r["writes"], f"{where}: no output found written"
