"""Gradients of the Triton layer (nf4moe::moe_experts and its backward kernels) against fp64 autograd.

The oracle is ``nf4moe.reference.moe_forward`` run in float64 on the dequantized NF4 weights with fp64
copies of every input, differentiated by torch autograd.  Compared per gradient by ‖g − ref‖ / ‖ref‖.

Bounds, and why:
- fp32 under the interpreter: the kernels do exact fp32 math (the interpreter's fp32 dot is a numpy
  matmul); the only difference from fp64 is fp32 rounding of operands and intermediates (~1e-7
  relative) and of the saved gate|up rows, so 1e-5.  On a GPU an fp32 tl.dot runs in tf32 (10-bit
  mantissa operands, ~5e-4 per product) and the gradients chain three such products (up, down and
  its transpose); d(top_k_weights) = <dhu, h> also cancels (terms of both signs), which amplifies
  the operands' error, so 2e-2.
- bf16: activations, dout, the saved gate|up rows, dgu and the per-pair dx rows are each rounded
  once to 8 mantissa bits (~4e-3 relative each); dgu feeds every up-side gradient, hence 3e-2.
- fp16 (11 bits): the same roundings at 5e-4 each: 5e-3.
On the CPU this runs under TRITON_INTERPRET=1 on small shapes; on a GPU the same tests run compiled.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.utils.checkpoint

import nf4moe
from nf4moe.kernels.plan import GEMV_MAX_ROWS, LaunchPlan
from nf4moe.reference import Lora, moe_forward

from triton_cases import DEV, make_layer, routing
INTERP = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (INTERP or DEV == "cuda"), reason="needs a GPU or TRITON_INTERPRET=1")

BOUND = {torch.float32: 1e-5 if (INTERP and DEV == "cpu") else 2e-2, torch.bfloat16: 3e-2, torch.float16: 5e-3}
PROJ = ("gate_up_proj", "down_proj")
ALL = ("x", "w", "A.gate_up_proj", "B.gate_up_proj", "A.down_proj", "B.down_proj")


@pytest.fixture(autouse=True)
def _gemv_rows_16():
    """Forwards that need no stored pre-activations (recompute mode's, and the down projection's where the plan
    gives it the decode GEMV) take it up to the plan's ``gemv_max_rows`` routed rows (default 64).  The
    interpreter runs the GEMV one program per row, ~7x slower than the GEMM's 16-row tiles at this file's larger
    cases (T=21, top-3: 98 s against 14 s), so here the threshold stays at 16 rows: the cases of T = 1 and 7 at
    top-2 still take that path, the forward tests cover the GEMV up to 64 rows."""
    if not INTERP:
        yield
        return
    with nf4moe.plan_overrides(gemv_max_rows=16):
        yield


def _params(m):
    return {f"{ab}.{p}": getattr(m, f"lora_{ab}")[p] for ab in "AB" for p in PROJ} if m.lora_rank else {}


def run_layer(m, x, idx, w, dout, wants):
    """Forward + backward of the Triton layer; returns (out, {name: grad or None})."""
    x = x.detach().clone().requires_grad_("x" in wants)
    w = w.detach().clone().requires_grad_("w" in wants)
    for name, p in _params(m).items():
        p.requires_grad_(name in wants)
        p.grad = None
    out = m(x, idx, w)
    out.backward(dout)
    grads = {"x": x.grad, "w": w.grad}
    grads.update({name: p.grad for name, p in _params(m).items()})
    return out, grads


def fp64_grads(m, x, idx, w, dout):
    """Every gradient of the fp64 reference layer on the same NF4 weights."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    lp = {n: p.detach().double().requires_grad_() for n, p in _params(m).items()}
    lora = {p: Lora(lp[f"A.{p}"], lp[f"B.{p}"]) for p in PROJ} if lp else {p: None for p in PROJ}
    out = moe_forward(x64, idx, w64, m.gate_up_nf4.dequantize(torch.float64), m.down_nf4.dequantize(torch.float64),
                      num_experts=m.num_experts, act=m.act, lora_gate_up=lora["gate_up_proj"],
                      lora_down=lora["down_proj"], lora_scaling=m.scaling, compute_dtype=torch.float64)
    out.backward(dout.double())
    grads = {"x": x64.grad, "w": w64.grad}
    grads.update({n: p.grad for n, p in lp.items()})
    return out.detach(), grads


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    assert ref.norm() > 0, "reference gradient is all zeros: degenerate test data"
    return float((out - ref).norm() / ref.norm())


def check(m, x, idx, w, wants=ALL, *, seed=0, bound=None, grad_bound=None):
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(x.shape[0], m.hidden_size, generator=g).to(device=DEV, dtype=x.dtype)
    out, grads = run_layer(m, x, idx, w, dout, wants)
    ref_out, ref = fp64_grads(m, x, idx, w, dout)
    bound = bound or BOUND[x.dtype]
    grad_bound = grad_bound or bound
    assert rel_err(out, ref_out) < bound
    for name in ALL:
        if name in wants and (name in ("x", "w") or m.lora_rank):
            assert grads[name] is not None, name
            assert grads[name].dtype == (x.dtype if name == "x" else w.dtype if name == "w" else torch.float32)
            assert torch.isfinite(grads[name]).all(), name
            err = rel_err(grads[name], ref[name])
            assert err < grad_bound, f"d{name}: rel err {err:.3g} >= {grad_bound}"
        else:
            assert grads.get(name) is None, f"d{name} computed but not asked for"
    return grads


CASES = [
    # (T, E, H, I, K, mode)
    (1, 4, 128, 64, 2, "random"),        # T = 1
    (7, 4, 128, 64, 2, "random"),        # T smaller than a tile
    (33, 4, 128, 64, 4, "random"),       # K == E
    (20, 6, 128, 64, 2, "one_expert"),   # one expert gets every token, the others none
    (25, 8, 128, 128, 3, "sentinels"),   # expert-parallel sentinel ids dropped
    (21, 8, 192, 320, 3, "random"),      # odd multiples of the NF4 block, several column tiles
]


@pytest.mark.parametrize("t,e,h,i,k,mode", CASES)
@pytest.mark.parametrize("rank", [0, 8])
def test_gradients_match_fp64(t, e, h, i, k, mode, rank):
    m = make_layer(e, h, i, rank=rank, nested=(t % 2 == 1), seed=t + rank)
    g = torch.Generator().manual_seed(t * 3 + rank)
    x = torch.randn(t, h, generator=g).to(DEV)
    idx, w = routing(t, e, k, seed=t * 7 + rank, mode=mode)
    check(m, x, idx, w, seed=t)


COMBOS = [
    ("x",),
    ("w",),
    ("x", "w"),                                                          # LoRA frozen
    ("A.gate_up_proj", "B.gate_up_proj", "A.down_proj", "B.down_proj"),  # hidden_states frozen
    ("A.gate_up_proj",), ("B.gate_up_proj",), ("A.down_proj",), ("B.down_proj",),
    ("w", "B.gate_up_proj", "B.down_proj"),
    ("x", "A.down_proj"),
]


@pytest.mark.parametrize("wants", COMBOS, ids=lambda c: "+".join(c))
def test_requires_grad_combinations(wants):
    m = make_layer(4, 128, 64, rank=16, nested=True, seed=5)
    x = torch.randn(13, 128, generator=torch.Generator().manual_seed(6)).to(DEV)
    idx, w = routing(13, 4, 2, seed=7, mode="sentinels")
    check(m, x, idx, w, wants)


def test_nothing_requires_grad_takes_inference_path():
    m = make_layer(4, 128, 64, rank=8, seed=8)
    for p in m.parameters():
        p.requires_grad_(False)
    x = torch.randn(5, 128, device=DEV)
    idx, w = routing(5, 4, 2, seed=9)
    out = m(x, idx, w)
    assert out.grad_fn is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype):
    m = make_layer(6, 128, 128, rank=8, nested=True, seed=12)
    x = torch.randn(23, 128, generator=torch.Generator().manual_seed(13)).to(DEV, dtype)
    idx, w = routing(23, 6, 2, seed=14)
    check(m, x, idx, w.to(dtype), seed=15)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh", "relu"])
def test_activations(act):
    m = make_layer(4, 128, 64, rank=8, act=act, seed=16)
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(17)).to(DEV)
    idx, w = routing(9, 4, 2, seed=18)
    # ReLU's derivative jumps at 0.  On a GPU fp32 activations run TF32 dots (the 2e-2 bound), so a gate
    # pre-activation within TF32 rounding of 0 can land on the other side of 0 than in the fp64 reference and
    # flip that (pair, column) term of every gradient: dx rel err 0.041 on an H100 (one or two of 1152 terms)
    # once the forward summed K in MMA order.  A wrong gradient is off by O(1), far above 0.08.  The forward
    # output is continuous there and keeps the fp32 bound.
    tf32_relu = act == "relu" and DEV == "cuda"
    check(m, x, idx, w, seed=19, grad_bound=0.08 if tf32_relu else None)


@pytest.mark.parametrize("blocksize,nested", [(32, True), (128, False)])
def test_blocksizes(blocksize, nested):
    """Column tile == blocksize (32) and column tile < blocksize (64 of 128)."""
    h = 256 if blocksize == 128 else 96
    m = make_layer(4, h, 128, rank=8, nested=nested, blocksize=blocksize, seed=20)
    x = torch.randn(11, h, generator=torch.Generator().manual_seed(21)).to(DEV)
    idx, w = routing(11, 4, 2, seed=22)
    check(m, x, idx, w, seed=23)


def test_zero_routing_weights():
    """d w at w = 0 is the unweighted slot output: exact zeros must not give NaN or 0."""
    m = make_layer(4, 128, 64, rank=8, seed=24)
    x = torch.randn(10, 128, generator=torch.Generator().manual_seed(25)).to(DEV)
    idx, w = routing(10, 4, 2, seed=26)
    w[::2, 0] = 0.0
    grads = check(m, x, idx, w, seed=27)
    assert (grads["w"][::2, 0].abs() > 0).all()


def test_non_contiguous_hidden_states_and_dout():
    m = make_layer(4, 128, 64, rank=8, seed=28)
    xfull = torch.randn(12, 256, generator=torch.Generator().manual_seed(29)).to(DEV)
    x = xfull[:, ::2].detach().requires_grad_()
    idx, w = routing(12, 4, 2, seed=30)
    out = m(x, idx, w)
    dout = torch.randn(128, 12, device=DEV).t()  # transposed: strided rows
    out.backward(dout)
    _, ref = fp64_grads(m, x, idx, w, dout)
    assert rel_err(x.grad, ref["x"]) < BOUND[torch.float32]
    assert rel_err(m.lora_B["down_proj"].grad, ref["B.down_proj"]) < BOUND[torch.float32]


def _all_grads(m, x, idx, w, dout):
    _, grads = run_layer(m, x, idx, w, dout, ALL)
    return grads


# 51 routed rows (the GEMM forward under the interpreter's 16-row GEMV threshold, the GEMV on a GPU) and 6 (the GEMV)
@pytest.mark.parametrize("t,k", [(17, 3), (3, 2)])
def test_recompute_mode_matches_save_mode(monkeypatch, t, k):
    """Recompute mode (``recompute=True``): the forward saves no pre-activation and runs the inference kernels
    (the decode GEMV at the small case), the backward rebuilds gate|up by one more up pass
    (``nf4moe::moe_up_preact``, the GEMM) with the plan of the forward."""
    from nf4moe.kernels import ops

    m = make_layer(6, 128, 64, rank=8, seed=31)
    x = torch.randn(t, 128, generator=torch.Generator().manual_seed(32)).to(DEV, torch.bfloat16)
    idx, w = routing(t, 6, k, seed=33, mode="sentinels")
    dout = torch.randn(t, 128, device=DEV, dtype=torch.bfloat16)
    saved = _all_grads(m, x, idx, w, dout)
    m.recompute = True
    runs = []
    real_run = ops.run
    monkeypatch.setattr(ops, "run", lambda name, *a, **kw: runs.append((name, a)) or real_run(name, *a, **kw))
    recomputed = _all_grads(m, x, idx, w, dout)
    forward = [a for name, a in runs if name == "moe_experts"]
    assert len(forward) == 1
    plan = LaunchPlan.from_key(ops.LayerInputs(*forward[0]).plan)
    gemv_rows = 16 if INTERP else GEMV_MAX_ROWS  # (_gemv_rows_16)
    assert not plan.save_preact and plan.up == ("gemv" if t * k <= gemv_rows else "gemm")
    preact = [a for name, a in runs if name == "moe_up_preact"]
    assert len(preact) == 1 and preact[0][-1] == plan.key
    for name in ALL:  # the backward rebuilds the same gate|up rows with the same kernel: bit-identical
        assert torch.equal(saved[name], recomputed[name]), name


def test_deterministic():
    m = make_layer(4, 128, 64, rank=8, seed=34)
    x = torch.randn(40, 128, generator=torch.Generator().manual_seed(35)).to(DEV, torch.bfloat16)
    idx, w = routing(40, 4, 3, seed=36)
    dout = torch.randn(40, 128, device=DEV, dtype=torch.bfloat16)
    a = _all_grads(m, x, idx, w, dout)
    b = _all_grads(m, x, idx, w, dout)
    for name in ALL:
        assert torch.equal(a[name], b[name]), name


def test_torch_compile():
    m = make_layer(4, 128, 64, rank=8, seed=37)
    x = torch.randn(10, 128, generator=torch.Generator().manual_seed(38)).to(DEV)
    idx, w = routing(10, 4, 2, seed=39)
    dout = torch.randn(10, 128, device=DEV)
    eager = _all_grads(m, x, idx, w, dout)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager" if DEV == "cpu" else "inductor")
    _, grads = run_layer(_CallAs(compiled, m), x, idx, w, dout, ALL)
    for name in ALL:
        assert rel_err(grads[name], eager[name]) < BOUND[torch.float32], name


class _CallAs:
    """Calls ``fn`` but exposes ``mod``'s attributes (LoRA params) to run_layer."""

    def __init__(self, fn, mod):
        self._fn, self._mod = fn, mod

    def __call__(self, *args):
        return self._fn(*args)

    def __getattr__(self, name):
        return getattr(self._mod, name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpoint(reentrant):
    m = make_layer(4, 128, 64, rank=8, seed=40)
    x = torch.randn(11, 128, generator=torch.Generator().manual_seed(41)).to(DEV)
    idx, w = routing(11, 4, 2, seed=42)
    dout = torch.randn(11, 128, device=DEV)
    eager = _all_grads(m, x, idx, w, dout)

    def ckpt(*args):
        return torch.utils.checkpoint.checkpoint(m, *args, use_reentrant=reentrant)

    _, grads = run_layer(_CallAs(ckpt, m), x, idx, w, dout, ALL)
    for name in ALL:  # the recomputed forward is the same kernels on the same inputs
        assert torch.equal(grads[name], eager[name]), name


def test_no_full_weight_sized_tensor_allocated():
    """No bf16/fp16/fp32 tensor with as many elements as an expert weight tensor (E*H*I, the smaller
    of the two) is created during forward + backward: nothing dequantizes a whole weight.

    A TorchDispatchMode sees every aten op's outputs; the nf4moe custom ops are opaque to it, so their
    Python bodies are run under the mode instead (``_init_fn`` is the function custom_op wrapped).
    """
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    from nf4moe.kernels import ops

    class Track(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []
            self.custom = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "nf4moe":
                self.custom += 1
                with self:
                    out = getattr(ops, func._opname)._init_fn(*args, **kwargs)
            else:
                out = func(*args, **kwargs)
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    self.sizes.append((t.numel(), str(func)))
            return out

    e, h, i = 4, 128, 64
    m = make_layer(e, h, i, rank=8, seed=43)
    x = torch.randn(24, h, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    idx, w = routing(24, e, 3, seed=44)
    w.requires_grad_()
    with Track() as tr:
        out = m(x, idx, w)
        out.backward(torch.randn_like(out))
    for p in [x, w, *m.parameters()]:
        assert p.grad is not None
    assert tr.custom >= 5  # forward op and the backward ops were all looked into
    big = [s for s in tr.sizes if s[0] >= e * h * i]
    assert not big, f"full-weight-sized tensors allocated: {big}"
    assert max(n for n, _ in tr.sizes) > 24 * 3 * 64  # the tracker did see the (P, 2I) activations


def test_outputs_poisoned_before_run(nan_new_empty):
    """Every buffer from new_empty starts as NaN: an element a backward kernel forgets to write shows up."""
    m = make_layer(8, 128, 64, rank=8, seed=45)
    x = torch.randn(21, 128, generator=torch.Generator().manual_seed(46)).to(DEV)
    idx, w = routing(21, 8, 3, seed=47, mode="sentinels")
    check(m, x, idx, w, seed=48)


def test_opcheck_backward_ops():
    from nf4moe.kernels import ops
    from nf4moe.moe_layers.triton_backend import launch_plan

    m = make_layer(4, 128, 64, rank=8, seed=49)
    x = torch.randn(6, 128, device=DEV)
    idx, w = routing(6, 4, 2, seed=50)
    plan = launch_plan(m, x, idx, w)  # the LoRA factors require grad: the training plan
    assert plan.save_preact
    r, xa_up = ops.route(plan, idx, 4, check_ids=False)
    assert xa_up is None
    gu, dn = m.gate_up_nf4.operand.fields(), m.down_nf4.operand.fields()
    lo = {k: v.detach() for k, v in _params(m).items()}
    lora = (lo["A.gate_up_proj"], lo["B.gate_up_proj"], lo["A.down_proj"], lo["B.down_proj"])
    s, sp, eo = m.scaling, r.sorted_pair_ids, r.expert_offsets
    utils = ("test_schema", "test_faketensor")
    fwd = tuple(ops.LayerInputs.of(x, idx, w, r, m.gate_up_nf4.operand, m.down_nf4.operand, lora, s, "silu", plan))
    assert fwd[-2:] == (plan.key, None)
    torch.library.opcheck(ops.moe_experts, fwd, test_utils=utils)
    out, g, xa = ops.moe_experts(*fwd)
    assert g.shape == (12, 128) and xa.shape == (12, 16)  # saved for the backward
    m.recompute = True
    recompute_plan = launch_plan(m, x, idx, w)
    assert not recompute_plan.save_preact
    pre = (x, *gu, lo["A.gate_up_proj"], lo["B.gate_up_proj"], s, sp, eo, 2, 64, 256, "silu", True,
           recompute_plan.key)
    torch.library.opcheck(ops.moe_up_preact, pre, test_utils=utils)
    dout = torch.randn_like(out)
    down = (dout, g, w.reshape(-1), *dn, lo["A.down_proj"], lo["B.down_proj"], s, sp, eo, 2, 64, 256, "silu",
            True, True, True, True, plan.key)
    torch.library.opcheck(ops.moe_down_bwd, down, test_utils=utils)
    dgu, dw, dzb, xa_d = ops.moe_down_bwd(*down)
    up = (dgu, *gu, lo["A.gate_up_proj"], lo["B.gate_up_proj"], s, sp, eo, 64, 256, True, True, plan.key)
    torch.library.opcheck(ops.moe_up_bwd, up, test_utils=utils)
    lg = (dgu, xa, sp, eo, None, 4, 128, 8, s, 2, False, False, False, False, "silu", torch.float32)
    torch.library.opcheck(ops.lora_grad, lg, test_utils=utils)


def test_t_zero_keeps_lora_in_the_graph():
    """An empty batch shard still returns a (0, H) output whose backward reaches the LoRA factors (zero)."""
    m = nf4moe.QuantGroupedExperts.from_weights(torch.randn(4, 128, 128) * 0.05, torch.randn(4, 128, 64) * 0.05,
                                                lora_rank=8, backend="triton")
    x = torch.randn(0, 128, requires_grad=True)
    out = m(x, torch.zeros(0, 2, dtype=torch.long), torch.rand(0, 2))
    assert out.shape == (0, 128) and out.requires_grad
    out.sum().backward()
    for p in m.lora_A.values():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))


def test_recompute_constructor_argument():
    m = nf4moe.QuantGroupedExperts(4, 128, 64, lora_rank=8, recompute=True)
    assert m.recompute is True


def test_double_backward_is_refused_not_silently_dropped():
    """The layer has no second derivative: a backward under create_graph=True must not hand back
    gradients detached from the graph (a penalty on them would silently add nothing); the ops it runs are
    recorded by autograd, which refuses to differentiate them."""
    m = make_layer(4, 128, 64, rank=8, seed=51)
    x = torch.randn(7, 128, device=DEV, dtype=torch.float32, requires_grad=True)
    idx, w = routing(7, 4, 2, seed=52)
    out = m(x, idx, w)
    (g,) = torch.autograd.grad((out ** 2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="autograd"):
        (g ** 2).sum().backward()
