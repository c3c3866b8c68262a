"""The launch plan's choices (nf4moe/kernels/plan.py), on the CPU, without launching anything.

Each case names a call (shapes of a real model, device, dtype, training or inference, capture, tracing) and the
kernels the plan must pick for it; the thresholds are the measured ones plan.py documents.  The overrides
(``nf4moe.plan_overrides``) are checked both where they apply and where they cannot (a ValueError naming them).
"""
from __future__ import annotations

import os

import pytest
import torch

import nf4moe
from nf4moe.kernels import plan as P
from nf4moe.kernels.plan import LaunchPlan, PlanInputs, PlanOverrides, make_plan

QWEN3 = dict(num_experts=128, hidden=2048, intermediate=768, top_k=8)
GLM = dict(num_experts=128, hidden=4096, intermediate=1408, top_k=8)
DSV3 = dict(num_experts=256, hidden=7168, intermediate=2048, top_k=8)
H100 = dict(cuda=True, capability=(9, 0), interpret=False, gluon=True)


def call(tokens: int, shape=QWEN3, **kw) -> PlanInputs:
    """An eager bf16 inference call with LoRA r=16 on an H100 unless ``kw`` says otherwise."""
    base = dict(tokens=tokens, rank=16, blocksize=64, dtype=torch.bfloat16, index_ok=True, x_aligned=True,
                training=False, recompute=False, capturing=False, traced=False, **H100)
    base.update(shape)
    base.update(kw)
    return PlanInputs(**base)


def plan(tokens: int, shape=QWEN3, ov: PlanOverrides = P.NO_OVERRIDES, **kw) -> LaunchPlan:
    return make_plan(call(tokens, shape, **kw), ov)


# ------------------------------------------------------------------------------------------ defaults
def test_decode_runs_the_gemvs_with_xa_in_routing_and_the_fused_combine():
    p = plan(1)
    assert (p.routing, p.up, p.down) == ("kernel_xa", "gemv", "gemv")
    assert (p.up_xa, p.down_xa, p.combine) == ("routing", "kernel", "gemv")
    assert not (p.pdl or p.gemv_xa_early or p.save_preact) and p.wgmma_tile is None
    assert p.check_ids_in_kernel


def test_capture_takes_pdl_early_xa_and_the_combine_kernel():
    p = plan(1, capturing=True)
    assert (p.up, p.down, p.combine) == ("gemv", "gemv", "kernel")
    assert p.pdl and p.gemv_xa_early and p.capturing
    assert plan(16, capturing=True).pdl and not plan(16, capturing=True).gemv_xa_early  # the GEMMs: no GEMV


@pytest.mark.parametrize("tokens,kernel,xa", [(8, "gemv", "kernel"), (9, "gemm", "kernel"), (16, "gemm", "kernel"),
                                              (128, "gemm", "kernel"), (1023, "gemm", "kernel"),
                                              (1024, "wgmma", "kernel"), (8192, "wgmma", "kernel")])
def test_thresholds_of_the_projection_kernels(tokens, kernel, xa):
    """GEMV up to 64 routed rows (T=8 at top-8), the Gluon GEMM from 8192 rows and 64 per expert (T=1024)."""
    p = plan(tokens)
    assert p.kernels == (kernel, kernel)
    assert p.down_xa == xa
    assert p.routing == ("kernel_xa" if kernel == "gemv" else "kernel")


def test_xa_in_the_gemm_loop_up_to_64_rows():
    p = plan(4, ov=PlanOverrides(up="gemm", down="gemm"))  # 32 routed rows
    assert (p.up_xa, p.down_xa, p.routing) == ("loop", "loop", "kernel")
    assert plan(9, ov=PlanOverrides(gemv_max_rows=0)).up_xa == "kernel"  # 72 rows: precomputed


def test_the_wide_tile_from_256_rows_per_expert():
    assert plan(1024).wgmma_tile == (128, 256)
    assert plan(4095).wgmma_tile == (128, 256)
    assert plan(4096).wgmma_tile == (256, 128)  # 32768 rows = 256 per expert of 128
    assert plan(8192, GLM).wgmma_tile == (256, 128)


def test_many_experts_keep_the_triton_gemm_below_64_rows_per_expert():
    assert plan(1024, DSV3).kernels == ("gemm", "gemm")  # 8192 rows, 32 per expert of 256
    assert plan(2048, DSV3).kernels == ("wgmma", "wgmma")
    assert plan(8192, DSV3).wgmma_tile == (256, 128)  # 65536 rows: 256 per expert of 256
    assert plan(4096, DSV3).wgmma_tile == (128, 256)
    assert plan(8192, DSV3, ov=PlanOverrides(wgmma_min_rows=1 << 20)).kernels == ("gemm", "gemm")


@pytest.mark.parametrize("kw,why", [
    (dict(capability=(8, 0)), "sm_80"), (dict(capability=(10, 0)), "sm_100"), (dict(gluon=False), "no Gluon"),
    (dict(dtype=torch.float32), "fp32"), (dict(blocksize=32), "blocksize 32"), (dict(traced=True), "traced"),
    (dict(cuda=False, capability=None, interpret=True, gluon=False), "interpreter"),
])
def test_the_gluon_gemm_only_where_it_runs(kw, why):
    assert plan(1024, **kw).kernels == ("gemm", "gemm"), why


def test_misaligned_hidden_states_keep_the_up_projection_on_the_triton_gemm():
    assert plan(1024, x_aligned=False).kernels == ("gemm", "wgmma")  # the down GEMM reads our own buffer


def test_training_stores_pre_activations_through_the_gemms():
    """The up projection stores the pre-activations (the GEMMs only); the down projection stores nothing and keeps
    the decode GEMV with its fused combine at decode sizes."""
    p = plan(1, training=True)
    assert p.kernels == ("gemm", "gemv") and p.save_preact and p.combine == "gemv"
    assert (p.routing, p.up_xa, p.down_xa) == ("kernel", "kernel", "kernel")  # X·A_upᵀ saved by lora_xa
    assert plan(9, training=True).kernels == ("gemm", "gemm")
    assert plan(1, training=True, ov=PlanOverrides(down="gemm")).down_xa == "loop"
    assert not plan(1, training=True, capturing=True).pdl  # autograd launches through wrap_triton
    assert plan(8192, training=True).kernels == ("wgmma", "wgmma")


def test_recompute_mode_runs_the_inference_kernels_and_saves_nothing():
    p = plan(1, training=True, recompute=True)
    assert p.kernels == ("gemv", "gemv") and not p.save_preact
    assert p.routing == "kernel"  # autograd records the call: no direct routing launch with X·Aᵀ


def test_traced_calls_launch_through_wrap_triton():
    p = plan(1, traced=True, capturing=True)
    assert p.routing == "kernel" and p.up_xa == "kernel"
    assert not p.pdl and not p.check_ids_in_kernel
    assert plan(1, traced=True).combine == "gemv"  # the fused combine takes fresh counters when traced


def test_pdl_needs_sm90_and_the_interpreter_runs_none():
    assert not plan(1, capturing=True, capability=(8, 0)).pdl
    assert plan(1, capturing=True, capability=(10, 0)).pdl
    cpu = dict(cuda=False, capability=None, interpret=True, gluon=False)
    p = plan(1, **cpu)
    assert (p.routing, p.up, p.down) == ("kernel_xa", "gemv", "gemv") and not p.pdl
    assert not p.check_ids_in_kernel  # CPU tensors: the offsets are checked after the routing


def test_routing_falls_back_to_torch_where_the_kernels_cannot_take_it():
    assert plan(1, index_ok=False).routing == "torch"
    assert plan(1, index_ok=False).up_xa == "kernel"
    assert plan(40000).routing == "torch"  # 320000 pairs: past the chunked sort
    assert plan(128).routing == "kernel"  # 1024 pairs: the one-program sort; the chunked one above
    assert plan(129).routing == "kernel"


def test_no_lora_no_xa():
    p = plan(1, rank=0)
    assert (p.up_xa, p.down_xa, p.routing) == ("none", "none", "kernel") and not p.gemv_xa_early
    assert not plan(1, rank=0, capturing=True).gemv_xa_early


def test_a_cpu_call_outside_the_interpreter_has_no_plan():
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        plan(1, cuda=False, capability=None, interpret=False, gluon=False)


# ------------------------------------------------------------------------------------------ overrides
def test_overrides_force_what_can_run():
    ov = PlanOverrides(up="gemm", down="wgmma", wgmma_tile="256x128", combine="kernel", pdl=True,
                       xa_in_routing=False, gemv_xa_early=True, xa="kernel", routing="torch")
    p = plan(16, ov=ov)
    assert (p.up, p.down, p.wgmma_tile, p.combine, p.pdl, p.up_xa, p.routing) == (
        "gemm", "wgmma", (256, 128), "kernel", True, "kernel", "torch")
    assert not p.gemv_xa_early  # no GEMV runs: nothing to sum early
    p = plan(1, ov=PlanOverrides(xa_in_routing=False, combine="kernel", gemv_xa_early=True))
    assert (p.routing, p.up_xa, p.combine, p.gemv_xa_early) == ("kernel", "kernel", "kernel", True)
    assert plan(16, ov=PlanOverrides(gemv_max_rows=128)).kernels == ("gemv", "gemv")
    assert plan(1, ov=PlanOverrides(gemv_max_rows=0)).kernels == ("gemm", "gemm")


@pytest.mark.parametrize("ov,kw,name", [
    (dict(up="wgmma"), dict(capability=(8, 0)), "up='wgmma'"),
    (dict(down="wgmma"), dict(dtype=torch.float32), "down='wgmma'"),
    (dict(up="gemv"), dict(training=True), "up='gemv'"),
    (dict(xa="loop", up="gemm"), dict(training=True), "xa='loop'"),
    (dict(combine="gemv"), {}, "combine='gemv'"),  # T=16: the down GEMM
    (dict(pdl=True), dict(cuda=False, capability=None, interpret=True, gluon=False), "pdl=True"),
    (dict(pdl=True), dict(training=True), "pdl=True"),
    (dict(routing="kernel"), dict(index_ok=False), "routing='kernel'"),
    (dict(xa_in_routing=True), dict(training=True), "xa_in_routing=True"),
])
def test_overrides_that_cannot_run_raise_naming_themselves(ov, kw, name):
    with pytest.raises(ValueError, match=name.replace("(", r"\(")):
        plan(16 if "combine" in ov else 1, ov=PlanOverrides(**ov), **kw)


@pytest.mark.parametrize("kw,match", [(dict(up="fast"), "up must be one of"), (dict(wgmma_tile="64x64"), "wgmma_tile"),
                                      (dict(pdl=1), "pdl must be True or False"),
                                      (dict(gemv_max_rows=-1), "gemv_max_rows must be an int >= 0"),
                                      (dict(wgmma_min_rows=0), "wgmma_min_rows"), (dict(speed=3), "unknown choice")])
def test_plan_overrides_checks_names_and_values(kw, match):
    with pytest.raises(ValueError, match=match):
        with nf4moe.plan_overrides(**kw):
            pass


def test_plan_overrides_nest_and_restore():
    assert P.current_overrides() == P.NO_OVERRIDES
    with nf4moe.plan_overrides(up="gemm") as outer:
        assert outer == PlanOverrides(up="gemm")
        with nf4moe.plan_overrides(down="gemm", up="gemv"):
            assert P.current_overrides() == PlanOverrides(up="gemv", down="gemm")
        assert P.current_overrides() == outer
    assert P.current_overrides() == P.NO_OVERRIDES
    with pytest.raises(RuntimeError):
        with nf4moe.plan_overrides(pdl=False):
            raise RuntimeError("inside")
    assert P.current_overrides() == P.NO_OVERRIDES


# ------------------------------------------------------------------------------------------ the plan itself
@pytest.mark.parametrize("tokens,kw", [(1, {}), (1, dict(capturing=True)), (16, {}), (4096, {}), (1, dict(training=True)),
                                       (1024, dict(traced=True)), (1, dict(rank=0, index_ok=False))])
def test_the_key_reads_back_to_the_same_plan(tokens, kw):
    p = plan(tokens, **kw)
    assert LaunchPlan.from_key(p.key) == p
    assert "," not in p.key.split("=", 1)[0]


def test_make_plan_is_pure_and_cached():
    assert plan(16) is plan(16)
    assert plan(16) == make_plan(call(16))
    assert plan(16) != plan(16, capturing=True)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the CPU suite runs the Triton backend interpreted")
def test_the_module_reports_its_plan_without_launching(monkeypatch):
    from nf4moe.kernels import dispatch, launch, ops

    def refuse(*a, **k):
        raise AssertionError("launch_plan launched a kernel")

    for mod, name in ((launch, "launch"), (launch, "launch_tuned"), (ops, "run"), (dispatch, "projection")):
        monkeypatch.setattr(mod, name, refuse)
    m = nf4moe.QuantGroupedExperts(4, 128, 64, lora_rank=8)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    idx = torch.randint(0, 4, (3, 2))
    w = torch.rand(3, 2, dtype=torch.bfloat16)
    with torch.no_grad():
        p = m.launch_plan(x, idx, w)
        assert (p.up, p.down, p.routing) == ("gemv", "gemv", "kernel_xa")
        with nf4moe.plan_overrides(up="gemm", down="gemm"):
            assert m.launch_plan(x, idx, w).kernels == ("gemm", "gemm")
    assert m.launch_plan(x, idx, w).save_preact  # LoRA factors require grad: a training call
    with pytest.raises(ValueError, match="hidden_states"):
        m.launch_plan(torch.randn(3, 64), idx, w)


# ------------------------------------------------------------------------------------------ backward
def test_backward_kernel_choice(monkeypatch):
    """Training calls name the backward's transposed GEMMs: the Gluon GEMM on sm_90 with 16-bit activations from
    the threshold (none by default until the kernel has run on a GPU), the Triton GEMM below it, elsewhere and
    under tracing; inference calls none."""
    assert plan(8192).bwd == "none"
    assert P.BWD_WGMMA_MIN_ROWS is None and plan(8192, training=True).bwd == "gemm"
    monkeypatch.setattr(P, "BWD_WGMMA_MIN_ROWS", 8192)
    make_plan.cache_clear()
    try:
        assert plan(1024, training=True).bwd == "wgmma"
        assert plan(1024, training=True, recompute=True).bwd == "wgmma"
        assert plan(1023, training=True).bwd == "gemm"
        assert plan(1024, training=True, traced=True).bwd == "gemm"
        assert plan(1024, training=True, dtype=torch.float32).bwd == "gemm"
        assert plan(1024, training=True, capability=(8, 0)).bwd == "gemm"
        assert plan(1024, training=True, gluon=False).bwd == "gemm"
        assert plan(1024, training=True, hidden=2048 + 32).bwd == "gemm"
        assert plan(1024, training=True, num_experts=512).bwd == "gemm"  # 16 rows per expert
        # the plan's key carries the choice to the backward ops
        assert LaunchPlan.from_key(plan(1024, training=True).key).bwd == "wgmma"
    finally:
        make_plan.cache_clear()


def test_backward_overrides():
    assert plan(64, ov=PlanOverrides(bwd="wgmma"), training=True).bwd == "wgmma"
    assert plan(8192, ov=PlanOverrides(bwd="gemm"), training=True).bwd == "gemm"
    assert plan(1024, ov=PlanOverrides(bwd_wgmma_min_rows=8), training=True).bwd == "wgmma"
    with pytest.raises(ValueError, match="bwd='wgmma' cannot run here: it takes 16-bit"):
        plan(8192, ov=PlanOverrides(bwd="wgmma"), training=True, dtype=torch.float32)
    with pytest.raises(ValueError, match="bwd must be one of"):
        PlanOverrides(bwd="gemv")
    with pytest.raises(ValueError, match="bwd_wgmma_min_rows must be an int"):
        PlanOverrides(bwd_wgmma_min_rows=0)
