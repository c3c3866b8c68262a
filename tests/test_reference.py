"""nf4moe.reference: routing metadata and the whole expert layer against an independent fp64 oracle.

The oracle (tests/fp64_oracle.py) is a dense loop over tokens and slots sharing no code with the
reference.  Bounds:
- reference in fp32 vs oracle in fp64: 2e-5.  Each output is a few fp32 dot products of length
  H or I (<= 320) plus a K-term sum; the rounding error of such a dot product is ~sqrt(n)*2^-24
  relative (~1e-6), so 2e-5 is tight enough that a dropped term, a wrong slot or a missing LoRA
  delta (each >= 1e-2 relative here) cannot pass.
- reference with compute_dtype=fp64 vs oracle: 1e-12 (same math, only summation order differs).
"""
from __future__ import annotations

import zlib

import bitsandbytes.functional as bnbf
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fp64_oracle import dense_moe_fp64, rel_err
from nf4moe.reference import (
    ACTIVATIONS,
    Lora,
    NF4_CODE,
    Routing,
    activation,
    dequantize_nf4,
    moe_forward,
    route,
)

FP32_BOUND = 2e-5
FP64_BOUND = 1e-12


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _distinct_ids(t, k, e, g):
    """Each token picks k distinct experts, as a softmax top-k router does."""
    if t == 0:
        return torch.zeros(0, k, dtype=torch.int64)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])


def make_ids(case: str, t: int, k: int, e: int, g: torch.Generator) -> torch.Tensor:
    if case == "random":
        return _distinct_ids(t, k, e, g)
    if case == "one_expert":  # one expert receives every token (slot 0), the rest spread out
        ids = _distinct_ids(t, k, e, g)
        hot = int(torch.randint(e, (1,), generator=g))
        for row in ids:
            if hot in row.tolist():
                row[row == hot] = row[0].item()
            row[0] = hot
        return ids
    if case == "empty_experts":  # only two of the E experts get tokens
        pool = torch.tensor([1, e - 2])
        return pool[torch.randint(2, (t, k), generator=g)]
    if case == "k_eq_e":
        return _distinct_ids(t, e, e, g)
    if case == "sentinels":  # ids >= E belong to another expert-parallel rank
        ids = _distinct_ids(t, k, e, g)
        drop = torch.rand(t, k, generator=g) < 0.35
        ids[drop] = e + torch.randint(0, 7, (int(drop.sum()),), generator=g)
        if t > 2:
            ids[1] = e + 3  # one token entirely on other ranks
        return ids
    if case == "duplicate_slots":  # the same expert twice in one token: both slots count
        ids = _distinct_ids(t, k, e, g)
        ids[:, -1] = ids[:, 0]
        return ids
    raise AssertionError(case)


def make_layer(t, h, i, e, k, g, *, case="random", lora_rank=0, dtype=torch.float32):
    x = torch.randn(t, h, generator=g).to(dtype)
    ids = make_ids(case, t, k, e, g)
    kk = ids.shape[1]
    w = torch.softmax(torch.randn(t, kk, generator=g), dim=-1).to(dtype)
    gate_up = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(dtype)
    down = (torch.randn(e, h, i, generator=g) / i**0.5).to(dtype)
    lora = None
    if lora_rank:
        lora = {
            "gate_up_proj": (torch.randn(e, lora_rank, h, generator=g) / h**0.5,
                             torch.randn(e, 2 * i, lora_rank, generator=g) * 0.3),
            "down_proj": (torch.randn(e, lora_rank, i, generator=g) / i**0.5,
                          torch.randn(e, h, lora_rank, generator=g) * 0.3),
        }
    return x, ids, w, gate_up, down, lora


def _lora_kwargs(lora, scaling):
    if lora is None:
        return {}
    return dict(
        lora_gate_up=Lora(*lora["gate_up_proj"]),
        lora_down=Lora(*lora["down_proj"]),
        lora_scaling=scaling,
    )


# ------------------------------------------------------------------------------------------ routing
def _expected_pairs(flat, e):
    return [[p for p, v in enumerate(flat) if v == ex] for ex in range(e)]


def _check_routing(ids: torch.Tensor, e: int, r: Routing) -> None:
    t, k = ids.shape
    flat = ids.reshape(-1).tolist()
    assert r.num_experts == e and r.top_k == k
    assert r.sorted_pair_ids.dtype == torch.int32 and r.sorted_pair_ids.shape == (t * k,)
    assert r.expert_offsets.dtype == torch.int32 and r.expert_offsets.shape == (e + 1,)
    # Every pair appears exactly once; the valid ones first.
    assert sorted(r.sorted_pair_ids.tolist()) == list(range(t * k))
    offs = r.expert_offsets.tolist()
    assert offs[0] == 0
    expected = _expected_pairs(flat, e)
    for ex in range(e):
        # Stable: within an expert, pairs in increasing p = t*K + k (token order).
        assert r.sorted_pair_ids[offs[ex] : offs[ex + 1]].tolist() == expected[ex], f"expert {ex}"
    assert r.counts.tolist() == [len(x) for x in expected]
    n_valid = sum(0 <= v < e for v in flat)
    assert offs[e] == n_valid
    # Dropped ids (sentinels >= E, negatives) sit after offsets[E], where no expert reads.
    assert sorted(r.sorted_pair_ids[n_valid:].tolist()) == [p for p, v in enumerate(flat) if not 0 <= v < e]


@pytest.mark.parametrize(
    "case,t,k,e",
    [
        ("random", 17, 4, 8),
        ("random", 1, 2, 4),
        ("one_expert", 13, 3, 6),
        ("empty_experts", 20, 2, 8),
        ("k_eq_e", 6, 5, 5),
        ("sentinels", 23, 4, 8),
        ("duplicate_slots", 9, 3, 7),
    ],
)
def test_route(case, t, k, e):
    ids = make_ids(case, t, k, e, _gen("route", case, t, k, e))
    _check_routing(ids, e, route(ids, e))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.int16, torch.uint8])
def test_route_index_dtypes(dtype):
    ids = make_ids("sentinels", 11, 3, 6, _gen("route_dtype", dtype))
    _check_routing(ids, 6, route(ids.to(dtype), 6))


def test_route_t0():
    r = route(torch.zeros(0, 4, dtype=torch.int64), 8)
    assert r.sorted_pair_ids.shape == (0,) and r.expert_offsets.tolist() == [0] * 9
    assert r.counts.tolist() == [0] * 8 and r.top_k == 4


def test_route_all_sentinels_and_negatives():
    ids = torch.tensor([[9, 12], [-1, 8], [40, -3]])
    r = route(ids, 8)
    assert r.expert_offsets.tolist() == [0] * 9
    assert sorted(r.sorted_pair_ids.tolist()) == list(range(6))


def test_route_stable_for_ties():
    # Every pair to expert 2: the order must be exactly 0..T*K-1 (a non-stable sort may permute).
    ids = torch.full((300, 2), 2, dtype=torch.int64)
    r = route(ids, 4)
    assert r.sorted_pair_ids.tolist() == list(range(600))
    assert r.counts.tolist() == [0, 0, 600, 0]


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(0, 20),
    k=st.integers(1, 6),
    e=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_route_property(t, k, e, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-2, e + 3, (t, k), generator=g)
    _check_routing(ids, e, route(ids, e))


# -------------------------------------------------------------------------------------- moe_forward
FORWARD_CASES = [
    # case, T, H, I, E, K
    ("random", 1, 64, 128, 4, 2),
    ("random", 5, 192, 320, 6, 2),
    ("random", 37, 192, 320, 8, 4),
    ("one_expert", 12, 128, 64, 5, 2),
    ("one_expert", 9, 64, 64, 4, 1),
    ("empty_experts", 14, 64, 192, 8, 2),
    ("k_eq_e", 6, 192, 64, 4, 4),
    ("sentinels", 21, 128, 320, 6, 3),
    ("duplicate_slots", 7, 64, 128, 5, 3),
]


@pytest.mark.parametrize("lora_rank", [0, 4])
@pytest.mark.parametrize("case,t,h,i,e,k", FORWARD_CASES)
def test_moe_forward_vs_fp64_oracle(case, t, h, i, e, k, lora_rank):
    g = _gen("fwd", case, t, h, i, e, k, lora_rank)
    x, ids, w, gu, dn, lora = make_layer(t, h, i, e, k, g, case=case, lora_rank=lora_rank)
    scaling = 2.0
    out = moe_forward(x, ids, w, gu, dn, **_lora_kwargs(lora, scaling))
    assert out.dtype == torch.float32 and out.shape == (t, h)
    assert not out.isnan().any()
    ref = dense_moe_fp64(x, ids, w, gu, dn, lora=lora, scaling=scaling)
    assert rel_err(out, ref) < FP32_BOUND
    out64 = moe_forward(x, ids, w, gu, dn, compute_dtype=torch.float64, **_lora_kwargs(lora, scaling))
    assert out64.dtype == torch.float64
    assert rel_err(out64, ref) < FP64_BOUND
    if lora is not None:
        # The LoRA terms are large enough here that forgetting one of them cannot hide in the bound.
        base = dense_moe_fp64(x, ids, w, gu, dn)
        for proj in lora:
            partial = dict(lora)
            a, b = lora[proj]
            partial[proj] = (a, torch.zeros_like(b))
            assert rel_err(dense_moe_fp64(x, ids, w, gu, dn, lora=partial, scaling=scaling), ref) > 100 * FP32_BOUND
        assert rel_err(base, ref) > 100 * FP32_BOUND


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_moe_forward_activations(act):
    g = _gen("act", act)
    x, ids, w, gu, dn, lora = make_layer(9, 64, 128, 4, 2, g, lora_rank=2)
    out = moe_forward(x, ids, w, gu, dn, act=act, **_lora_kwargs(lora, 0.5))
    ref = dense_moe_fp64(x, ids, w, gu, dn, act=act, lora=lora, scaling=0.5)
    assert rel_err(out, ref) < FP32_BOUND


def test_activation_unknown():
    with pytest.raises(ValueError, match="act must be one of"):
        activation(torch.randn(3), "swish")


def test_moe_forward_t0():
    g = _gen("t0")
    x, ids, w, gu, dn, lora = make_layer(0, 64, 64, 4, 2, g, lora_rank=2)
    out = moe_forward(x, ids, w, gu, dn, **_lora_kwargs(lora, 1.0))
    assert out.shape == (0, 64) and out.dtype == torch.float32


def test_moe_forward_all_sentinels_gives_zero():
    # Every slot owned by another rank: this rank contributes exactly nothing.
    g = _gen("allsent")
    x, _, w, gu, dn, _ = make_layer(5, 64, 64, 4, 2, g)
    ids = torch.randint(4, 10, (5, 2), generator=g)
    out = moe_forward(x, ids, w, gu, dn)
    assert torch.equal(out, torch.zeros(5, 64))


def test_moe_forward_negative_ids_are_dropped():
    # The reference drops ids < 0 like sentinels (QuantGroupedExperts rejects them before this point).
    g = _gen("neg")
    x, ids, w, gu, dn, _ = make_layer(8, 64, 64, 4, 2, g)
    ids[::2, 1] = -1
    ref = dense_moe_fp64(x, ids, w, gu, dn)
    assert rel_err(moe_forward(x, ids, w, gu, dn), ref) < FP32_BOUND


def test_moe_forward_callable_weights_identical():
    # The CPU path hands weights one expert at a time; the result must not depend on that.
    g = _gen("callable")
    x, ids, w, gu, dn, lora = make_layer(11, 128, 64, 5, 2, g, lora_rank=3)
    seen = []

    def gu_of(e):
        seen.append(e)
        return gu[e]

    a = moe_forward(x, ids, w, gu, dn, **_lora_kwargs(lora, 1.5))
    b = moe_forward(x, ids, w, gu_of, lambda e: dn[e], num_experts=5, **_lora_kwargs(lora, 1.5))
    assert torch.equal(a, b)
    # Only experts that received tokens are dequantized.
    assert seen == sorted(set(ids.reshape(-1).tolist()))


def test_moe_forward_callable_needs_num_experts():
    g = _gen("callable_err")
    x, ids, w, gu, dn, _ = make_layer(3, 64, 64, 2, 1, g)
    with pytest.raises(ValueError, match="num_experts"):
        moe_forward(x, ids, w, lambda e: gu[e], lambda e: dn[e])


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
def test_moe_forward_low_precision_inputs_computed_in_fp32(in_dtype):
    # Inputs in bf16/fp16 are upcast once; the math runs in fp32 on exactly those values.
    g = _gen("lowp", in_dtype)
    x, ids, w, gu, dn, _ = make_layer(10, 64, 128, 4, 2, g, dtype=in_dtype)
    out = moe_forward(x, ids, w, gu, dn)
    assert out.dtype == torch.float32
    assert rel_err(out, dense_moe_fp64(x, ids, w, gu, dn)) < FP32_BOUND


def test_moe_forward_gradients_vs_oracle():
    # Gradients in fp64 through x, the routing weights and all four LoRA factors, against autograd
    # through the independent oracle.  d(top_k_weights) matters: the router is trained through it.
    g = _gen("grad")
    x, ids, w, gu, dn, lora = make_layer(7, 64, 128, 4, 2, g, case="sentinels", lora_rank=2)
    x, w = x.double(), w.double()
    lora = {p: (a.double(), b.double()) for p, (a, b) in lora.items()}
    probe = torch.randn(7, 64, generator=g, dtype=torch.float64)

    def grads(fn):
        leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
        lo = {p: (a.clone().requires_grad_(), b.clone().requires_grad_()) for p, (a, b) in lora.items()}
        leaves += [t for ab in lo.values() for t in ab]
        (fn(leaves[0], leaves[1], lo) * probe).sum().backward()
        return [t.grad for t in leaves]

    ours = grads(lambda xx, ww, lo: moe_forward(xx, ids, ww, gu, dn, compute_dtype=torch.float64,
                                                **_lora_kwargs(lo, 1.7)))
    theirs = grads(lambda xx, ww, lo: dense_moe_fp64(xx, ids, ww, gu, dn, lora=lo, scaling=1.7))
    for name, a, b in zip(["x", "top_k_weights", "A_gu", "B_gu", "A_dn", "B_dn"], ours, theirs):
        assert rel_err(a, b) < FP64_BOUND, name


# ------------------------------------------------------------------------------------ NF4 reference
@pytest.mark.parametrize("compress_statistics", [False, True])
def test_dequantize_nf4_matches_bnb_any_shape(compress_statistics):
    # The reference decoder is generic over shape: a 2-D weight, nested statistics spanning several
    # 256-block groups of absmax2.
    w = torch.randn(96, 640, generator=_gen("deq2d", compress_statistics)).to(torch.bfloat16)
    q, s = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=compress_statistics, quant_type="nf4")
    kw = {}
    if compress_statistics:
        kw = dict(absmax2=s.state2.absmax, code2=s.state2.code, offset=s.offset, blocksize2=s.state2.blocksize)
    out = dequantize_nf4(q, s.absmax, (96, 640), 64, dtype=torch.bfloat16, **kw)
    assert torch.equal(out, bnbf.dequantize_4bit(q, s))


def test_dequantize_nf4_nibble_order():
    # Byte 0x1E holds element 0 in the high nibble (code 1) and element 1 in the low one (code 14).
    packed = torch.tensor([0x1E] + [0x7F] * 31, dtype=torch.uint8)
    absmax = torch.tensor([2.5])
    out = dequantize_nf4(packed, absmax, (64,), 64)
    assert out[0].item() == pytest.approx(NF4_CODE[1] * 2.5, rel=1e-7)
    assert out[1].item() == pytest.approx(NF4_CODE[14] * 2.5, rel=1e-7)
    assert out[2].item() == 0.0 and out[3].item() == 2.5


def test_dequantize_nf4_size_mismatch():
    with pytest.raises(ValueError, match="packed holds 64 nibbles"):
        dequantize_nf4(torch.zeros(32, dtype=torch.uint8), torch.ones(2), (128,), 64)
