"""Property tests: random layers, routings and inputs, both backends against the fp64 oracle (tests/fp64_oracle.py).

Hypothesis draws a ``Case``: E, K (K == E reachable), T (0, 1, under a 16-row tile, over it), H and I as 1x, 2x or
3x (odd multiples) the NF4 blocksize (32, 64, 128; up to 256 on the reference backend), LoRA rank (0 or small),
double quantization on or off, the activation, the dtypes of the hidden states, routing weights, LoRA factors,
source weights and expert ids, a routing form (random, one hot expert, empty experts, every slot a sentinel) with
sentinel ids >= E (E itself, E + 7, the id dtype's maximum) mixed in, and non-contiguous layouts of every input.
The Triton backend also draws its kernels through ``nf4moe.plan_overrides`` (decode GEMV or MMA GEMM per
projection, the routing form, where the GEMM's LoRA X·Aᵀ comes from).  Each case checks: output shape and dtype,
finite output, a token whose slots are all sentinels gets an exact zero row, and ‖out − ref‖ / ‖ref‖ below the
dtype's bound against ``dense_moe_fp64`` on the dequantized NF4 weights (quantization error is in no bound).
A few cases also check every gradient of a training step against fp64 autograd.

Reproducibility: every test runs with ``derandomize=True``, so Hypothesis seeds its generator from a hash of the
test's source: every run (CI or a laptop) draws the same examples, until the test's source or the Hypothesis
version changes, and no example database is read or written (derandomize implies database=None), so nothing a
previous run left behind changes what runs.  A failure prints its ``Case`` (and a ``@reproduce_failure`` blob);
paste the case into an ``@example(...)`` to keep it.

Cost: the Triton backend runs under TRITON_INTERPRET=1 on the CPU (0.1-1 s a call at these sizes), so its shapes
are tiny and its example counts small; the reference backend is cheap and takes most examples.  Examples per run:
see EXAMPLES below (>= 300 in all).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from unittest import mock

import bitsandbytes.functional as bnbf
import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import nf4moe
from fp64_oracle import dense_moe_fp64
from nf4moe import NF4Weight, QuantGroupedExperts
from nf4moe.moe_layers import nf4_weight

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not (INTERP or CUDA), reason="the Triton backend needs a GPU or TRITON_INTERPRET=1")

# Examples per test and run (derandomized: the same ones every run).
EXAMPLES = {"reference": 150, "reference_wide": 40, "triton_gemv_gemv": 8, "triton_gemv_gemm": 8,
            "triton_gemm_gemv": 8, "triton_gemm_gemm": 18, "triton_grad": 6, "quantize": 50, "non_finite": 40}

PROFILE = settings(
    deadline=None,  # interpreted kernels take 0.1-1 s; timing is not what is tested
    derandomize=True,
    print_blob=True,
    # nan_new_empty / one_thread hold for the whole test, the same for every example: nothing to reset between them
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# The interpreted Triton tests do not shrink a failure: shrinking replays hundreds of cases (5 minutes, Hypothesis'
# cap, at these costs), and the failing case, printed whole, reproduces as it is (derandomized).  To minimise it,
# run the test locally with phases including Phase.shrink.
TRITON_PROFILE = settings(PROFILE, phases=[Phase.explicit, Phase.generate])

# ‖out − ref‖ / ‖ref‖ bounds against the fp64 oracle on the dequantized weights, per hidden-state dtype.
# Reference backend: fp32 math on fp32 dequantized weights, one rounding to the output dtype at the end.
#   fp32: dot products of length <= 768 in fp32 (~sqrt(n) * 2^-24 ~ 1e-6; measured 4.7e-7) -> 2e-5;
#   fp16 / bf16: the final rounding, at most 2^-11 / 2^-8 relative per element (measured 2.4e-4 / 1.9e-3)
#   -> 2e-3 / 1e-2;  fp64 inputs compute in fp64 (measured 6.6e-16) -> 1e-12.
REFERENCE_BOUND = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
# Triton backend: dot operands in the activation dtype with fp32 accumulation, so besides the output's rounding
# the dequantized weight tiles, the SwiGLU output h and the LoRA X·Aᵀ are each rounded to the activation dtype.
#   fp32 interpreted: exact fp32 (the interpreter's dot is a numpy matmul; measured 2.8e-7) -> 1e-5; compiled,
#   fp32 dots run TF32 (10-bit operands, ~5e-4 relative each) -> 5e-3;
#   fp16: 2^-11 per rounding, four in sequence (measured 5e-4) -> 5e-3;
#   bf16 compiled: 2^-8 per rounding, the same four -> 2e-2.
#   bf16 under the interpreter: Triton 3.9's interpreter converts fp32 to bf16 by truncation (cast_impl passes no
#   rounding mode to _convert_float), not round-to-nearest-even as compiled code does: every rounding is biased
#   (mean -2.8e-3 against RNE's 0), so the errors of the dequantized weight tiles, h, X·Aᵀ and the output add up
#   instead of cancelling; measured up to 1.4e-2 here (an fp64 emulation with RNE at each of those points: 5.7e-3)
#   -> 3e-2.
TRITON_BOUND = {torch.float32: 1e-5 if INTERP else 5e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2 if INTERP else 2e-2}
# Gradients (tests/test_triton_backward.py derives these): interpreted fp32 is exact fp32 math -> 1e-5 (measured
# 2e-7); compiled fp32 runs TF32 dots, three chained products and d(top_k_weights)'s cancellation -> 2e-2; bf16:
# dout, the saved gate|up rows, dgu and the per-pair dx rows each rounded once (truncated under the interpreter,
# see above; measured 1.3e-2) -> 3e-2; fp16 the same at 2^-11 (measured 5.5e-4) -> 5e-3.
GRAD_BOUND = {torch.float32: 1e-5 if INTERP else 2e-2, torch.float16: 5e-3, torch.bfloat16: 3e-2}

ACTS = ("silu", "gelu", "gelu_tanh", "relu")
FLOATS = (torch.float32, torch.bfloat16, torch.float16)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8)
ROUTINGS = ("random", "hot", "subset", "all_sentinels")
X_LAYOUTS = ("contiguous", "col_strided", "transposed", "offset")  # how the (T, H) hidden states sit in memory
TK_LAYOUTS = ("contiguous", "transposed", "col_strided")  # the (T, K) ids and weights


@dataclass(frozen=True)
class Case:
    e: int
    k: int
    t: int
    h: int
    i: int
    blocksize: int
    rank: int
    nested: bool
    act: str
    dtype: torch.dtype  # hidden states, and so the output
    w_dtype: torch.dtype  # routing weights
    lora_dtype: torch.dtype
    weight_dtype: torch.dtype  # expert weights before quantization
    index_dtype: torch.dtype
    routing: str  # ROUTINGS
    sentinel_frac: float  # share of slots turned into sentinels (besides "all_sentinels")
    sentinel_id: str  # "e" (E itself), "far" (E + 7), "max" (the index dtype's largest value)
    x_layout: str
    tk_layout: str
    seed: int


@st.composite
def cases(draw, *, max_e, max_k, max_t, mults, blocksizes, dtypes, ranks, acts=ACTS, max_pairs=None):
    e = draw(st.integers(1, max_e))
    k = draw(st.integers(1, min(e, max_k)))
    # T = 0 and T = 1 a sixth of the time each; the rest from 2 up (Hypothesis favours the small end)
    t = {"zero": 0, "one": 1}.get(draw(st.sampled_from(["zero", "one", "more", "more", "more", "more"])))
    if t is None:
        t = draw(st.integers(2, max_t))
    if max_pairs is not None:
        t = min(t, max(1, max_pairs // k)) if t else 0
    bs = draw(st.sampled_from(blocksizes))
    h = bs * draw(st.sampled_from(mults))
    i = bs * draw(st.sampled_from(mults))
    dtype = draw(st.sampled_from(dtypes))
    quant_dtypes = FLOATS if dtype == torch.float64 else (dtype, *[d for d in FLOATS if d != dtype])
    index_dtype = draw(st.sampled_from(INDEX_DTYPES))  # int8's 127 still exceeds every E + 7 drawn here
    return Case(
        e=e, k=k, t=t, h=h, i=i, blocksize=bs, rank=draw(st.sampled_from(ranks)), nested=draw(st.booleans()),
        act=draw(st.sampled_from(acts)), dtype=dtype, w_dtype=draw(st.sampled_from((dtype, torch.float32))),
        lora_dtype=draw(st.sampled_from(quant_dtypes[:1] + (torch.float32,))),
        weight_dtype=draw(st.sampled_from(quant_dtypes)), index_dtype=index_dtype,
        routing=draw(st.sampled_from(ROUTINGS + ROUTINGS[:3])),  # every slot a sentinel: 1 in 7
        sentinel_frac=draw(st.sampled_from([0.0, 0.0, 0.25, 0.6])),
        sentinel_id=draw(st.sampled_from(["e", "far", "max"])), x_layout=draw(st.sampled_from(X_LAYOUTS)),
        tk_layout=draw(st.sampled_from(TK_LAYOUTS)), seed=draw(st.integers(0, 2**31 - 1)),
    )


# ---------------------------------------------------------------------------------------------- building a case
def build_layer(c: Case, backend: str) -> QuantGroupedExperts:
    g = torch.Generator().manual_seed(c.seed)
    gu = (torch.randn(c.e, 2 * c.i, c.h, generator=g) * c.h**-0.5).to(c.weight_dtype)
    dn = (torch.randn(c.e, c.h, c.i, generator=g) * c.i**-0.5).to(c.weight_dtype)
    m = QuantGroupedExperts.from_weights(gu.to(DEV), dn.to(DEV), act=c.act, lora_rank=c.rank,
                                         lora_alpha=2 * c.rank if c.rank else None, blocksize=c.blocksize,
                                         compress_statistics=c.nested, backend=backend, lora_dtype=c.lora_dtype)
    with torch.no_grad():  # B non-zero (PEFT inits it to 0): the LoRA terms carry signal a kernel could drop
        for p in m.lora_B.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def _layout(full_shape, layout: str, make) -> torch.Tensor:
    """A tensor of ``full_shape`` (rows, cols) laid out as ``layout``, values from ``make(shape)``."""
    r, c = full_shape
    if layout == "col_strided":
        return make((r, 2 * c))[:, ::2]
    if layout == "transposed":
        return make((c, r)).t()
    if layout == "offset":
        return make((r + 1, c))[1:]
    return make((r, c))


def build_inputs(c: Case):
    """(hidden_states, top_k_index, top_k_weights) of the case, in its dtypes, layouts and on the device."""
    g = torch.Generator().manual_seed(c.seed + 1)
    rows = []
    hot = int(torch.randint(c.e, (1,), generator=g))
    allowed = torch.randperm(c.e, generator=g)[: max(c.k, (c.e + 1) // 2)]  # "subset": the other experts get none
    for _ in range(c.t):
        if c.routing == "subset":
            row = allowed[torch.randperm(len(allowed), generator=g)[: c.k]]
        else:
            row = torch.randperm(c.e, generator=g)[: c.k]
            if c.routing == "hot" and hot not in row.tolist():
                row[int(torch.randint(c.k, (1,), generator=g))] = hot
        rows.append(row)
    ids = torch.stack(rows) if rows else torch.zeros(0, c.k, dtype=torch.long)
    sentinel = {"e": c.e, "far": c.e + 7, "max": torch.iinfo(c.index_dtype).max}[c.sentinel_id]
    drop = torch.ones(c.t, c.k, dtype=torch.bool) if c.routing == "all_sentinels" else (
        torch.rand(c.t, c.k, generator=g) < c.sentinel_frac)
    ids = torch.where(drop, torch.full_like(ids, sentinel), ids)
    values = {"x": torch.randn(c.t, c.h, generator=g), "ids": ids, "w": torch.rand(c.t, c.k, generator=g) + 0.05}
    out = []
    for name, shape, layout, dtype in (("x", (c.t, c.h), c.x_layout, c.dtype),
                                        ("ids", (c.t, c.k), c.tk_layout, c.index_dtype),
                                        ("w", (c.t, c.k), c.tk_layout, c.w_dtype)):
        # The base tensor is made in the final dtype on the device, then viewed: a later .to() would copy a
        # non-dense view into a contiguous one.
        view = _layout(shape, layout, lambda s, dt=dtype: torch.full(s, 7, dtype=dt, device=DEV))
        view.copy_(values[name])
        out.append(view)
    return tuple(out)


def oracle(m: QuantGroupedExperts, x, ids, w) -> torch.Tensor:
    lora = None
    if m.lora_rank:
        lora = {p: (m.lora_A[p].detach().cpu(), m.lora_B[p].detach().cpu()) for p in ("gate_up_proj", "down_proj")}
    return dense_moe_fp64(x.cpu(), ids.cpu().long(), w.cpu(), m.gate_up_nf4.dequantize(torch.float32).cpu(),
                          m.down_nf4.dequantize(torch.float32).cpu(), act=m.act, lora=lora, scaling=m.scaling)


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return float((out - ref).norm() / ref.norm())


def check_forward(c: Case, backend: str, bound: float) -> None:
    m = build_layer(c, backend)
    x, ids, w = build_inputs(c)
    with torch.no_grad():
        out = m(x, ids, w)
    assert out.shape == (c.t, c.h) and out.dtype == c.dtype and out.device == x.device
    assert torch.isfinite(out).all(), "non-finite output"
    ref = oracle(m, x, ids, w)
    dropped = ~((ids.cpu().long() >= 0) & (ids.cpu().long() < c.e)).any(dim=1)  # tokens with only sentinels
    assert torch.equal(out.cpu()[dropped], torch.zeros_like(out.cpu()[dropped])), "a dropped token's row is not 0"
    if ref.norm() == 0:  # T == 0 or every slot a sentinel: nothing else to compare
        return
    err = rel(out, ref)
    assert err < bound, f"rel err {err:.3g} >= {bound}"


# ---------------------------------------------------------------------------------------------- reference backend
# Explicit edge cases run first on every run, whatever Hypothesis draws.
EDGES = [
    Case(e=4, k=2, t=0, h=64, i=64, blocksize=64, rank=4, nested=True, act="silu", dtype=torch.float32,
         w_dtype=torch.float32, lora_dtype=torch.float32, weight_dtype=torch.bfloat16, index_dtype=torch.int64,
         routing="random", sentinel_frac=0.0, sentinel_id="e", x_layout="contiguous", tk_layout="contiguous", seed=1),
    Case(e=3, k=3, t=1, h=192, i=96, blocksize=32, rank=0, nested=False, act="gelu", dtype=torch.bfloat16,
         w_dtype=torch.float32, lora_dtype=torch.bfloat16, weight_dtype=torch.float16, index_dtype=torch.int32,
         routing="hot", sentinel_frac=0.0, sentinel_id="e", x_layout="transposed", tk_layout="transposed", seed=2),
    Case(e=5, k=1, t=17, h=128, i=128, blocksize=128, rank=2, nested=True, act="silu", dtype=torch.float16,
         w_dtype=torch.float16, lora_dtype=torch.float32, weight_dtype=torch.bfloat16, index_dtype=torch.uint8,
         routing="hot", sentinel_frac=0.25, sentinel_id="max", x_layout="col_strided", tk_layout="col_strided",
         seed=3),
    Case(e=4, k=2, t=6, h=64, i=192, blocksize=64, rank=1, nested=True, act="relu", dtype=torch.float32,
         w_dtype=torch.float32, lora_dtype=torch.float32, weight_dtype=torch.float32, index_dtype=torch.int64,
         routing="all_sentinels", sentinel_frac=0.0, sentinel_id="max", x_layout="offset", tk_layout="contiguous",
         seed=4),
    Case(e=6, k=2, t=9, h=64, i=64, blocksize=64, rank=8, nested=False, act="gelu_tanh", dtype=torch.bfloat16,
         w_dtype=torch.bfloat16, lora_dtype=torch.bfloat16, weight_dtype=torch.bfloat16, index_dtype=torch.int16,
         routing="subset", sentinel_frac=0.6, sentinel_id="far", x_layout="contiguous", tk_layout="transposed",
         seed=5),
]


def with_edges(*extras: dict):
    """@example for each of EDGES, the k-th with ``extras[k % len(extras)]`` as the other arguments."""
    def decorate(test):
        for n, c in enumerate(EDGES):
            test = example(c=c, **(extras[n % len(extras)] if extras else {}))(test)
        return test

    return decorate


@with_edges()
@settings(PROFILE, max_examples=EXAMPLES["reference"])
@given(c=cases(max_e=8, max_k=8, max_t=40, mults=(1, 2, 3), blocksizes=(32, 64, 128),
               dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64), ranks=(0, 0, 1, 4, 16)))
def test_reference_backend_matches_fp64(c, one_thread):
    check_forward(c, "reference", REFERENCE_BOUND[c.dtype])


@settings(PROFILE, max_examples=EXAMPLES["reference_wide"])
@given(c=cases(max_e=10, max_k=6, max_t=48, mults=(1, 3, 5), blocksizes=(64, 256),
               dtypes=(torch.float32, torch.bfloat16, torch.float16, torch.float64), ranks=(0, 2, 8))
       .filter(lambda c: c.h <= 768 and c.i <= 768))
def test_reference_backend_wide_shapes_match_fp64(c, one_thread):
    """Fewer, larger cases: 5x the blocksize, blocksize 256, up to 48 tokens of 10 experts."""
    check_forward(c, "reference", REFERENCE_BOUND[c.dtype])


# ---------------------------------------------------------------------------------------------- Triton backend
# Tiny shapes (the interpreter): H, I <= 192, E <= 6, K <= 4, at most 40 routed rows (two 16-row tiles of one
# expert for a hot expert, several experts' tiles otherwise).
TINY = dict(max_e=6, max_k=4, max_t=20, mults=(1, 2, 3), blocksizes=(32, 64, 128), dtypes=FLOATS,
            ranks=(0, 1, 4, 8), max_pairs=40)


# The interpreter's GEMV configs are 64 outputs wide; a narrower one (I = 32 for the up GEMV's gate and up halves,
# H = 32 for the down GEMV) takes the 4-wide fallback config: ~10x the interpreted programs, 7-20 s a call.  Under
# the interpreter the GEMV gets H, I >= 64 (GPU runs take every width).
GEMV_MIN = 64 if INTERP else 0


def tiny_cases(min_hi=0, max_pairs=40, max_hi=192):
    return cases(**{**TINY, "max_pairs": max_pairs}).filter(
        lambda c: min_hi <= min(c.h, c.i) and max(c.h, c.i) <= max_hi)


@contextlib.contextmanager
def kernels(c: Case, up: str, down: str, routing: str | None, xa: str | None):
    """plan_overrides for the case; the routing kernel only takes int32 / int64 ids (else torch's sort)."""
    choices = {"up": up, "down": down}
    if routing == "kernel" and c.index_dtype in (torch.int32, torch.int64):
        choices["routing"] = "kernel"
    elif routing == "torch":
        choices["routing"] = "torch"
    if xa is not None and "gemm" in (up, down):
        choices["xa"] = xa
    with nf4moe.plan_overrides(**choices):
        yield


def check_triton(c: Case, up: str, down: str, routing: str | None, xa: str | None) -> None:
    with kernels(c, up, down, routing, xa):
        check_forward(c, "triton", TRITON_BOUND[c.dtype])


# One test per (up, down) kernel pair, so that pytest-xdist spreads the interpreted work over its workers.  Each
# draws the routing form (the plan's choice, the routing kernel, torch's sort) and, for a GEMM, where its LoRA
# X·Aᵀ comes from (the plan's choice, the K loop, lora_xa's launch).  Every buffer the launchers allocate starts
# NaN (nan_new_empty), so an element a kernel leaves unwritten fails the case.
ROUTING_CHOICE = st.sampled_from([None, "kernel", "torch"])
XA_CHOICE = st.sampled_from([None, "loop", "kernel"])


@needs_triton
@with_edges(dict(routing=None), dict(routing="kernel"), dict(routing="torch"))
@settings(TRITON_PROFILE, max_examples=EXAMPLES["triton_gemv_gemv"])
@given(c=tiny_cases(GEMV_MIN, max_pairs=16, max_hi=128), routing=ROUTING_CHOICE)
def test_triton_gemv_gemv_matches_fp64(c, routing, nan_new_empty, one_thread):
    """The decode path: both projections by the GEMV (the down GEMV's fused combine where the plan takes it)."""
    check_triton(c, "gemv", "gemv", routing, None)


@needs_triton
@settings(TRITON_PROFILE, max_examples=EXAMPLES["triton_gemv_gemm"])
@given(c=tiny_cases(max_pairs=16, max_hi=128).filter(lambda c: c.i >= GEMV_MIN), routing=ROUTING_CHOICE, xa=XA_CHOICE)
def test_triton_gemv_up_gemm_down_matches_fp64(c, routing, xa, nan_new_empty, one_thread):
    check_triton(c, "gemv", "gemm", routing, xa)


@needs_triton
@settings(TRITON_PROFILE, max_examples=EXAMPLES["triton_gemm_gemv"])
@given(c=tiny_cases(max_pairs=16, max_hi=128).filter(lambda c: c.h >= GEMV_MIN), routing=ROUTING_CHOICE, xa=XA_CHOICE)
def test_triton_gemm_up_gemv_down_matches_fp64(c, routing, xa, nan_new_empty, one_thread):
    check_triton(c, "gemm", "gemv", routing, xa)


@needs_triton
@with_edges(dict(routing=None, xa="loop"), dict(routing="kernel", xa="kernel"), dict(routing="torch", xa=None))
@settings(TRITON_PROFILE, max_examples=EXAMPLES["triton_gemm_gemm"])
@given(c=tiny_cases(), routing=ROUTING_CHOICE, xa=XA_CHOICE)
def test_triton_gemm_gemm_matches_fp64(c, routing, xa, nan_new_empty, one_thread):
    """The MMA GEMM on both projections, up to 40 routed rows (several 16-row tiles, a hot expert's two)."""
    check_triton(c, "gemm", "gemm", routing, xa)


PROJ = ("gate_up_proj", "down_proj")


def _lora_params(m):
    return {f"{ab}.{p}": getattr(m, f"lora_{ab}")[p] for ab in "AB" for p in PROJ} if m.lora_rank else {}


@needs_triton
@settings(TRITON_PROFILE, max_examples=EXAMPLES["triton_grad"])
@given(c=cases(max_e=4, max_k=3, max_t=10, mults=(1, 3), blocksizes=(32, 64), dtypes=FLOATS, ranks=(0, 4),
               acts=("silu", "gelu"), max_pairs=16).filter(lambda c: c.t and c.h <= 96 and c.i <= 96),
       recompute=st.booleans())
def test_triton_gradients_match_fp64(c, recompute, one_thread):
    """A training step's gradients (x, top_k_weights, every LoRA factor) against fp64 autograd of the oracle, with
    the up pre-activations saved or recomputed (then the forward may take the GEMV).  T >= 1: the empty batch's
    graph is tests/test_triton_backward.py's.  (No ReLU: its derivative jumps at 0, where a rounding can flip it.)"""
    torch.manual_seed(c.seed)  # anything drawn from the global generator: the same in every test order
    m = build_layer(c, "triton")
    m.recompute = recompute
    x, ids, w = build_inputs(c)
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    params = _lora_params(m)
    for p in params.values():
        p.requires_grad_(True)
    out = m(x, ids, w)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(c.seed + 2)).to(device=DEV, dtype=c.dtype)
    out.backward(dout)

    x64, w64 = x.detach().cpu().double().requires_grad_(), w.detach().cpu().double().requires_grad_()
    p64 = {n: p.detach().cpu().double().requires_grad_() for n, p in params.items()}
    lora = {p: (p64[f"A.{p}"], p64[f"B.{p}"]) for p in PROJ} if p64 else None
    ref = dense_moe_fp64(x64, ids.cpu().long(), w64, m.gate_up_nf4.dequantize(torch.float32).cpu(),
                         m.down_nf4.dequantize(torch.float32).cpu(), act=c.act, lora=lora, scaling=m.scaling)
    if ref.requires_grad:  # (every slot a sentinel: the oracle's output depends on nothing)
        ref.backward(dout.cpu().double())
    got = {"x": x.grad, "w": w.grad, **{n: p.grad for n, p in params.items()}}
    want = {"x": x64.grad, "w": w64.grad, **{n: p.grad for n, p in p64.items()}}
    for name, g in got.items():
        # d(top_k_weights) is one number per routed pair (as few as 2 here): each a dot over H of 16-bit rounded
        # terms that cancel, so its relative error is not averaged over many elements as dx's is (bf16 seen at
        # 4.4e-2: T=3, 60% sentinels); hence 3x the bound
        bound = GRAD_BOUND[c.dtype] * (3 if name == "w" and c.dtype != torch.float32 else 1)
        tensor = {"x": x, "w": w, **params}[name]
        assert g is not None, f"d{name} missing"
        assert g.shape == tensor.shape and g.dtype == tensor.dtype, name
        assert torch.isfinite(g).all(), f"d{name} not finite"
        if want[name] is None or want[name].norm() == 0:  # every slot a sentinel: the gradient is exactly zero
            assert not g.any(), f"d{name} is not zero though nothing reaches it"
            continue
        err = rel(g, want[name])
        assert err < bound, f"d{name}: rel err {err:.3g} >= {bound}"


# ---------------------------------------------------------------------------------------------- quantization
@settings(PROFILE, max_examples=EXAMPLES["quantize"])
@given(e=st.integers(1, 6), out=st.integers(1, 40), blocks=st.integers(1, 5), blocksize=st.sampled_from([32, 64, 128]),
       dtype=st.sampled_from(FLOATS), nested=st.booleans(), chunk=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_quantize_is_bitsandbytes(e, out, blocks, blocksize, dtype, nested, chunk, seed):
    """Chunked quantization gives bitsandbytes' bytes and statistics for the whole tensor, whatever the chunking
    (``chunk`` experts per bitsandbytes call), and dequantizes bit-exactly as bitsandbytes does."""
    w = (torch.randn(e, out, blocks * blocksize, generator=torch.Generator().manual_seed(seed)) * 3).to(dtype)
    with mock.patch.object(nf4_weight, "_CHUNK_ELEMENTS", chunk * out * blocks * blocksize):
        m = NF4Weight.quantize(w, blocksize, nested)
    q, qs = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    assert torch.equal(m.packed.reshape(-1), q.reshape(-1))
    if nested:
        assert torch.equal(m.absmax.reshape(-1), qs.absmax) and torch.equal(m.absmax2, qs.state2.absmax)
        assert torch.equal(m.offset, torch.as_tensor(qs.offset))
    else:
        assert torch.equal(m.absmax.reshape(-1), qs.absmax)
    assert torch.equal(m.dequantize(), bnbf.dequantize_4bit(q, qs))
    for x in range(e):
        assert torch.equal(m.dequantize_expert(x), m.dequantize()[x])


@settings(PROFILE, max_examples=EXAMPLES["non_finite"])
@given(e=st.integers(1, 6), nested=st.booleans(), dtype=st.sampled_from(FLOATS), chunk=st.integers(1, 4),
       poison=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 7), st.integers(0, 127),
                                 st.sampled_from([math.nan, math.inf, -math.inf])), min_size=1, max_size=6))
def test_non_finite_refusal_names_exactly_the_poisoned_experts(e, nested, dtype, chunk, poison):
    """Wherever NaN / Inf sit, across chunk boundaries, the error counts them and lists exactly their experts."""
    w = torch.randn(e, 8, 128, generator=torch.Generator().manual_seed(e)).to(dtype)
    for ex, r, col, v in poison:
        w[ex % e, r, col] = v
    bad = ~torch.isfinite(w)
    with mock.patch.object(nf4_weight, "_CHUNK_ELEMENTS", chunk * 8 * 128), pytest.raises(ValueError) as err:
        NF4Weight.quantize(w, 64, nested)
    text = str(err.value)
    hit = [x for x in range(e) if bad[x].any()]
    n_nan, n_inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
    assert f"has {n_nan + n_inf} non-finite values ({n_nan} NaN, {n_inf} Inf) in {len(hit)} of {e} experts:" in text
    for x in range(e):
        listed = f"expert {x} ({int(bad[x].sum())} values: {int(torch.isnan(w[x]).sum())} NaN," in text
        assert listed == (x in hit), (x, text)
