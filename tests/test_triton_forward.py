"""The Triton backend against the fp32 reference on the same NF4 weights.

On the CPU this runs under TRITON_INTERPRET=1 (./run tests sets it); on a GPU the same tests run compiled.
Bounds: the reference computes in fp32 from the same dequantized weights, so the only differences are
the kernel's rounding of operands and intermediates to the activation dtype (bf16: 8 mantissa bits,
about 4e-3 relative per rounding; the weight tile, the SwiGLU intermediate, the weighted slot outputs and
the final output are each rounded once, hence 2e-2), fp16 (11 bits: 5e-3) and fp32 (tf32 dot on GPU, 10-bit operands,
about 1e-3 per product and several products in a row, hence 5e-3; exact fp32 in the interpreter).

Which kernels a call runs is the launch plan's choice (nf4moe.kernels.plan): tests force a path with
``nf4moe.plan_overrides(...)``, check the choice on the plan (``QuantGroupedExperts.launch_plan``) and, where
it matters, count the launches of the leaf launchers in ``nf4moe.kernels.dispatch`` (which imports them by name).
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
import triton

import nf4moe
from nf4moe.reference import Lora, moe_forward

from triton_cases import DEV, assert_negative_ids_trap, count_calls, make_layer, refill, routing, training_step_calls
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (INTERP or DEV == "cuda"), reason="needs a GPU or TRITON_INTERPRET=1")

BOUND = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 5e-3}


def reference(m, x, idx, w):
    lg = Lora(m.lora_A["gate_up_proj"], m.lora_B["gate_up_proj"]) if m.lora_rank else None
    ld = Lora(m.lora_A["down_proj"], m.lora_B["down_proj"]) if m.lora_rank else None
    return moe_forward(x.float(), idx, w.float(), lambda e: m.gate_up_nf4.dequantize_expert(e, torch.float32),
                       lambda e: m.down_nf4.dequantize_expert(e, torch.float32), num_experts=m.num_experts,
                       act=m.act, lora_gate_up=lg, lora_down=ld, lora_scaling=m.scaling)


def rel_err(out, ref):
    return float((out.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_matches_reference(m, x, idx, w, bound):
    """The layer's inference output against the fp32 reference, relative error below ``bound``."""
    with torch.no_grad():
        err = rel_err(m(x, idx, w), reference(m, x, idx, w))
    assert err < bound, err


@pytest.fixture
def overrides():
    """``overrides(**choices)``: ``nf4moe.plan_overrides(**choices)`` in force until the end of the test (calls
    add to each other, as nested blocks do)."""
    with contextlib.ExitStack() as stack:
        yield lambda **choices: stack.enter_context(nf4moe.plan_overrides(**choices))


def natural_k_configs() -> list:
    """GEMM configs of 64-row tiles, whose K steps run in natural column order (the GEMM takes MMA k order for
    BLOCK_M <= 32 only): a K step of 64 (one or two NF4 blocks) and of 32 (for K = 96), then the fallback."""
    from nf4moe.kernels import configs

    stages = 1 if INTERP else 3
    return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=stages),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=stages),
            configs._fallback()]


@pytest.fixture(params=["gemv", "gemm", "gemm_natural_k"])
def kernel_path(request, monkeypatch):
    """Both inference kernels, each forced at every size by the plan (``plan_overrides(up=..., down=...)``): the
    decode GEMV (grouped_gemv.py; by default up to 64 routed rows) and the MMA GEMM (the default above), the
    GEMM both as the autotuner picks it (tiles of at most 32 rows at these sizes: K steps in MMA k order,
    nf4_decode.mma_k_order) and with 64-row tiles (natural K order), reached by giving its autotuner
    ``natural_k_configs`` and pinning the first that fits (``configs.pinned``, which the pruner reads; the
    launcher's config cache and the autotuner's own start empty).  Afterwards: the forced kernel really ran,
    and with the tiles asked for."""
    from nf4moe.kernels import configs
    from nf4moe.kernels import grouped_gemm as gg
    from nf4moe.kernels import grouped_gemv as gv
    from nf4moe.kernels import launch as L

    if request.param == "gemm_natural_k":
        cfgs = natural_k_configs()
        monkeypatch.setattr(gg.nf4_moe_gemm_kernel, "configs", cfgs)
        monkeypatch.setattr(gg.nf4_moe_gemm_kernel, "cache", {})
        monkeypatch.setattr(configs, "pinned", lambda: cfgs[:1])
        monkeypatch.setattr(L, "_TUNED", {})
    ran = []  # (launch kind, config) of every tuned launch
    for mod in (gg, gv):
        def spy(kernel, grid, key, *args, _real=mod.launch_tuned, **kw):
            _real(kernel, grid, key, *args, **kw)
            ran.append((key[0], L._TUNED[key]))

        monkeypatch.setattr(mod, "launch_tuned", spy)
    kernel = "gemv" if request.param == "gemv" else "gemm"
    with nf4moe.plan_overrides(up=kernel, down=kernel):
        yield request.param
    kinds = {kind for kind, _ in ran}
    if kernel == "gemv":
        assert "gemv" in kinds and kinds <= {"gemv", "gemv_combine"}, kinds
    else:
        assert kinds == {"gemm"}, kinds
    if request.param == "gemm_natural_k":
        assert {cfg["BLOCK_M"] for _, cfg in ran} == {64}, ran


CASES = [
    # (T, E, H, I, K, mode)
    (1, 4, 128, 64, 2, "random"),
    (7, 4, 128, 64, 2, "random"),        # T smaller than a tile
    (40, 8, 192, 320, 3, "random"),      # odd multiples of the NF4 block, several row tiles
    (33, 4, 128, 64, 4, "random"),       # K == E
    (20, 6, 128, 64, 2, "one_expert"),   # one expert gets every token, the rest none
    (25, 8, 128, 128, 3, "sentinels"),   # expert-parallel sentinel ids dropped
]


@pytest.mark.parametrize("t,e,h,i,k,mode", CASES)
@pytest.mark.parametrize("rank", [0, 8, 16])
def test_forward_matches_reference(t, e, h, i, k, mode, rank):
    m = make_layer(e, h, i, rank=rank, nested=(t % 2 == 1), seed=t + rank)
    x = torch.randn(t, h, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(t, e, k, seed=t * 7 + rank, mode=mode)
    with torch.no_grad():
        out = m(x, idx, w)
        ref = reference(m, x, idx, w)
    assert out.dtype == torch.bfloat16 and out.shape == (t, h)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < BOUND[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.usefixtures("kernel_path")
def test_dtypes_and_double_quant(dtype, nested):
    m = make_layer(4, 128, 64, rank=8, nested=nested, seed=3)
    x = torch.randn(19, 128, device=DEV, dtype=dtype)
    idx, w = routing(19, 4, 2, seed=5)
    with torch.no_grad():
        out = m(x, idx, w.to(dtype))
        ref = reference(m, x, idx, w.to(dtype))
    assert out.dtype == dtype
    assert rel_err(out, ref) < BOUND[dtype]


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.usefixtures("kernel_path")
def test_activations(act):
    m = make_layer(4, 128, 64, rank=0, act=act, seed=11)
    x = torch.randn(9, 128, device=DEV, dtype=torch.float32)
    idx, w = routing(9, 4, 2, seed=12)
    assert_matches_reference(m, x, idx, w, BOUND[torch.float32])


def test_t_zero_and_all_sentinels():
    m = make_layer(4, 128, 64, rank=8)
    x = torch.randn(0, 128, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(0, 4, 2, seed=1)
    assert m(x, idx, w).shape == (0, 128)
    x = torch.randn(3, 128, device=DEV, dtype=torch.bfloat16)
    idx = torch.full((3, 2), 4, device=DEV)
    out = m(x, idx, torch.rand(3, 2, device=DEV))
    assert torch.equal(out, torch.zeros_like(out))  # every slot dropped: exactly zero, nothing unwritten


@pytest.mark.parametrize("blocksize,inter", [(32, 96), (64, 192)])
@pytest.mark.usefixtures("kernel_path")
def test_small_blocksize_and_k_step_fallback(blocksize, inter):
    """Blocksize 32 forces the K step down to 32 (one absmax per tile row) or a multiple of it (a step over two
    blocks); I=96 is not a multiple of the default K step (64), so the down projection takes the fallback config
    there too (with 64-row tiles, natural_k_configs' 32-column step)."""
    m = make_layer(4, 128, inter, rank=8, blocksize=blocksize, seed=40 + blocksize)
    x = torch.randn(11, 128, device=DEV, dtype=torch.float32)
    idx, w = routing(11, 4, 2, seed=41)
    assert_matches_reference(m, x, idx, w, BOUND[torch.float32])


@pytest.mark.usefixtures("kernel_path")
def test_blocksize_128_and_non_contiguous_input():
    m = make_layer(4, 256, 128, rank=8, blocksize=128, seed=4)
    xfull = torch.randn(12, 512, device=DEV, dtype=torch.float32)
    x = xfull[:, ::2]  # strided columns: the kernel takes strides, no copy needed
    idx, w = routing(12, 4, 2, seed=6)
    assert_matches_reference(m, x, idx, w, BOUND[torch.float32])


@pytest.mark.usefixtures("kernel_path")
def test_outputs_poisoned_before_run(nan_new_empty):
    """Every intermediate buffer starts as NaN: an element the kernels forget to write shows up."""
    m = make_layer(8, 128, 64, rank=8, seed=9)
    x = torch.randn(21, 128, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(21, 8, 3, seed=10, mode="sentinels")
    with torch.no_grad():
        out = m(x, idx, w)
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(m, x, idx, w)) < BOUND[torch.bfloat16]


def test_negative_ids_raise():
    m = make_layer(4, 128, 64)
    x = torch.randn(3, 128, device=DEV)
    idx = torch.tensor([[0, 1], [-1, 2], [3, 0]], device=DEV)
    if DEV == "cpu":
        with pytest.raises(ValueError, match="top_k_index"):
            m(x, idx, torch.rand(3, 2, device=DEV))
        return
    # On a GPU the routing kernel traps (a device-side assert): in a child process, whose CUDA context it ends.
    assert_negative_ids_trap(
        "import torch\nfrom triton_cases import make_layer\nm = make_layer(4, 128, 64)\n"
        "idx = torch.tensor([[0, 1], [-1, 2], [3, 0]], device='cuda')",
        "m(torch.randn(3, 128, device='cuda'), idx, torch.rand(3, 2, device='cuda'))")


def test_deterministic():
    m = make_layer(4, 128, 64, rank=8, seed=2)
    x = torch.randn(30, 128, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(30, 4, 2, seed=3)
    with torch.no_grad():
        assert torch.equal(m(x, idx, w), m(x, idx, w))


def test_auto_backend_is_triton_when_interpreting_or_cuda():
    m = make_layer(4, 128, 64)
    m.backend = "auto"
    assert m.resolve_backend(torch.zeros(1, device=DEV)) == "triton"


def test_torch_compile_fullgraph():
    m = make_layer(4, 128, 64, rank=8, seed=21)
    x = torch.randn(10, 128, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(10, 4, 2, seed=22)
    compiled = torch.compile(m, fullgraph=True, backend="eager" if DEV == "cpu" else "inductor")
    with torch.no_grad():
        out = compiled(x, idx, w)
        ref = reference(m, x, idx, w)
    assert rel_err(out, ref) < BOUND[torch.bfloat16]


def layer_op_inputs(m, x, idx, w, plan):
    """The inputs of ``nf4moe::moe_experts`` for a call with launch plan ``plan`` (ops.LayerInputs), routed as
    the plan says (with the routing launch's up X·Aᵀ where it computes it)."""
    from nf4moe.kernels import ops
    from nf4moe.moe_layers.triton_backend import _lora

    lora = tuple(t.detach() if t is not None else None for t in _lora(m))
    rt, xa_up = ops.route(plan, idx, m.num_experts, check_ids=False, x=x, lora_a=lora[0])
    return ops.LayerInputs.of(x, idx, w, rt, m.gate_up_nf4.operand, m.down_nf4.operand, lora, m.scaling, m.act,
                              plan, xa_up)


@pytest.mark.parametrize("rank,grad", [(8, False), (0, False), (8, True)])
def test_opcheck(rank, grad):
    """The layer op (both projections and the combine, by the plan's key) and the combine op against their
    schemas and fake impls: the decode path's inference plan (with the routing launch's X·Aᵀ as an input), the
    Triton GEMM's without LoRA, and a training plan, whose outputs include the saved pre-activations."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nf4moe.kernels import ops

    m = make_layer(4, 128, 64, rank=rank, seed=31)
    x = torch.randn(6, 128, device=DEV, dtype=torch.float32)
    idx, w = routing(6, 4, 2, seed=32)
    kernel = "gemm" if grad or rank == 0 else "gemv"
    with torch.set_grad_enabled(grad), nf4moe.plan_overrides(up=kernel, down=kernel):
        plan = m.launch_plan(x.clone().requires_grad_(grad), idx, w)
    assert plan.save_preact == grad and plan.kernels == (kernel, kernel)
    assert (plan.up_xa == "routing") == (kernel == "gemv")
    inputs = layer_op_inputs(m, x, idx, w, plan)
    torch.library.opcheck(ops.moe_experts, tuple(inputs), test_utils=("test_schema", "test_faketensor"))
    with FakeTensorMode() as mode:  # the fake impl's shapes, which opcheck found equal to the real op's
        out, gu, xa = ops.moe_experts(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in inputs))
    assert out.shape == (6, 128) and gu.shape == ((12 if grad else 0), 128)
    assert xa.shape == ((12 if grad and rank else 0), 16)
    y = torch.randn(idx.numel(), 128, device=DEV)
    torch.library.opcheck(ops.combine, (y, idx, 4), test_utils=("test_schema", "test_faketensor"))


def test_lora_xa_split_partials_sum_to_the_whole(nan_new_empty):
    """At small P the X·Aᵀ precompute splits K into slices (partials summed by the consumer); their sum
    equals the one-slice result and x[row]·A[e]ᵀ computed directly."""
    from nf4moe.kernels.host import xa_split
    from nf4moe.kernels.lora_xa import launch_lora_xa
    from nf4moe.kernels.routing import launch_routing

    t, e, k, r, kdim = 6, 4, 2, 8, 512
    g = torch.Generator().manual_seed(21)
    x = torch.randn(t, kdim, generator=g).to(DEV)
    a = (torch.randn(e, r, kdim, generator=g) * 0.1).to(DEV)
    idx, _ = routing(t, e, k, seed=22)
    pairs, offsets = launch_routing(idx, e)
    assert xa_split(kdim, t * k, 64) == 4
    parts = launch_lora_xa(x, a, pairs, offsets, top_k=k, gather=True, r_pad=16)
    whole = launch_lora_xa(x, a, pairs, offsets, top_k=k, gather=True, r_pad=16,
                           out=torch.full((t * k, 16), float("nan"), device=DEV))
    assert parts.shape == (4, t * k, 16)
    pl = pairs.long()
    want = torch.einsum("pk,prk->pr", x[pl // k].double(), a[idx.reshape(-1)[pl]].double())
    tol = 1e-4 if INTERP else 5e-3  # exact fp32 in the interpreter; tf32 dot operands on the GPU
    torch.testing.assert_close(parts.sum(0)[:, :r].double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(whole[:, :r].double(), want, rtol=tol, atol=tol)


def test_second_launch_skips_the_autotuner(monkeypatch, overrides):
    """launch.launch_tuned: once a launch key has its config, eager launches call the JIT function with it
    directly (the autotuner's per-call key building is host time at small T); results are unchanged."""
    from nf4moe.kernels.grouped_gemm import nf4_moe_gemm_kernel

    overrides(up="gemm", down="gemm")
    m = make_layer(4, 128, 64, rank=8, seed=31)
    x = torch.randn(5, 128, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(5, 4, 2, seed=32)
    with torch.no_grad():
        assert m.launch_plan(x, idx, w).kernels == ("gemm", "gemm")
        first = m(x, idx, w)

        def autotuner_again(*args, **kwargs):
            raise AssertionError("the autotuner ran for a key that already has its config")

        monkeypatch.setattr(nf4_moe_gemm_kernel, "run", autotuner_again)
        assert torch.equal(m(x, idx, w), first)


@pytest.mark.parametrize("xa_mode", ["loop", "kernel", "auto"])
@pytest.mark.parametrize("t", [3, 40])  # 6 and 80 routed rows: either side of the automatic switch at 64
def test_lora_xa_in_loop_and_precomputed(monkeypatch, overrides, xa_mode, t):
    """LoRA X·Aᵀ accumulated in the GEMM's K loop (``xa="loop"``, the default up to 64 rows) and by the lora_xa
    kernel beforehand (``"kernel"``, the default above) both match the reference, MMA K order included."""
    from nf4moe.kernels import dispatch

    overrides(up="gemm", down="gemm")  # the MMA GEMM at every size (the GEMV always reads X·Aᵀ precomputed)
    if xa_mode != "auto":
        overrides(xa=xa_mode)
    calls = count_calls(monkeypatch, dispatch, "launch_lora_xa")
    m = make_layer(4, 128, 64, rank=16, seed=31)
    x = torch.randn(t, 128, device=DEV)
    idx, w = routing(t, 4, 2, seed=32)
    precomputed = xa_mode == "kernel" or (xa_mode == "auto" and 2 * t > 64)
    with torch.no_grad():
        plan = m.launch_plan(x, idx, w)
    assert (plan.up_xa, plan.down_xa) == (("kernel",) * 2 if precomputed else ("loop",) * 2)
    assert_matches_reference(m, x, idx, w, BOUND[torch.float32])
    assert len(calls) == (2 if precomputed else 0)  # one X·Aᵀ launch per projection, or none


def gemv_calls(monkeypatch) -> tuple[list, list]:
    """Calls of the GEMV launcher (dispatch's): the up projection's (gated), and the down projection's, each
    recorded as what it returned: whether it fused the combine."""
    from nf4moe.kernels import dispatch

    up, down = [], []
    real = dispatch.launch_nf4_moe_gemv

    def record(*a, **kw):
        fused = real(*a, **kw)
        (up if kw["gated"] else down).append(fused)
        return fused

    monkeypatch.setattr(dispatch, "launch_nf4_moe_gemv", record)
    return up, down


@pytest.mark.parametrize("t,gemv", [(1, True), (32, True), (33, False)])  # 2, 64, 66 routed rows at top-2
def test_decode_gemv_is_the_default_up_to_64_rows(monkeypatch, t, gemv):
    """Inference calls of up to 64 routed rows take the decode GEMV (both projections), larger ones the GEMM."""
    up, down = gemv_calls(monkeypatch)
    m = make_layer(4, 128, 64, rank=8, seed=33)
    x = torch.randn(t, 128, device=DEV)
    idx, w = routing(t, 4, 2, seed=34)
    with torch.no_grad():
        plan = m.launch_plan(x, idx, w)
    assert plan.kernels == (("gemv", "gemv") if gemv else ("gemm", "gemm"))
    assert plan.combine == ("gemv" if gemv else "kernel")
    assert_matches_reference(m, x, idx, w, BOUND[torch.float32])
    assert (up, down) == (([False], [True]) if gemv else ([], []))  # the down GEMV with its fused combine


def gemv_config(bm, bn, lanes, steps, vec, warps) -> dict:
    """A GEMV config's keyword arguments (launch._TUNED's form)."""
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "LANES": lanes, "STEPS": steps, "VEC": vec},
                         num_warps=warps, num_stages=1).all_kwargs()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_fused_combine_equals_down_then_combine(monkeypatch, nan_new_empty, dtype):
    """The down GEMV's fused combine (the last routed slot of each token and N tile sums the token's slot rows)
    against the same GEMV's slot rows summed by the combine kernel: bit-identical (same values, same fixed
    order), with sentinel slots, a token whose every slot is a sentinel (a zero row, written by its dropped
    pairs), a token routed twice to one expert; every arrival counter back at zero afterwards.  The down
    projection runs through dispatch.projection by the plans of both combine forms."""
    from dataclasses import replace

    from nf4moe.kernels import dispatch
    from nf4moe.kernels import launch as L
    from nf4moe.kernels.routing import launch_routing

    class Pinned(dict):  # both launches on one config: the same slot rows, bit for bit
        def get(self, key, default=None):
            return cfg if key[0] in ("gemv", "gemv_combine") else super().get(key, default)

    cfg = gemv_config(1, 32, 4, 4, 4, 1)  # four N tiles of 32: four arrival counters per token
    monkeypatch.setattr(L, "_TUNED", Pinned())
    e, k, t = 5, 3, 4
    m = make_layer(e, 128, 64, rank=8, seed=61)
    idx = torch.tensor([[0, 4, e], [e + 2, e, e], [2, 2, 1], [3, e, 0]], device=DEV)
    w = torch.rand(t, k, device=DEV, dtype=dtype) + 0.1
    with torch.no_grad(), nf4moe.plan_overrides(up="gemv", down="gemv"):
        fused_plan = m.launch_plan(torch.randn(t, 128, device=DEV, dtype=dtype), idx, w)
    assert fused_plan.down == "gemv" and fused_plan.combine == "gemv" and fused_plan.down_xa == "kernel"
    apart_plan = replace(fused_plan, combine="kernel")  # the GEMV's slot rows, then the combine kernel
    pairs, offsets = launch_routing(idx, e)
    h = torch.randn(t * k, 64, device=DEV, dtype=dtype)
    la, lb = m.lora_A["down_proj"].detach(), m.lora_B["down_proj"].detach()
    up, down = gemv_calls(monkeypatch)

    def down_proj(plan, combine: bool):
        return dispatch.projection(
            plan, "gemv", plan.down_xa, h, m.down_nf4.operand, la, lb, m.scaling, pairs, offsets, w.reshape(-1),
            h.new_empty(t * k, 128), n=128, top_k=1, gated=False, act=m.act, launcher=None,
            combine=(h.new_empty(t, 128), idx) if combine else None)

    with torch.no_grad():
        fused = down_proj(fused_plan, True)
        apart = down_proj(apart_plan, True)
        rows = down_proj(fused_plan, False)
        assert down == [True, False, False]  # the fused path really ran, then twice the plain GEMV
        assert torch.equal(fused, apart) and torch.equal(apart, dispatch.combine(rows, idx, e))
    assert up == [] and fused.shape == (t, 128)
    assert torch.equal(fused[1], torch.zeros_like(fused[1])) and torch.isfinite(fused).all()
    assert int(L.arrival_counters(h.device, t * 128).count_nonzero()) == 0


def test_operand_rejects_input_columns_off_the_blocksize():
    """Rows of a packed operand start 16-byte aligned only when K is a multiple of the blocksize (the kernels'
    row_bytes hint and absmax indexing rely on it): anything else is refused when the operand is built."""
    from nf4moe.kernels.operands import NF4Operand

    packed = torch.zeros(2, 4, 48, dtype=torch.uint8)  # 96 input columns
    with pytest.raises(ValueError, match=r"96 input columns.*blocksize \(64\)"):
        NF4Operand(packed, torch.ones(2, 4, 1), None, None, None, 64)
    assert NF4Operand(packed, torch.ones(2, 4, 3), None, None, None, 32).blocksize == 32


def test_gemv_capture_runs_the_plain_gemv_tuned_by_the_first_eager_call(monkeypatch):
    """The first eager fused down GEMV of a shape also tunes the plain GEMV; a later call while a CUDA graph is
    captured (simulated here: the plan's inputs say ``capturing``) has the plan's combine kernel, runs that plain
    GEMV with no tuning, and equals the eager call of the same plan (combine kernel, early X·Aᵀ sums) bit for
    bit; with the plain GEMV never tuned the capture's GEMV stays fused (no autotuning inside a capture)."""
    from nf4moe.kernels import grouped_gemv as gv
    from nf4moe.kernels import launch as L
    from nf4moe.moe_layers import triton_backend as tb

    monkeypatch.setattr(L, "_TUNED", {})
    capture = {"on": False}
    real_inputs = tb.plan_inputs
    monkeypatch.setattr(tb, "plan_inputs", lambda *a: real_inputs(*a)._replace(capturing=capture["on"]))
    m = make_layer(4, 128, 64, rank=8, seed=81)
    x = torch.randn(2, 128, device=DEV)
    idx, w = routing(2, 4, 2, seed=82)
    up, down = gemv_calls(monkeypatch)
    keys = []
    real_tune = L.launch_tuned
    monkeypatch.setattr(gv, "launch_tuned", lambda kernel, grid, key, *a, **kw: keys.append(
        (key[0], key[1], L.tuned(key))) or real_tune(kernel, grid, key, *a, **kw))
    with torch.no_grad(), nf4moe.plan_overrides(up="gemv", down="gemv"):
        plan = m.launch_plan(x, idx, w)
        assert plan.combine == "gemv" and not plan.capturing and not plan.gemv_xa_early
        eager = m(x, idx, w)
        # (kind, N, tuned before) of each launch: the up projection (N = 64), then the down's (N = 128): the plain
        # GEMV tuned first, then the fused one
        assert down == [True] and keys == [("gemv", 64, False), ("gemv", 128, False), ("gemv_combine", 128, False)]
        capture["on"] = True
        plan = m.launch_plan(x, idx, w)
        assert plan.combine == "kernel" and plan.capturing and plan.gemv_xa_early
        keys.clear()
        captured = m(x, idx, w)
        assert down[-1] is False and keys == [("gemv", 64, True), ("gemv", 128, True)]  # plain, nothing tuned
        capture["on"] = False
        with nf4moe.plan_overrides(combine="kernel", gemv_xa_early=True):  # the captured plan's kernels, eagerly
            assert torch.equal(captured, m(x, idx, w))
        torch.testing.assert_close(captured, eager, rtol=1e-5, atol=1e-5)
        monkeypatch.setattr(L, "_TUNED", {k: v for k, v in L._TUNED.items() if k[:2] != ("gemv", 128)})
        capture["on"] = True
        m(x, idx, w)
        assert down[-1] is True  # the plain GEMV untuned: fused (no autotuning inside a capture)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("t", [1, 2, 40])
def test_cuda_graph_replays_match_eager(monkeypatch, t):
    """The layer captured in a CUDA graph after one eager call (the decode GEMV at T <= 2: eager calls fuse the
    combine into the down GEMV, the capture's plan runs the plain GEMV, tuned by that first eager call, and the
    combine kernel; the GEMM above), replayed on new inputs copied into the captured buffers: each replay equals
    an eager call of the same path (``plan_overrides(combine="kernel")``) bit for bit, and the fused eager call
    to rounding (the two GEMV variants may run different tuned configs)."""
    from nf4moe.kernels import dispatch

    captured = []
    real = dispatch.launch_nf4_moe_gemv
    monkeypatch.setattr(dispatch, "launch_nf4_moe_gemv", lambda *a, **kw: captured.append(
        (torch.cuda.is_current_stream_capturing(), kw["gated"], real(*a, **kw))) or captured[-1][2])
    m = make_layer(8, 256, 128, rank=8, seed=71)
    x = torch.randn(t, 256, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(t, 8, 4, seed=72)
    w = w.to(torch.bfloat16)
    with torch.no_grad():
        assert m.launch_plan(x, idx, w).kernels == (("gemv", "gemv") if t <= 2 else ("gemm", "gemm"))
        m(x, idx, w)  # compile and tune outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            assert m.launch_plan(x, idx, w).combine == "kernel"
            out = m(x, idx, w)
        # (capturing, gated, fused) of each GEMV launch: eager fused, captured plain
        assert captured == ([(False, True, False), (False, False, True), (True, True, False), (True, False, False)]
                            if t <= 2 else [])
        for seed in (73, 74, 75):
            refill(x, idx, w, e=8, seed=seed)
            graph.replay()
            fused = m(x, idx, w)
            with nf4moe.plan_overrides(combine="kernel"):
                assert torch.equal(out, m(x, idx, w))
            torch.testing.assert_close(out, fused, rtol=2e-2, atol=2e-2)


def pdl_case(t, seed):
    """A small layer, activations and routing for the PDL tests on this GPU (skipped before sm_90)."""
    m = make_layer(8, 256, 128, rank=8, seed=seed)
    x = torch.randn(t, 256, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(t, 8, 4, seed=seed + 1)
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        pytest.skip("programmatic dependent launch needs sm_90 or newer")
    return m, x, idx, w.to(torch.bfloat16)


def pdl_chain(plan):
    """The PDL kernels of a layer call by ``plan`` (4 slots, LoRA): routing with the up X·Aᵀ, the down X·Aᵀ and
    the decode GEMVs, or routing, both X·Aᵀ, the MMA GEMMs and combine; a capture's decode path (the plan's
    combine kernel) also launches the combine kernel (eager decode calls fuse it into the GEMV)."""
    if plan.up == "gemv":
        decode = {"routing_xa_kernel", "nf4_moe_gemv_kernel", "lora_xa_kernel"}
        return decode | {"combine_kernel"} if plan.combine == "kernel" else decode
    return {"routing_kernel", "nf4_moe_gemm_kernel", "lora_xa_kernel", "combine_kernel"}


def compiled_kernels(**want):
    """Names of the kernels launch.launch has compiled with all of the keyword arguments ``want``."""
    from nf4moe.kernels import launch as L

    return {k[0].__name__ for k in L._COMPILED if all((n, v) in k[3] for n, v in want.items())}


@pytest.mark.skipif(DEV != "cuda", reason="programmatic dependent launch needs a GPU")
@pytest.mark.parametrize("t", [1, 16, 128])
def test_pdl_launches_give_the_same_bits(t):
    """``plan_overrides(pdl=True)``: the inference path's kernels (routing with the up X·Aᵀ, X·Aᵀ, decode GEMV or
    MMA GEMM, combine) launched as programmatic dependent launches, each waiting for its predecessor first: eager
    calls and CUDA-graph replays on new inputs give the bits of the same path without PDL (the configs tuned
    without it are reused: operands.launch_key), on sm_90 and newer."""
    m, x, idx, w = pdl_case(t, seed=81)
    with torch.no_grad():
        with nf4moe.plan_overrides(pdl=False):
            assert not m.launch_plan(x, idx, w).pdl
            ref = m(x, idx, w)
        with nf4moe.plan_overrides(pdl=True):
            plan = m.launch_plan(x, idx, w)
            assert plan.pdl and plan.kernels == (("gemv", "gemv") if t <= 16 else ("gemm", "gemm"))
            assert torch.equal(m(x, idx, w), ref)
            pdl = compiled_kernels(PDL=True, launch_pdl=True)
            assert pdl_chain(plan) <= pdl, pdl
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                assert m.launch_plan(x, idx, w).pdl
                out = m(x, idx, w)
        for seed in (83, 84, 85):
            refill(x, idx, w, e=8, seed=seed)
            graph.replay()
            # the captured decode path: plain GEMV + combine kernel
            with nf4moe.plan_overrides(pdl=False, combine="kernel"):
                assert torch.equal(out, m(x, idx, w))


@pytest.mark.skipif(DEV != "cuda", reason="programmatic dependent launch needs a GPU")
@pytest.mark.parametrize("t", [1, 32])  # 4 and 128 routed rows: the decode GEMV, the MMA GEMM
def test_captures_take_pdl_and_early_xa_by_default(t):
    """No overrides: eager calls' plans launch without PDL or the decode GEMV's early X·Aᵀ sums, a CUDA graph
    captured after them plans and compiles the PDL kernels (and the decode GEMV's early X·Aᵀ sum) with the
    configs its eager calls tuned, and its replays on new inputs give the eager calls' bits."""
    m, x, idx, w = pdl_case(t, seed=88)
    with torch.no_grad():
        plan = m.launch_plan(x, idx, w)
        assert not plan.pdl and not plan.gemv_xa_early and not plan.capturing  # eager: plain launches
        m(x, idx, w)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            plan = m.launch_plan(x, idx, w)
            assert plan.capturing and plan.pdl and plan.gemv_xa_early == (plan.up == "gemv")
            out = m(x, idx, w)
        assert plan.kernels == (("gemv", "gemv") if t == 1 else ("gemm", "gemm"))
        pdl = compiled_kernels(PDL=True, launch_pdl=True)
        assert pdl_chain(plan) <= pdl, pdl
        if plan.up == "gemv":
            assert "nf4_moe_gemv_kernel" in compiled_kernels(PDL=True, XA_EARLY=True)
        for seed in (90, 91):
            refill(x, idx, w, e=8, seed=seed)
            graph.replay()
            with nf4moe.plan_overrides(combine="kernel"):  # eager calls on the captured decode path's kernels
                assert torch.equal(out, m(x, idx, w))


@pytest.mark.skipif(DEV != "cuda", reason="programmatic dependent launch needs a GPU")
def test_training_calls_take_no_pdl():
    """PDL is for direct (eager, untraced, inference) launches: a training call's plan has it off, and
    ``plan_overrides(pdl=True)`` refuses a training call, naming the override, before anything launches."""
    m, x0, idx, w0 = pdl_case(16, seed=86)
    x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    plan = m.launch_plan(x, idx, w)
    assert plan.save_preact and not plan.pdl
    with nf4moe.plan_overrides(pdl=True), pytest.raises(ValueError, match="pdl=True"):
        m(x, idx, w)


GEMV_PINS = [  # (BLOCK_M, BLOCK_N, LANES, STEPS, VEC, num_warps), dtype: the 16- and 8-byte lanes, one row per
    # program (the direct row-to-expert lookup) and two (the per-expert tile schedule), K chunks of 256, 128 and 64
    # columns (up, K = 256: 1, 2, 4 chunks; down, K = 128: a tail, 1, 2), 16-bit and fp32 activations; VEC = 4 is
    # the interpreter's
    (1, 32, 8, 1, 16, 1, torch.bfloat16), (2, 32, 4, 1, 16, 1, torch.float16),
    (1, 32, 4, 1, 8, 1, torch.bfloat16), (1, 32, 4, 1, 8, 1, torch.float32)]


@pytest.mark.parametrize("pin", GEMV_PINS)
def test_gemv_configs_match_reference(monkeypatch, nan_new_empty, pin):
    """Each GEMV lane width and row count per program, pinned through the launcher's config cache, against
    the reference: one or several whole K chunks (the next chunk's loads issued before the current one's
    decode) and a masked tail."""
    from nf4moe.kernels import launch as L

    *shape, dtype = pin
    bm = shape[0]
    cfg = gemv_config(*shape)

    class Pinned(dict):  # the down projection's fused combine takes one row per program
        def get(self, key, default=None):
            if key[0] == "gemv" or (key[0] == "gemv_combine" and bm == 1):
                return cfg
            return super().get(key, default)

    monkeypatch.setattr(L, "_TUNED", Pinned())
    up, down = gemv_calls(monkeypatch)
    m = make_layer(4, 256, 128, rank=8, seed=50 + shape[4] + bm)
    x = torch.randn(3, 256, device=DEV, dtype=dtype)
    idx, w = routing(3, 4, 2, seed=51)
    with nf4moe.plan_overrides(up="gemv", down="gemv"):
        assert_matches_reference(m, x, idx, w, BOUND[dtype])
    assert (up, down) == ([False], [True])


WGMMA_CASES = [
    # (T, E, H, I, K, mode): N not a multiple of the tile (I = 192 < 2 x 128, H = 192 < 256), an expert with
    # more than one 128-row tile, experts with none, sentinels, K = E
    (300, 8, 256, 192, 4, "random"),
    (200, 4, 128, 320, 2, "one_expert"),
    (150, 8, 192, 128, 3, "sentinels"),
    (70, 4, 320, 64, 4, "random"),
]


def patch_wgmma_launcher(monkeypatch, make):
    """Replace the Gluon GEMM's launcher by ``make(real)`` where dispatch finds it (its own name if it imports
    the launcher at module level, else grouped_gemm_wgmma's, which a call-time import reads); skipped without
    Triton's Gluon."""
    from nf4moe.kernels import dispatch
    from nf4moe.moe_layers import triton_backend as tb

    if not tb._gluon():
        pytest.skip("the Gluon GEMM needs Triton's Gluon (3.6+)")
    from nf4moe.kernels import grouped_gemm_wgmma as gw

    fn = make(gw.launch_nf4_moe_gemm_wgmma)
    monkeypatch.setattr(gw, "launch_nf4_moe_gemm_wgmma", fn)
    if hasattr(dispatch, "launch_nf4_moe_gemm_wgmma"):
        monkeypatch.setattr(dispatch, "launch_nf4_moe_gemm_wgmma", fn)


@pytest.fixture
def wgmma_counted(monkeypatch):
    """Force the Gluon GEMM (grouped_gemm_wgmma.py) at every row count (``plan_overrides(up="wgmma",
    down="wgmma")``) and count its launches (by ``gated``)."""
    if DEV != "cuda" or INTERP or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon GEMM runs on Hopper only")
    calls = []

    def counting(real):
        def counted(*a, **kw):
            calls.append(kw["gated"])
            return real(*a, **kw)
        return counted

    patch_wgmma_launcher(monkeypatch, counting)
    with nf4moe.plan_overrides(up="wgmma", down="wgmma"):
        yield calls


@pytest.mark.parametrize("t,e,h,i,k,mode", WGMMA_CASES)
@pytest.mark.parametrize("rank", [0, 16])
@pytest.mark.parametrize("dtype,nested,act", [(torch.bfloat16, True, "silu"), (torch.float16, False, "gelu_tanh")])
def test_wgmma_gemm_matches_reference(wgmma_counted, nan_new_empty, t, e, h, i, k, mode, rank, dtype, nested, act):
    m = make_layer(e, h, i, rank=rank, nested=nested, act=act, seed=t + rank)
    x = torch.randn(t, h, device=DEV, dtype=dtype)
    idx, w = routing(t, e, k, seed=t * 5 + rank, mode=mode)
    with torch.no_grad():
        plan = m.launch_plan(x, idx, w.to(dtype))
        assert plan.kernels == ("wgmma", "wgmma") and plan.wgmma_tile == (128, 256)  # < 256 rows per expert
        out = m(x, idx, w.to(dtype))
        ref = reference(m, x, idx, w.to(dtype))
    assert sorted(wgmma_counted) == [False, True], "the Gluon GEMM did not run for both projections"
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < BOUND[dtype]


@pytest.mark.parametrize("tile", ["256x128", "128x256"])
@pytest.mark.parametrize("t,e,h,i,k,mode", WGMMA_CASES[:3])
def test_wgmma_gemm_tiles(wgmma_counted, nan_new_empty, tile, t, e, h, i, k, mode):
    """Both tiles by ``plan_overrides(wgmma_tile=...)``: the 256-row tile (every weight decoded once per 256
    rows; each expert's last <= 128 rows in a second, 128x256 launch) and the 128-row one."""
    m = make_layer(e, h, i, rank=16, seed=t)
    x = torch.randn(t, h, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(t, e, k, seed=t * 3, mode=mode)
    with torch.no_grad(), nf4moe.plan_overrides(wgmma_tile=tile):
        assert m.launch_plan(x, idx, w.to(torch.bfloat16)).wgmma_tile == tuple(map(int, tile.split("x")))
        out = m(x, idx, w.to(torch.bfloat16))
        ref = reference(m, x, idx, w.to(torch.bfloat16))
    # 256x128: plus the remainder launches
    assert sorted(wgmma_counted) == ([False, False, True, True] if tile == "256x128" else [False, True])
    assert torch.isfinite(out).all() and rel_err(out, ref) < BOUND[torch.bfloat16]


@pytest.mark.parametrize("t,e,h,i,k,mode", [
    (600, 4, 256, 192, 2, "random"),      # ~300 rows per expert: a 256-row tile and a 128-row remainder each
    (700, 8, 192, 320, 4, "random"),      # ~350: remainders either side of 128 (some padded 256-row tiles)
    (150, 8, 192, 128, 3, "sentinels"),   # ~56: remainder tiles only
    (700, 4, 128, 256, 2, "one_expert"),  # one expert of 700 rows (700 % 256 = 188: no remainder tile)
])
def test_wgmma_split_remainders_match_reference(wgmma_counted, nan_new_empty, t, e, h, i, k, mode):
    """The 256-row tile: the 256-row tiles, then each expert's last <= 128 rows as a 128-row tile in a second
    launch; every output row written once (outputs poisoned), against the reference."""
    m = make_layer(e, h, i, rank=16, seed=t + 11)
    x = torch.randn(t, h, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(t, e, k, seed=t * 11, mode=mode)
    with torch.no_grad(), nf4moe.plan_overrides(wgmma_tile="256x128"):
        assert m.launch_plan(x, idx, w.to(torch.bfloat16)).wgmma_tile == (256, 128)
        out = m(x, idx, w.to(torch.bfloat16))
        ref = reference(m, x, idx, w.to(torch.bfloat16))
    assert sorted(set(wgmma_counted)) == [False, True] and len(wgmma_counted) == 4, wgmma_counted
    assert torch.isfinite(out).all() and rel_err(out, ref) < BOUND[torch.bfloat16]


@pytest.mark.parametrize("recompute", [False, True])
def test_wgmma_gemm_training_forward_and_grads(wgmma_counted, recompute):
    """The training forward through the Gluon GEMM (pre-activations and X·Aᵀ saved; in recompute mode, the
    module's ``recompute=True``, the backward's up pass, again by the plan's Gluon GEMM, writes only the
    pre-activations) gives the Triton GEMM's gradients within bf16 rounding."""
    m = make_layer(8, 256, 192, rank=16, seed=4)
    m.recompute = recompute
    x0 = torch.randn(300, 256, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(300, 8, 4, seed=9)

    def grads():
        m.zero_grad()
        x = x0.clone().requires_grad_(True)
        ww = w.to(torch.bfloat16).clone().requires_grad_(True)
        out = m(x, idx, ww)
        out.float().square().sum().backward()
        return [out, x.grad, ww.grad] + [p.grad.clone() for p in (*m.lora_A.values(), *m.lora_B.values())]

    plan = m.launch_plan(x0.clone().requires_grad_(True), idx, w.to(torch.bfloat16))
    assert plan.kernels == ("wgmma", "wgmma") and plan.save_preact == (not recompute)
    fast = grads()
    # up, down; in recompute mode the backward's up pass once more
    assert wgmma_counted == ([True, False, True] if recompute else [True, False]), wgmma_counted
    with nf4moe.plan_overrides(up="gemm", down="gemm"):
        slow = grads()
    assert len(wgmma_counted) == (3 if recompute else 2)  # the Triton GEMM only
    for a, b in zip(fast, slow):
        assert rel_err(a, b.float()) < 2e-2


def test_wgmma_choice_in_the_plan():
    """The plan's Gluon GEMM: from WGMMA_MIN_ROWS (8192) routed rows on sm_90 with Gluon, never for CPU tensors
    (forcing it there is refused, by name); its 256x128 tile from 256 rows per expert on average, 128x256 below,
    either one forced by ``wgmma_tile``, anything else refused."""
    from nf4moe.kernels.plan import WGMMA_MIN_ROWS, PlanInputs, PlanOverrides, make_plan

    assert WGMMA_MIN_ROWS == 8192

    def inputs(tokens, experts=128, **kw):
        hopper = dict(cuda=True, capability=(9, 0), interpret=False, gluon=True, x_aligned=True)
        return PlanInputs(tokens=tokens, top_k=8, num_experts=experts, hidden=2048, intermediate=768, rank=16,
                          blocksize=64, dtype=torch.bfloat16, index_ok=True, training=False, recompute=False,
                          capturing=False, traced=False, **{**hopper, **kw})

    assert make_plan(inputs(1023, experts=8)).kernels == ("gemm", "gemm")  # 8184 rows
    assert make_plan(inputs(1024, experts=8)).kernels == ("wgmma", "wgmma")
    assert make_plan(inputs(255 * 16)).wgmma_tile == (128, 256)  # 255 rows per expert
    assert make_plan(inputs(256 * 16)).wgmma_tile == (256, 128)
    assert make_plan(inputs(1 << 17), PlanOverrides(wgmma_tile="128x256")).wgmma_tile == (128, 256)
    assert make_plan(inputs(1), PlanOverrides(up="wgmma", down="wgmma", wgmma_tile="256x128")).wgmma_tile == (256, 128)
    cpu = dict(cuda=False, capability=None, interpret=True, gluon=False, x_aligned=False)
    assert make_plan(inputs(1 << 17, **cpu), PlanOverrides(wgmma_min_rows=1)).kernels == ("gemm", "gemm")
    with pytest.raises(ValueError, match="up='wgmma' cannot run here"):
        make_plan(inputs(1 << 17, **cpu), PlanOverrides(up="wgmma"))
    with pytest.raises(ValueError, match="wgmma_tile"):
        with nf4moe.plan_overrides(wgmma_tile="256x256"):
            pass
    if DEV == "cpu":  # a real layer on CPU tensors: the Triton GEMM whatever the threshold
        m = make_layer(4, 128, 64)
        idx, w = routing(300, 4, 2, seed=1)
        with torch.no_grad(), nf4moe.plan_overrides(wgmma_min_rows=1):
            assert m.launch_plan(torch.randn(300, 128, dtype=torch.bfloat16), idx, w).kernels == ("gemm", "gemm")


@pytest.mark.skipif(DEV != "cuda" or INTERP or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_layer_on_a_second_gpu_launches_there():
    """A layer on cuda:1 while cuda:0 is current (a model split over GPUs) computes on its own device."""
    m = make_layer(4, 128, 64, rank=8, seed=21).to("cuda:1")
    x = torch.randn(9, 128, device="cuda:1", dtype=torch.bfloat16)
    idx, w = routing(9, 4, 2, seed=22)
    idx, w = idx.to("cuda:1"), w.to("cuda:1")
    with torch.cuda.device(0), torch.no_grad():
        out = m(x, idx, w)
        ref = reference(m, x, idx, w)
    assert out.device == x.device and rel_err(out, ref) < BOUND[torch.bfloat16]


@pytest.mark.parametrize("grad", [False, True])
def test_gluon_tile_tables_built_once_per_layer_call(monkeypatch, grad):
    """Where the Gluon GEMM runs, both projections of a layer call (the inference op and the training op alike:
    one nf4moe::moe_experts call) read one tile table built once from the shared routing.  The plan is made to
    choose the Gluon GEMM here (its fit check answers yes: ``plan._wgmma_fits``, past make_plan's cache) and the
    Gluon kernel is replaced by a recorder (it has no interpreter path; its results are tested on the GPU), so
    only the tables it would get are checked, against tile_table's own build of the same routing."""
    from nf4moe.kernels import dispatch
    from nf4moe.kernels import plan as P
    from nf4moe.kernels import tile_table as tt
    from nf4moe.kernels.routing import launch_routing
    from nf4moe.moe_layers import triton_backend as tb

    monkeypatch.setattr(P, "_wgmma_fits", lambda *a: None)
    monkeypatch.setattr(tb, "make_plan", P.make_plan.__wrapped__)  # uncached: no such plan outlives the test
    built = count_calls(monkeypatch, dispatch, "launch_tile_table")
    seen = []
    patch_wgmma_launcher(monkeypatch, lambda real: lambda *a, **kw: seen.append((a[6], kw["gated"])) or a[8])
    m = make_layer(4, 128, 64, rank=8, seed=91)
    x = torch.randn(6, 128, device=DEV, requires_grad=grad)
    idx, w = routing(6, 4, 2, seed=92)
    with torch.set_grad_enabled(grad), nf4moe.plan_overrides(up="wgmma", down="wgmma"):
        plan = m.launch_plan(x, idx, w)
        assert plan.kernels == ("wgmma", "wgmma") and plan.save_preact == grad
        m(x, idx, w)
    assert len(built) == 1 and [g for _, g in seen] == [True, False] and seen[0][0] is seen[1][0]
    rows = idx.numel()
    bm, _ = plan.wgmma_tile
    expect, _ = tt.launch_tile_table(launch_routing(idx, 4)[1], rows, bm)
    assert torch.equal(seen[0][0], expect)


def test_gluon_launch_fits_the_compiled_kernel_cache(monkeypatch):
    """The Gluon GEMM launches through launch.py's compiled-kernel cache (Triton's own launch path re-keys its
    ~35 arguments per call, NOTES v34): every constexpr by keyword, every parameter given (later launches list
    them from the keywords), as launch's own check demands.  Checked here without running the kernel (no
    interpreter path); the GPU tests run it."""
    from nf4moe.moe_layers import triton_backend as tb

    if not tb._gluon():
        pytest.skip("the Gluon GEMM needs Triton's Gluon (3.6+)")
    from nf4moe.kernels import grouped_gemm_wgmma as gw
    from nf4moe.kernels import launch as L

    calls = []
    monkeypatch.setattr(gw, "launch", lambda kernel, grid, launcher, *a, **kw: calls.append(
        (kernel, grid, launcher)) or L._check_call(kernel, a, kw))
    m = make_layer(4, 128, 64, rank=8, seed=93)
    op = m.gate_up_nf4.operand
    p = 12
    x = torch.randn(6, 128, device=DEV, dtype=torch.bfloat16)
    out = torch.empty(p, 64, device=DEV, dtype=torch.bfloat16)
    xa = torch.zeros(1, p, 16, device=DEV)
    ids = torch.arange(p, device=DEV, dtype=torch.int32)
    table = torch.zeros(3, 3, device=DEV, dtype=torch.int32)
    gw.launch_nf4_moe_gemm_wgmma(x, op, m.lora_B["gate_up_proj"].detach(), m.scaling, xa, ids, table, None, out,
                                 n=64, top_k=2, gated=True, act_code=0, r=8, r_pad=16, block_m=128, tile_n=256)
    assert calls == [(gw.nf4_moe_gemm_wgmma_kernel, (1, 3), None)]


# --------------------------------------------------------------------------- X·Aᵀ in the routing launch (v39)

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["random", "sentinels"])
def test_routing_xa_launch_sorts_and_computes_xa_by_pair(nan_new_empty, dtype, mode):
    """launch_routing_xa: the sort and offsets bit-identical to launch_routing's; every routed pair's X·Aᵀ
    (partials summed) against fp64 from the same operands rounded to x's dtype; dropped pairs not needed."""
    from nf4moe.kernels import routing as R

    e, k, t, h, r = 6, 3, 5, 256, 8
    idx, _ = routing(t, e, k, seed=71, mode=mode)
    g = torch.Generator().manual_seed(72)
    x = torch.randn(t, h, generator=g).to(DEV, dtype)
    a = torch.randn(e, r, h, generator=g).to(DEV)
    pairs, offsets, xa = R.launch_routing_xa(idx, e, x, a, 16)
    ref_pairs, ref_offsets = R.launch_routing(idx, e)
    assert torch.equal(pairs, ref_pairs) and torch.equal(offsets, ref_offsets)
    assert xa.shape[1:] == (t * k, 16) and xa.dtype == torch.float32
    flat = idx.reshape(-1)
    got = xa.double().sum(0)
    for p in range(t * k):
        ep = int(flat[p])
        if not 0 <= ep < e:
            continue
        a_used = a[ep] if INTERP else a[ep].to(dtype)  # as lora_xa's dot operands (fp32 in the interpreter)
        want = a_used.double() @ x[p // k].double()
        assert torch.allclose(got[p, :r], want, rtol=1e-5, atol=1e-5), p
        assert torch.equal(got[p, r:], torch.zeros_like(got[p, r:]))


def test_routing_xa_launch_rejects_what_it_cannot_take():
    from nf4moe.kernels import routing as R

    idx = torch.zeros(2, 2, dtype=torch.int64, device=DEV)
    x, a = torch.randn(2, 64, device=DEV), torch.randn(4, 8, 64, device=DEV)
    with pytest.raises(TypeError, match="int32 or int64"):
        R.launch_routing_xa(idx.to(torch.int16), 4, x, a, 16)
    with pytest.raises(ValueError, match="pairs"):
        R.launch_routing_xa(torch.zeros(R.TRITON_MAX_PAIRS + 1, 1, dtype=torch.int64, device=DEV), 4, x, a, 16)
    with pytest.raises(ValueError, match="does not fit"):
        R.launch_routing_xa(idx, 5, x, a, 16)


@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_xa_in_routing_layer_matches_reference_with_one_xa_launch_fewer(monkeypatch, nan_new_empty, t, dtype):
    """The decode path's default plan (routing ``kernel_xa``): the layer output against the fp32 reference and
    the path with two lora_xa launches (``plan_overrides(xa_in_routing=False)``); the up projection's lora_xa
    launch gone (only the down's left), the routing launch computing it."""
    from nf4moe.kernels import dispatch, ops

    m = make_layer(4, 128, 64, rank=8, seed=81)
    x = torch.randn(t, 128, device=DEV, dtype=dtype)
    idx, w = routing(t, 4, 2, seed=82, mode="sentinels")
    w = w.to(dtype)
    with torch.no_grad():
        with nf4moe.plan_overrides(xa_in_routing=False):
            plan = m.launch_plan(x, idx, w)
            assert (plan.routing, plan.up_xa, plan.down_xa) == ("kernel", "kernel", "kernel")
            two_xa_calls = count_calls(monkeypatch, dispatch, "launch_lora_xa")
            default = m(x, idx, w)
        assert len(two_xa_calls) == 2
        plan = m.launch_plan(x, idx, w)
        assert (plan.routing, plan.up_xa, plan.down_xa) == ("kernel_xa", "routing", "kernel")
        xa_calls = count_calls(monkeypatch, dispatch, "launch_lora_xa")
        fused_calls = count_calls(monkeypatch, ops, "launch_routing_xa")
        out = m(x, idx, w)
    assert len(fused_calls) == 1 and len(xa_calls) == 1  # the down projection's X·Aᵀ only
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(m, x, idx, w)) < BOUND[dtype]
    assert rel_err(out, default.float()) < BOUND[dtype]


@pytest.mark.parametrize("t", [1, 3])
def test_gemv_xa_early_changes_no_bit(monkeypatch, nan_new_empty, t):
    """``plan_overrides(gemv_xa_early=True)``: the decode GEMVs sum their X·Aᵀ partials (the up projection's from
    the routing launch, by pair id; the down's from lora_xa, by sorted row) right after the first chunks' loads,
    all at once: the layer's output is the same bits as with the epilogue's sum, and matches the reference."""
    import nf4moe.kernels.grouped_gemv as gv

    m = make_layer(4, 128, 64, rank=8, seed=83)
    x = torch.randn(t, 128, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(t, 4, 2, seed=84, mode="sentinels")
    w = w.to(torch.bfloat16)
    kinds = []
    real = gv.launch_tuned

    def spy(kernel, grid, key, launcher, *args, **kw):
        kinds.append(kw.get("XA_EARLY"))
        return real(kernel, grid, key, launcher, *args, **kw)

    monkeypatch.setattr(gv, "launch_tuned", spy)
    with torch.no_grad():
        with nf4moe.plan_overrides(gemv_xa_early=False):
            assert not m.launch_plan(x, idx, w).gemv_xa_early
            late = m(x, idx, w)
        n_late = len(kinds)  # the shape's first call also tunes the plain down GEMV: one launch more than later calls
        with nf4moe.plan_overrides(gemv_xa_early=True):
            plan = m.launch_plan(x, idx, w)
            assert plan.gemv_xa_early and plan.kernels == ("gemv", "gemv")
            early = m(x, idx, w)
    assert set(kinds[:n_late]) == {False} and set(kinds[n_late:]) == {True}, kinds
    assert torch.equal(early, late)
    assert rel_err(early, reference(m, x, idx, w)) < BOUND[torch.bfloat16]


def test_gemv_xa_early_refuses_more_partials_than_it_unrolls():
    """XA_EARLY unrolls XA_MAX partial loads: a launch handing more is refused, naming the count, not summed short."""
    from nf4moe.kernels.grouped_gemv import XA_MAX, launch_nf4_moe_gemv
    from nf4moe.kernels.routing import launch_routing

    e, k, t = 4, 2, 1
    m = make_layer(e, 128, 64, rank=8, seed=85)
    idx = torch.tensor([[0, 3]], device=DEV)
    pairs, offsets = launch_routing(idx, e)
    x = torch.randn(t, 128, device=DEV, dtype=torch.bfloat16)
    xa = torch.zeros(XA_MAX.value + 1, t * k, 16, device=DEV)
    out = torch.empty(t * k, 64, device=DEV, dtype=torch.bfloat16)
    lb = m.lora_B["gate_up_proj"].detach()
    with pytest.raises(ValueError, match=f"{XA_MAX.value + 1} X·Aᵀ partials"):
        launch_nf4_moe_gemv(x, m.gate_up_nf4.operand, lb, m.scaling, xa, pairs, offsets, None, out, n=64, top_k=k,
                            gated=True, act="silu", xa_by_pair=True, xa_early=True)


def test_traced_fused_combine_takes_fresh_counters(monkeypatch):
    """A traced launch (wrap_triton's launcher, under torch.compile) of the down GEMV's fused combine takes a fresh
    zeroed counter buffer, never the cached one: a cached buffer made during one trace holds that trace's fake
    tensor, and Inductor's lowering, under another fake mode, refused it ("Mixing fake modes", H100, session
    21).  The launch's output is the unfused path's (the launcher here runs the kernel directly)."""
    from nf4moe.kernels import grouped_gemv as gv
    from nf4moe.kernels import launch as L
    from nf4moe.kernels.grouped_gemv import launch_nf4_moe_gemv
    from nf4moe.kernels.routing import launch_routing

    e, k, t, h, n = 4, 2, 3, 64, 128
    m = make_layer(e, n, h, rank=0, seed=86)
    op = m.down_nf4.operand
    idx, w = routing(t, e, k, seed=87)
    pairs, offsets = launch_routing(idx, e)
    x = torch.randn(t * k, h, device=DEV)
    seen = []
    real = L.arrival_counters

    def spy(device, size, traced=False):
        buf = real(device, size, traced)
        seen.append((traced, buf))
        return buf

    monkeypatch.setattr(gv, "arrival_counters", spy)
    outs = []
    for launcher in (lambda kernel: kernel, None):
        cached = dict(L._COUNTERS)
        out = torch.full((t * k, n), float("nan"), device=DEV)
        comb = torch.full((t, n), float("nan"), device=DEV)
        fused = launch_nf4_moe_gemv(x, op, None, 1.0, None, pairs, offsets, w.reshape(-1), out, n=n, top_k=1,
                                    gated=False, act="silu", combine=(comb, idx.contiguous()), fuse_combine=True,
                                    launcher=launcher)
        assert fused
        outs.append(comb)
        if launcher is not None:  # a fresh buffer, neither cached nor taken from the cache
            assert len(seen) == 1 and seen[0][0] is True and L._COUNTERS == cached
            assert all(seen[0][1] is not buf for buf in cached.values())
    assert [traced for traced, _ in seen[1:]] == [False]
    assert torch.equal(outs[0], outs[1]) and torch.isfinite(outs[0]).all()
    with torch._subclasses.fake_tensor.FakeTensorMode():
        before = dict(L._COUNTERS)
        fresh = real(torch.device(DEV), 64, traced=True)
        assert fresh.shape == (64,) and L._COUNTERS == before


def test_xa_in_routing_off_when_a_gradient_is_needed_or_without_lora(monkeypatch):
    """The routing launch computes no X·Aᵀ without LoRA, nor in training (the Triton GEMM's lora_xa launch writes
    the X·A_upᵀ the backward needs), though the decode-size rows would take the GEMV for inference."""
    from nf4moe.kernels import ops

    calls = count_calls(monkeypatch, ops, "launch_routing_xa")
    x = torch.randn(2, 128, device=DEV)
    idx, w = routing(2, 4, 2, seed=83)
    with torch.no_grad():
        m0 = make_layer(4, 128, 64, rank=0, seed=84)
        plan = m0.launch_plan(x, idx, w)
        assert plan.kernels == ("gemv", "gemv") and (plan.routing, plan.up_xa) == ("kernel", "none")
        m0(x, idx, w)
    m = make_layer(4, 128, 64, rank=8, seed=85)
    x.requires_grad_()
    plan = m.launch_plan(x, idx, w)
    assert plan.up == "gemm" and (plan.routing, plan.up_xa) == ("kernel", "kernel")  # the up GEMM stores
    m(x, idx, w).sum().backward()
    assert calls == []


def test_xa_in_routing_rejects_negative_ids():
    if DEV != "cpu":
        pytest.skip("on a GPU the routing kernel traps (test_negative_ids_raise covers the device assert)")
    m = make_layer(4, 128, 64, rank=8, seed=86)
    x, idx = torch.randn(2, 128), torch.tensor([[0, -1], [2, 1]])
    with torch.no_grad():
        assert m.launch_plan(x, idx, torch.rand(2, 2)).routing == "kernel_xa"
        with pytest.raises(ValueError, match="top_k_index has negative expert ids"):
            m(x, idx, torch.rand(2, 2))


def test_xa_in_routing_leaves_other_index_dtypes_to_the_plain_routing(monkeypatch):
    """int16 ids (accepted by the layer, sorted by torch): the fold is not taken, the result is the plain path's
    (``xa_in_routing=False``); forcing the fold on them is refused."""
    from nf4moe.kernels import ops

    m = make_layer(4, 128, 64, rank=8, seed=87)
    x = torch.randn(2, 128, device=DEV)
    idx, w = routing(2, 4, 2, seed=88)
    idx = idx.to(torch.int16)
    with torch.no_grad():
        with nf4moe.plan_overrides(xa_in_routing=False):
            default = m(x, idx, w)
        plan = m.launch_plan(x, idx, w)
        assert (plan.routing, plan.up, plan.up_xa) == ("torch", "gemv", "kernel")
        calls = count_calls(monkeypatch, ops, "launch_routing_xa")
        out = m(x, idx, w)
        with nf4moe.plan_overrides(xa_in_routing=True), pytest.raises(ValueError, match="xa_in_routing=True"):
            m(x, idx, w)
    assert calls == [] and torch.equal(out, default)


def _checking_launcher(active: dict, launched: list):
    """A stand-in for wrap_triton: each launch checks that every tensor argument is a fake tensor of the trace
    in ``active["mode"]``, and records the kernel's name."""
    from torch._subclasses.fake_tensor import FakeTensor

    def launcher(kernel):
        fn = getattr(kernel, "fn", kernel)

        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    for a in (*args, *kwargs.values()):
                        if isinstance(a, torch.Tensor):
                            assert isinstance(a, FakeTensor) and a.fake_mode is active["mode"], \
                                f"{fn.__name__}: a tensor of another trace"
                    launched.append(fn.__name__)
                return launch
        return Grid()
    return launcher


@pytest.mark.skipif(DEV != "cpu", reason="drives the GPU ops' traced bodies with fake tensors and a checking launcher")
@pytest.mark.parametrize("t", [2, 40])  # the decode GEMV with its fused combine; the MMA GEMM and the combine kernel
def test_traced_bodies_launch_only_the_current_traces_tensors(monkeypatch, t):
    """On a GPU each op is a triton_op whose body torch.compile traces with fake tensors, more than once (Dynamo,
    then Inductor's lowering, each under its own fake mode), launching through wrap_triton.  A tensor kept across
    calls (a cache) would hand one trace's fake tensor to the next: Inductor then fails with "Mixing fake modes"
    (the fused combine's arrival counters, H100, session 21).  Here the ops run their bodies under two fake modes
    in turn, each kernel launch checked: every tensor argument belongs to the trace that launches it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nf4moe.kernels import ops

    active, launched = {}, []
    monkeypatch.setattr(ops, "_LAUNCHER", _checking_launcher(active, launched))
    for name, body in ops._BODIES.items():  # the bodies stand for the registered ops, as triton_op traces them
        monkeypatch.setitem(ops._OPS, name, body)
    m = make_layer(4, 128, 64, rank=8, seed=88)
    m.check_ids = False  # the CPU's id check reads a value (the GPU's is an asynchronous device assert)
    x = torch.randn(t, 128, dtype=torch.bfloat16)
    idx, w = routing(t, 4, 2, seed=89)
    w = w.to(torch.bfloat16)
    shapes = []
    for _ in range(2):
        launched.clear()
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            active["mode"] = mode
            state = {k: mode.from_tensor(v) for k, v in (*m.named_parameters(), *m.named_buffers())}
            out = torch.func.functional_call(m, state, (mode.from_tensor(x), mode.from_tensor(idx),
                                                        mode.from_tensor(w)))
        shapes.append(tuple(out.shape))
        assert "nf4_moe_gemv_kernel" in launched if t == 2 else "nf4_moe_gemm_kernel" in launched, launched
    assert shapes == [(t, 128)] * 2


@pytest.mark.skipif(DEV != "cpu", reason="drives the GPU ops' traced bodies with fake tensors and a checking launcher")
def test_traced_training_bodies_launch_only_the_current_traces_tensors(monkeypatch):
    """The same for every op a training step calls (the forward with its stores, the backward's GEMMs, LoRA
    gradients and combine): each call of a real CPU step is replayed through the op's body under two fake modes
    in turn, every launch checked."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from nf4moe.kernels import ops

    calls = training_step_calls(monkeypatch, 40, seed=90)
    active, launched = {}, []
    monkeypatch.setattr(ops, "_LAUNCHER", _checking_launcher(active, launched))
    for _ in range(2):
        launched.clear()
        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            active["mode"] = mode
            for name, args in calls:
                ops._BODIES[name](*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        assert "nf4_moe_gemm_kernel" in launched and "lora_grad_kernel" in launched, launched
