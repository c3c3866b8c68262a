"""QuantGroupedExperts (reference backend): construction, forward against fp64, LoRA, state, bad input.

Bounds (relative Frobenius error against the fp64 oracle on the *dequantized* NF4 weights, so
quantization error is not part of any bound):
- fp32 hidden states: 2e-5.  The reference computes in fp32; each output is a handful of fp32
  dot products of length <= 320, whose rounding is ~sqrt(n) * 2^-24 ~ 1e-6 relative.
- fp16 output: 2e-3; bf16 output: 1e-2.  The math is fp32 but the result is rounded once to the
  output dtype: 2^-11 (fp16) / 2^-8 (bf16) relative per element at worst, less on average.
"""
from __future__ import annotations

import math
import re
import zlib

import pytest
import torch
from torch import nn

from fp64_oracle import dense_moe_fp64, rel_err
from nf4moe import NF4Weight, QuantGroupedExperts
from nf4moe.reference import Lora, moe_forward

FP32_BOUND = 2e-5
OUT_BOUND = {torch.float32: FP32_BOUND, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _weights(e, h, i, g, dtype=torch.bfloat16):
    gate_up = (torch.randn(e, 2 * i, h, generator=g) / h**0.5).to(dtype)
    down = (torch.randn(e, h, i, generator=g) / i**0.5).to(dtype)
    return gate_up, down


def _inputs(t, h, e, k, g, dtype=torch.float32, sentinels=False):
    x = torch.randn(t, h, generator=g).to(dtype)
    if t:
        ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    else:
        ids = torch.zeros(0, k, dtype=torch.int64)
    if sentinels and t:
        drop = torch.rand(t, k, generator=g) < 0.3
        ids[drop] = e + torch.randint(0, 5, (int(drop.sum()),), generator=g)
    w = torch.softmax(torch.randn(t, k, generator=g), dim=-1).to(dtype)
    return x, ids, w


def _layer(e=4, h=64, i=128, *, seed, lora_rank=0, cs=True, random_b=True, dtype=torch.bfloat16, **kw):
    g = _gen("layer", seed)
    gu, dn = _weights(e, h, i, g, dtype)
    m = QuantGroupedExperts.from_weights(gu, dn, lora_rank=lora_rank, compress_statistics=cs,
                                         backend="reference", **kw)
    if lora_rank and random_b:
        with torch.no_grad():
            for p in m.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m, gu, dn


def _oracle(m: QuantGroupedExperts, x, ids, w):
    lora = None
    if m.lora_rank:
        lora = {p: (m.lora_A[p].detach(), m.lora_B[p].detach()) for p in ("gate_up_proj", "down_proj")}
    return dense_moe_fp64(x, ids, w, m.gate_up_nf4.dequantize(torch.float32), m.down_nf4.dequantize(torch.float32),
                          act=m.act, lora=lora, scaling=m.scaling)


def _poison_heap(nbytes: int) -> None:
    # Best effort on CPU: blocks freed right here are what the allocator hands to the next torch.empty
    # of a similar size, so a result that reads memory it never wrote comes out NaN.  (On CUDA the
    # caching allocator makes this reliable; the Triton tests poison their output buffers directly.)
    for _ in range(3):
        torch.full((max(nbytes // 4, 1),), float("nan"))


# ------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("cs", [False, True])
@pytest.mark.parametrize("t,h,i,e,k", [(1, 64, 128, 4, 2), (9, 192, 320, 6, 2), (40, 128, 64, 8, 4), (6, 64, 64, 3, 3)])
def test_forward_matches_reference_on_dequantized(t, h, i, e, k, cs):
    m, _, _ = _layer(e, h, i, seed=("fwd", t, h, i, e, k, cs), cs=cs)
    x, ids, w = _inputs(t, h, e, k, _gen("in", t, h, i, e, k, cs), sentinels=True)
    _poison_heap(t * k * max(h, 2 * i) * 4)
    out = m(x, ids, w)
    assert out.shape == (t, h) and out.dtype == torch.float32
    assert not out.isnan().any()
    # Same fp32 math on bit-identical weights (per-expert vs whole-tensor dequantization are both
    # bit-exact with bitsandbytes), so anything past fp32 rounding would be a wiring bug.
    ref = moe_forward(x, ids, w, m.gate_up_nf4.dequantize(torch.float32), m.down_nf4.dequantize(torch.float32))
    assert rel_err(out, ref) < 1e-6
    assert rel_err(out, _oracle(m, x, ids, w)) < FP32_BOUND


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_output_dtype_follows_hidden_states(dtype):
    m, _, _ = _layer(5, 128, 64, seed=("dtype", dtype), lora_rank=2)
    x, ids, w = _inputs(17, 128, 5, 2, _gen("dtype-in", dtype), dtype=dtype)
    out = m(x, ids, w)
    assert out.dtype == dtype and out.shape == (17, 128)
    assert rel_err(out, _oracle(m, x, ids, w)) < OUT_BOUND[dtype]


def test_float64_hidden_states_computed_in_float64():
    m, _, _ = _layer(4, 64, 64, seed="f64", lora_rank=2)
    m.double()  # LoRA to fp64; the NF4 storage keeps its dtypes
    x, ids, w = _inputs(7, 64, 4, 2, _gen("f64-in"), dtype=torch.float64)
    out = m(x, ids, w)
    assert out.dtype == torch.float64
    assert rel_err(out, _oracle(m, x, ids, w)) < 1e-12


def test_mixed_weight_dtype_top_k_weights_fp32_hidden_bf16():
    # transformers routes with fp32 weights on bf16 activations; the output follows hidden_states.
    m, _, _ = _layer(4, 64, 128, seed="mixed")
    x, ids, w = _inputs(8, 64, 4, 2, _gen("mixed-in"))
    out = m(x.bfloat16(), ids, w)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, _oracle(m, x.bfloat16(), ids, w)) < OUT_BOUND[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_t0_returns_empty(dtype):
    m, _, _ = _layer(seed="t0", lora_rank=2)
    x, ids, w = _inputs(0, 64, 4, 2, _gen("t0-in"), dtype=dtype)
    out = m(x, ids, w)
    assert out.shape == (0, 64) and out.dtype == dtype


def test_sentinel_ids_are_not_an_error():
    m, _, _ = _layer(4, 64, 64, seed="sent")
    x, ids, w = _inputs(12, 64, 4, 2, _gen("sent-in"))
    ids[::3, 0] = 4  # == E
    ids[1::3, 1] = 1000
    out = m(x, ids, w)
    assert rel_err(out, _oracle(m, x, ids, w)) < FP32_BOUND
    # uint8 index with 255 as the "not mine" id
    ids8 = ids.clamp(max=255).to(torch.uint8)
    ids8[2, :] = 255
    out8 = m(x, ids8, w)
    assert rel_err(out8, _oracle(m, x, ids8.long(), w)) < FP32_BOUND
    assert torch.equal(out8[2], torch.zeros(64))


def test_quantization_error_is_nf4_sized():
    # End to end against the unquantized layer: NF4 weight noise (~10% per weight, independent) gives
    # an output error of the same order; this catches a layer that is "exact" on garbage weights.
    m, gu, dn = _layer(4, 128, 128, seed="qerr", dtype=torch.float32)
    x, ids, w = _inputs(32, 128, 4, 2, _gen("qerr-in"))
    err = rel_err(m(x, ids, w), dense_moe_fp64(x, ids, w, gu, dn))
    assert 0.03 < err < 0.3


# --------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("rank,alpha", [(4, None), (4, 16.0), (1, 3.0)])
def test_lora_init_like_peft(rank, alpha):
    e, h, i = 6, 128, 64
    m, _, _ = _layer(e, h, i, seed=("init", rank, alpha), lora_rank=rank, lora_alpha=alpha, random_b=False)
    assert m.lora_rank == rank
    assert m.scaling == pytest.approx((alpha if alpha is not None else rank) / rank)
    assert set(m.lora_A) == set(m.lora_B) == {"gate_up_proj", "down_proj"}
    for proj, (fan_in, fan_out) in {"gate_up_proj": (h, 2 * i), "down_proj": (i, h)}.items():
        a, b = m.lora_A[proj], m.lora_B[proj]
        assert isinstance(a, nn.Parameter) and a.requires_grad and b.requires_grad
        assert a.shape == (e, rank, fan_in) and b.shape == (e, fan_out, rank)
        assert a.dtype == b.dtype == torch.bfloat16  # default: the weights' dtype
        assert torch.equal(b, torch.zeros_like(b))
        # PEFT: kaiming_uniform_(a=sqrt(5)) on A (r, in): U(-1/sqrt(in), 1/sqrt(in)).
        bound = 1 / math.sqrt(fan_in)
        af = a.float()
        assert af.abs().max() <= bound * (1 + 2**-8)  # bf16 rounding of values at the bound
        assert af.abs().max() > 0.9 * bound
        assert af.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
        assert not torch.equal(af[0], af[1])  # each expert its own draw
    # B = 0: the adapter starts as the identity, exactly like PEFT.
    x, ids, w = _inputs(9, h, e, 2, _gen("init-in", rank))
    base = QuantGroupedExperts.from_nf4(m.gate_up_nf4, m.down_nf4, backend="reference")
    assert torch.equal(m(x, ids, w), base(x, ids, w))


def test_lora_dtype_option():
    m, _, _ = _layer(seed="ldt", lora_rank=2, lora_dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in m.parameters())


def test_lora_rank0_has_no_parameters():
    m, _, _ = _layer(seed="r0", lora_rank=0)
    assert list(m.parameters()) == []
    assert m.lora("gate_up_proj") is None and m.scaling == 0.0


@pytest.mark.parametrize("cs", [False, True])
def test_base_weights_are_buffers(cs):
    m, _, _ = _layer(seed=("buf", cs), lora_rank=3, cs=cs)
    params = dict(m.named_parameters())
    assert set(params) == {"lora_A.gate_up_proj", "lora_A.down_proj", "lora_B.gate_up_proj", "lora_B.down_proj"}
    bufs = dict(m.named_buffers())
    stats = ["absmax2", "code2", "offset"] if cs else []
    markers = {"gate_up_proj", "down_proj"}  # 24-byte markers under the dense names (see experts.MARKER)
    assert set(bufs) == {f"{p}.{n}" for p in ("gate_up_nf4", "down_nf4") for n in ["packed", "absmax", *stats]} | markers
    assert all(bufs[k].shape == (2, 4, 3) and bufs[k].dtype == torch.uint8 for k in markers)
    assert bufs["gate_up_nf4.packed"].dtype == torch.uint8 and not bufs["gate_up_nf4.packed"].requires_grad


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_lora_forward_and_grads_vs_oracle(act):
    e, h, i = 4, 64, 128
    m, _, _ = _layer(e, h, i, seed=("grad", act), lora_rank=3, lora_alpha=6.0, act=act, lora_dtype=torch.float32)
    x, ids, w = _inputs(10, h, e, 2, _gen("grad-in", act), sentinels=True)
    x.requires_grad_()
    w.requires_grad_()
    probe = torch.randn(10, h, generator=_gen("probe", act))
    out = m(x, ids, w)
    (out * probe).sum().backward()
    ours = [x.grad, w.grad] + [m.lora_A[p].grad for p in ("gate_up_proj", "down_proj")] + [
        m.lora_B[p].grad for p in ("gate_up_proj", "down_proj")]
    leaves = [x.detach().double().requires_grad_(), w.detach().double().requires_grad_()]
    lo = {p: (m.lora_A[p].detach().double().requires_grad_(), m.lora_B[p].detach().double().requires_grad_())
          for p in ("gate_up_proj", "down_proj")}
    ref = dense_moe_fp64(leaves[0], ids, leaves[1], m.gate_up_nf4.dequantize(torch.float32),
                         m.down_nf4.dequantize(torch.float32), act=act, lora=lo, scaling=m.scaling)
    assert rel_err(out, ref) < FP32_BOUND
    (ref * probe.double()).sum().backward()
    theirs = [leaves[0].grad, leaves[1].grad, lo["gate_up_proj"][0].grad, lo["down_proj"][0].grad,
              lo["gate_up_proj"][1].grad, lo["down_proj"][1].grad]
    # Backward is again a few fp32 products per element: same bound, a little slack for the chains.
    for name, a, b in zip(["x", "top_k_weights", "A_gu", "A_dn", "B_gu", "B_dn"], ours, theirs):
        assert a is not None, name
        assert rel_err(a, b) < 5 * FP32_BOUND, name


# ---------------------------------------------------------------------------------- state and repr
@pytest.mark.parametrize("cs", [False, True])
@pytest.mark.parametrize("rank", [0, 4])
def test_state_dict_round_trip(cs, rank):
    e, h, i = 5, 128, 192
    m, _, _ = _layer(e, h, i, seed=("sd", cs, rank), lora_rank=rank, cs=cs, lora_alpha=8.0 if rank else None)
    sd = m.state_dict()
    fresh = QuantGroupedExperts(e, h, i, lora_rank=rank, lora_alpha=8.0 if rank else None,
                                compress_statistics=cs, backend="reference")
    with torch.no_grad():  # poison, so a tensor that silently failed to load is visible
        for t in list(fresh.buffers()) + list(fresh.parameters()):
            t.fill_(9 if t.dtype == torch.uint8 else float("nan"))
    fresh.load_state_dict(sd, strict=True)
    sd2 = fresh.state_dict()
    assert sd.keys() == sd2.keys()
    for k in sd:
        assert sd[k].dtype == sd2[k].dtype and torch.equal(sd[k], sd2[k]), k
    x, ids, w = _inputs(11, h, e, 2, _gen("sd-in", cs, rank), dtype=torch.bfloat16)
    a, b = m(x, ids, w), fresh(x, ids, w)
    assert not a.isnan().any()
    assert torch.equal(a, b)


def test_module_dtype_cast_keeps_nf4_and_casts_lora():
    m, _, _ = _layer(4, 64, 128, seed="cast", lora_rank=2, lora_dtype=torch.float32)
    nf4_before = {k: v.clone() for k, v in m.named_buffers()}
    x, ids, w = _inputs(6, 64, 4, 2, _gen("cast-in"))
    m.to(torch.bfloat16)
    for k, v in m.named_buffers():
        assert v.dtype == nf4_before[k].dtype and torch.equal(v, nf4_before[k]), k
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    assert rel_err(m(x, ids, w), _oracle(m, x, ids, w)) < FP32_BOUND


def test_extra_repr_and_nbytes():
    m, _, _ = _layer(4, 192, 320, seed="repr", lora_rank=8, lora_alpha=16.0)
    r = m.extra_repr()
    for part in ("E=4", "H=192", "I=320", "act=silu", "lora_rank=8", "lora_alpha=16", "blocksize=64",
                 "double_quant=True", "backend=reference"):
        assert part in r, part
    mib = float(re.search(r"memory=([0-9.]+) MiB", r).group(1))
    lora_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
    assert m.nbytes == m.gate_up_nf4.nbytes + m.down_nf4.nbytes + lora_bytes + 2 * 24  # + the markers
    assert mib == pytest.approx(m.nbytes / 2**20, abs=0.006)
    assert "E=4" in str(m) and "gate_up_nf4" in str(m)
    # NF4 base weights: about 4.1-4.5 bits per weight, against 16 for bf16.
    assert m.gate_up_nf4.nbytes + m.down_nf4.nbytes < 4 * 3 * 192 * 320 * 2 / 3.5


def test_backend_auto_resolves_to_reference_on_cpu(monkeypatch):
    m, _, _ = _layer(seed="auto")
    m.backend = "auto"
    x, ids, w = _inputs(5, 64, 4, 2, _gen("auto-in"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert m.resolve_backend(x) == "reference"
    ref = QuantGroupedExperts.from_nf4(m.gate_up_nf4, m.down_nf4, backend="reference")
    assert torch.equal(m(x, ids, w), ref(x, ids, w))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert m.resolve_backend(x) == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert m.resolve_backend(x) == "triton"
    m.backend = "reference"
    assert m.resolve_backend(x) == "reference"


def test_from_nf4_shares_weights_without_requantizing():
    m, _, _ = _layer(seed="fromnf4")
    m2 = QuantGroupedExperts.from_nf4(m.gate_up_nf4, m.down_nf4, lora_rank=2, backend="reference")
    assert m2.gate_up_nf4 is m.gate_up_nf4 and m2.down_nf4.packed.data_ptr() == m.down_nf4.packed.data_ptr()
    assert m2.lora_A["down_proj"].device == m.down_nf4.packed.device


# ------------------------------------------------------------------------------------- bad input
def _small():
    m, _, _ = _layer(4, 64, 64, seed="bad")
    x, ids, w = _inputs(5, 64, 4, 2, _gen("bad-in"))
    return m, x, ids, w


@pytest.mark.parametrize("shape", [(5,), (1, 5, 64)])
def test_bad_hidden_states_rank(shape):
    m, _, ids, w = _small()
    with pytest.raises(ValueError, match=r"hidden_states must be 2-D \(T, H\)"):
        m(torch.randn(shape), ids, w)


def test_bad_top_k_index_rank():
    m, x, ids, w = _small()
    with pytest.raises(ValueError, match=r"top_k_index must be 2-D \(T, K\)"):
        m(x, ids.reshape(-1), w)


def test_bad_top_k_weights_rank():
    m, x, ids, w = _small()
    with pytest.raises(ValueError, match=r"top_k_weights must be 2-D \(T, K\)"):
        m(x, ids, w.unsqueeze(0))


def test_bad_hidden_size():
    m, _, ids, w = _small()
    with pytest.raises(ValueError, match=r"hidden_states has H=128, the experts expect H=64"):
        m(torch.randn(5, 128), ids, w)


def test_bad_k_mismatch():
    m, x, ids, _ = _small()
    with pytest.raises(ValueError, match=r"top_k_weights shape \(5, 3\) must equal top_k_index shape \(5, 2\)"):
        m(x, ids, torch.rand(5, 3))


def test_bad_float_index():
    m, x, ids, w = _small()
    with pytest.raises(TypeError, match="top_k_index must be an integer tensor"):
        m(x, ids.float(), w)


def test_bad_negative_ids():
    m, x, ids, w = _small()
    ids[3, 1] = -1
    with pytest.raises(ValueError, match="top_k_index has negative expert ids"):
        m(x, ids, w)


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.uint8])
def test_bad_hidden_states_dtype(dtype):
    m, x, ids, w = _small()
    with pytest.raises(TypeError, match="hidden_states must be one of"):
        m(x.to(dtype), ids, w)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_bad_top_k_weights_dtype(dtype):
    m, x, ids, w = _small()
    with pytest.raises(TypeError, match="top_k_weights must be a floating-point tensor"):
        m(x, ids, w.to(dtype))


def test_bad_t_mismatch_index():
    m, x, ids, w = _small()
    with pytest.raises(ValueError, match=r"top_k_index has T=4 rows, hidden_states has T=5"):
        m(x, ids[:4], w[:4])


def test_bad_t_mismatch_weights():
    m, x, ids, w = _small()
    with pytest.raises(ValueError, match=r"top_k_weights shape \(4, 2\) must equal top_k_index shape \(5, 2\)"):
        m(x, ids, w[:4])


@pytest.mark.parametrize("which", ["hidden_states", "top_k_index", "top_k_weights"])
def test_bad_device(which):
    # The meta device stands in for "another device" on a CPU-only machine.
    m, x, ids, w = _small()
    args = {"hidden_states": x, "top_k_index": ids, "top_k_weights": w}
    args[which] = args[which].to("meta")
    with pytest.raises(ValueError, match=rf"{which} is on meta but the expert weights are on cpu"):
        m(**args)


def test_bad_non_tensor_input():
    m, x, ids, w = _small()
    with pytest.raises(TypeError, match="top_k_weights must be a torch.Tensor"):
        m(x, ids, w.tolist())


# from_weights: errors come from validation, before any quantization work.
@pytest.fixture
def no_quantize(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("quantize ran before the arguments were validated")

    monkeypatch.setattr(NF4Weight, "quantize", boom)


def test_bad_gate_up_rows_odd(no_quantize):
    with pytest.raises(ValueError, match=r"gate_up_proj must have an even number of rows \(2I\), got 127"):
        QuantGroupedExperts.from_weights(torch.randn(2, 127, 64), torch.randn(2, 64, 64))


def test_bad_gate_up_rows_not_twice_down_i(no_quantize):
    with pytest.raises(ValueError, match=r"gate_up_proj rows \(2I=256\) must be twice down_proj's I=64"):
        QuantGroupedExperts.from_weights(torch.randn(2, 256, 64), torch.randn(2, 64, 64))


def test_bad_expert_count_mismatch(no_quantize):
    with pytest.raises(ValueError, match=r"gate_up_proj has E=3 experts but down_proj has E=2"):
        QuantGroupedExperts.from_weights(torch.randn(3, 128, 64), torch.randn(2, 64, 64))


def test_bad_weight_hidden_mismatch(no_quantize):
    with pytest.raises(ValueError, match=r"down_proj rows \(H=128\) must equal gate_up_proj's H=64"):
        QuantGroupedExperts.from_weights(torch.randn(2, 128, 64), torch.randn(2, 128, 64))


@pytest.mark.parametrize(
    "gu_shape,dn_shape,name,dim",
    [((2, 128, 96), (2, 96, 64), "gate_up_proj", 96), ((2, 192, 64), (2, 64, 96), "down_proj", 96)],
)
def test_bad_in_not_multiple_of_blocksize(no_quantize, gu_shape, dn_shape, name, dim):
    with pytest.raises(ValueError, match=rf"{name}'s input dimension \({dim}\) must be a multiple of blocksize \(64\)"):
        QuantGroupedExperts.from_weights(torch.randn(gu_shape), torch.randn(dn_shape))


@pytest.mark.parametrize("which", ["gate_up_proj", "down_proj"])
def test_bad_weight_rank(no_quantize, which):
    args = {"gate_up_proj": torch.randn(2, 128, 64), "down_proj": torch.randn(2, 64, 64)}
    args[which] = args[which][0]
    with pytest.raises(ValueError, match=rf"{which} must be 3-D"):
        QuantGroupedExperts.from_weights(**args)


@pytest.mark.parametrize("which", ["gate_up_proj", "down_proj"])
def test_bad_weight_dtype(no_quantize, which):
    args = {"gate_up_proj": torch.randn(2, 128, 64), "down_proj": torch.randn(2, 64, 64)}
    args[which] = args[which].to(torch.int8)
    with pytest.raises(TypeError, match=rf"{which} must be a floating-point tensor"):
        QuantGroupedExperts.from_weights(**args)


def test_bad_weight_devices(no_quantize):
    with pytest.raises(ValueError, match="gate_up_proj is on meta but down_proj on cpu"):
        QuantGroupedExperts.from_weights(torch.randn(2, 128, 64, device="meta"), torch.randn(2, 64, 64))


@pytest.mark.parametrize("rank", [-1, 2.0, True])
def test_bad_lora_rank(no_quantize, rank):
    with pytest.raises(ValueError, match="lora_rank must be an int >= 0"):
        QuantGroupedExperts.from_weights(torch.randn(2, 128, 64), torch.randn(2, 64, 64), lora_rank=rank)


def test_bad_lora_rank_constructors():
    with pytest.raises(ValueError, match="lora_rank must be an int >= 0"):
        QuantGroupedExperts(2, 64, 64, lora_rank=-2)
    m, _, _ = _layer(seed="badrank")
    with pytest.raises(ValueError, match="lora_rank must be an int >= 0"):
        QuantGroupedExperts.from_nf4(m.gate_up_nf4, m.down_nf4, lora_rank=-1)
    with pytest.raises(ValueError, match="lora_rank must be an int >= 0"):
        m.add_lora(-3)


def test_bad_backend(no_quantize):
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'reference', 'triton'\), got 'cuda'"):
        QuantGroupedExperts.from_weights(torch.randn(2, 128, 64), torch.randn(2, 64, 64), backend="cuda")


def test_bad_activation(no_quantize):
    with pytest.raises(ValueError, match=r"act must be one of .*got 'swiglu'"):
        QuantGroupedExperts.from_weights(torch.randn(2, 128, 64), torch.randn(2, 64, 64), act="swiglu")


def test_bad_from_nf4_shapes():
    m, _, _ = _layer(seed="fromnf4bad")
    with pytest.raises(ValueError, match="gate_up .* and down .* are not"):
        QuantGroupedExperts.from_nf4(m.down_nf4, m.down_nf4)


def test_lora_helper_matches_reference_lora():
    m, _, _ = _layer(seed="lorahelper", lora_rank=2)
    lo = m.lora("down_proj")
    assert isinstance(lo, Lora) and lo.A is m.lora_A["down_proj"] and lo.B is m.lora_B["down_proj"]
