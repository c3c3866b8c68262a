"""NF4Weight against bitsandbytes, the format's authority: every byte and every dequantized value equal.

Equality here is ``torch.equal`` (bit-exact), never a tolerance: the container must hold exactly what
``bitsandbytes.functional.quantize_4bit`` produces on the whole tensor and decode it exactly as
``dequantize_4bit`` does, so a bitsandbytes checkpoint and ours are interchangeable.
"""
from __future__ import annotations

import math
import zlib

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import pytest
import torch

import nf4moe.moe_layers.nf4_weight as nf4_weight_mod
from nf4moe import NF4Weight
from nf4moe.reference import NF4_CODE

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# (E, out, in): in a multiple of 64 but not of 128 (192, 320); n_blocks not a multiple of 256 so the
# last nested absmax2 block is partial; (1, 2, 64) is a single NF4 block per row.
SHAPES = ((3, 128, 192), (5, 96, 320), (1, 2, 64), (2, 256, 128))


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _weights(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # Heavy-ish tails (some large rows) so absmax varies across blocks and the nested code matters.
    w = torch.randn(shape, generator=g) * torch.rand(shape[:-1] + (1,), generator=g).mul(3).add(0.05)
    return w.to(dtype)


def _assert_same_as_bnb(m: NF4Weight, q: torch.Tensor, st) -> None:
    assert m.packed.dtype == torch.uint8
    assert torch.equal(m.packed.reshape(-1), q.reshape(-1))
    assert torch.equal(m.absmax.reshape(-1), st.absmax.reshape(-1))
    assert m.absmax.dtype == st.absmax.dtype
    if st.nested:
        assert m.compress_statistics
        assert torch.equal(m.absmax2, st.state2.absmax)
        assert torch.equal(m.code2, st.state2.code)
        assert torch.equal(m.offset, torch.as_tensor(st.offset, dtype=torch.float32))
        assert m.blocksize2 == st.state2.blocksize
    else:
        assert not m.compress_statistics
        assert m.absmax2 is None and m.code2 is None and m.offset is None
    assert m.blocksize == st.blocksize
    assert m.shape == tuple(st.shape)
    assert m.dtype == st.dtype


def _all_buffers_equal(a: NF4Weight, b: NF4Weight) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(
        sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa
    )


def test_nf4_code_is_bitsandbytes_code():
    ours = torch.tensor(NF4_CODE, dtype=torch.float32)
    theirs = bnbf.get_4bit_type("nf4", device="cpu")
    assert theirs.dtype == torch.float32
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_bit_exact_with_bnb(shape, dtype, compress_statistics):
    w = _weights(shape, dtype, seed=_seed(shape, dtype, compress_statistics))
    q, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=compress_statistics, quant_type="nf4")
    m = NF4Weight.quantize(w, 64, compress_statistics)
    _assert_same_as_bnb(m, q, st)


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("chunk_experts", [1, 2])
def test_quantize_in_chunks_is_bit_exact(monkeypatch, chunk_experts, compress_statistics):
    # E=5 with 2 experts per chunk gives chunks of 2, 2, 1: uneven, and the nested statistics (one offset,
    # the mean absmax over the whole tensor) must still be those of one whole-tensor bnb call.
    e, o, i = 5, 64, 192
    monkeypatch.setattr(nf4_weight_mod, "_CHUNK_ELEMENTS", chunk_experts * o * i)
    calls = []
    real = bnbf.quantize_4bit

    def counting(a, *args, **kw):
        calls.append(a.shape[0])
        return real(a, *args, **kw)

    monkeypatch.setattr(bnbf, "quantize_4bit", counting)
    w = _weights((e, o, i), torch.bfloat16, seed=11 + chunk_experts)
    m = NF4Weight.quantize(w, 64, compress_statistics)
    assert calls == [chunk_experts] * (e // chunk_experts) + ([e % chunk_experts] if e % chunk_experts else [])
    monkeypatch.setattr(bnbf, "quantize_4bit", real)
    q, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=compress_statistics, quant_type="nf4")
    _assert_same_as_bnb(m, q, st)


@pytest.mark.parametrize("blocksize", [32, 128, 256])
@pytest.mark.parametrize("compress_statistics", [False, True])
def test_quantize_other_blocksizes(blocksize, compress_statistics):
    w = _weights((3, 48, 512), torch.float16, seed=blocksize)
    q, st = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress_statistics, quant_type="nf4")
    m = NF4Weight.quantize(w, blocksize, compress_statistics)
    _assert_same_as_bnb(m, q, st)
    assert torch.equal(m.dequantize(), bnbf.dequantize_4bit(q, st))


def test_quantize_non_contiguous_input():
    w = _weights((3, 128, 64), torch.bfloat16, seed=5).transpose(1, 2)  # (3, 64, 128), not contiguous
    assert not w.is_contiguous()
    m = NF4Weight.quantize(w, 64, True)
    q, st = bnbf.quantize_4bit(w.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
    _assert_same_as_bnb(m, q, st)


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_bit_exact_with_bnb(shape, dtype, compress_statistics):
    w = _weights(shape, dtype, seed=_seed("deq", shape, dtype, compress_statistics))
    m = NF4Weight.quantize(w, 64, compress_statistics)
    q, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=compress_statistics, quant_type="nf4")
    ref = bnbf.dequantize_4bit(q, st)
    assert ref.dtype == dtype and ref.shape == shape
    out = m.dequantize()
    assert out.dtype == dtype
    assert torch.equal(out, ref)
    for e in range(shape[0]):
        oe = m.dequantize_expert(e)
        assert oe.dtype == dtype
        assert torch.equal(oe, ref[e]), f"expert {e}"
    # Sanity that the format is really 4-bit of w and not something degenerate: NF4 error on Gaussian
    # rows is ~10% of the norm; 0.2 leaves room for the heavy tails of _weights.
    rel = (out.float() - w.float()).norm() / w.float().norm()
    assert 0.02 < rel < 0.2


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dequantize_to_other_dtype_matches_bnb(out_dtype, compress_statistics):
    # dequantize(dtype) decodes in fp32 then casts, exactly what bnb does for a state of that dtype.
    w = _weights((2, 64, 192), torch.bfloat16, seed=77)
    m = NF4Weight.quantize(w, 64, compress_statistics)
    packed, qs = m.to_bnb()
    qs.dtype = out_dtype
    ref = bnbf.dequantize_4bit(packed, qs)
    assert torch.equal(m.dequantize(out_dtype), ref)
    assert torch.equal(m.dequantize_expert(1, out_dtype), ref[1])


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_from_bnb_quantize_4bit_output(compress_statistics):
    w = _weights((4, 64, 128), torch.bfloat16, seed=3)
    q, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=compress_statistics, quant_type="nf4")
    m = NF4Weight.from_bnb(q, st)
    _assert_same_as_bnb(m, q, st)
    assert torch.equal(m.dequantize(), bnbf.dequantize_4bit(q, st))
    assert _all_buffers_equal(m, NF4Weight.quantize(w, 64, compress_statistics))


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_to_bnb_round_trip(compress_statistics):
    w = _weights((3, 64, 192), torch.float16, seed=21)
    m = NF4Weight.quantize(w, 64, compress_statistics)
    packed, qs = m.to_bnb()
    assert packed.dtype == torch.uint8 and packed.shape == (3 * 64 * 192 // 2, 1)
    assert qs.quant_type == "nf4" and qs.nested == compress_statistics and qs.dtype == torch.float16
    assert tuple(qs.shape) == (3, 64, 192) and qs.blocksize == 64
    assert torch.equal(bnbf.dequantize_4bit(packed, qs), m.dequantize())
    back = NF4Weight.from_bnb(packed, qs)
    assert _all_buffers_equal(m, back)
    # to_bnb shares no storage: scribbling on its output leaves the container intact.
    before = m.dequantize()
    packed.fill_(0x77)
    qs.absmax.fill_(3)
    if compress_statistics:
        qs.state2.absmax.fill_(9.0)
        qs.state2.code.fill_(9.0)
    assert torch.equal(m.dequantize(), before)


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_params4bit_round_trip(compress_statistics):
    w = _weights((3, 64, 128), torch.bfloat16, seed=9)
    # Params4bit defaults to FP4 with compress_statistics=True: always pass both explicitly.
    p = bnb.nn.Params4bit(data=w.clone(), requires_grad=False, quant_type="nf4",
                          compress_statistics=compress_statistics, blocksize=64)
    # bitsandbytes 0.50 quantizes a Params4bit when it is moved to a device, CPU included.
    p = p.to("cpu")
    assert p.bnb_quantized and p.dtype == torch.uint8
    assert p.quant_state.nested == compress_statistics
    m = NF4Weight.from_bnb(p, p.quant_state)
    assert type(m.packed) is torch.Tensor  # a plain buffer, not a Params4bit subclass
    assert torch.equal(m.dequantize(), bnbf.dequantize_4bit(p, p.quant_state))
    # Loading did not re-quantize: the same bytes as our own quantizer (both are bnb's).
    assert _all_buffers_equal(m, NF4Weight.quantize(w, 64, compress_statistics))
    # And back, through bitsandbytes' serialized form (what a checkpoint holds).
    packed, qs = m.to_bnb()
    p2 = bnb.nn.Params4bit.from_prequantized(data=packed, quantized_stats=qs.as_dict(packed=True),
                                             requires_grad=False, device="cpu")
    assert p2.quant_state.nested == compress_statistics and p2.quant_state.quant_type == "nf4"
    assert torch.equal(bnbf.dequantize_4bit(p2, p2.quant_state), m.dequantize())
    assert _all_buffers_equal(NF4Weight.from_bnb(p2, p2.quant_state), m)


@pytest.mark.parametrize("compress_statistics", [False, True])
def test_nbytes(compress_statistics):
    e, o, i, bs = 3, 96, 320, 64
    m = NF4Weight.quantize(_weights((e, o, i), torch.bfloat16, seed=4), bs, compress_statistics)
    n_blocks = e * o * i // bs
    expect = e * o * i // 2
    if compress_statistics:
        expect += n_blocks + 4 * math.ceil(n_blocks / 256) + 4 * 256 + 4  # uint8 absmax, absmax2, code2, offset
    else:
        expect += 4 * n_blocks
    assert m.nbytes == expect
    assert m.nbytes < e * o * i * 2 / 3.5  # ~4.1-4.5 bits per weight vs 16 for bf16


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_state_dict_round_trip(compress_statistics, dtype):
    e, o, i = 3, 64, 192
    m = NF4Weight.quantize(_weights((e, o, i), dtype, seed=31), 64, compress_statistics)
    sd = m.state_dict()
    expect_keys = {"packed", "absmax"} | ({"absmax2", "code2", "offset"} if compress_statistics else set())
    assert set(sd) == expect_keys
    fresh = NF4Weight(e, o, i, blocksize=64, compress_statistics=compress_statistics, dtype=dtype)
    # Poison the fresh buffers so a key that silently failed to load shows up.
    with torch.no_grad():
        for b in fresh.buffers():
            b.fill_(7 if b.dtype == torch.uint8 else float("nan"))
    fresh.load_state_dict(sd, strict=True)
    assert _all_buffers_equal(fresh, m)
    assert torch.equal(fresh.dequantize(), m.dequantize())
    # The loaded copy owns its memory.
    with torch.no_grad():
        sd["packed"].fill_(0)
    assert not torch.equal(fresh.packed, m.packed)


def test_state_dict_layout_mismatch_is_loud():
    m = NF4Weight.quantize(_weights((2, 64, 64), torch.bfloat16, seed=2), 64, True)
    fresh = NF4Weight(2, 64, 64, compress_statistics=False)
    with pytest.raises(RuntimeError, match="absmax2"):
        fresh.load_state_dict(m.state_dict())


@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize(
    "cast",
    [
        lambda m: m.to(torch.float64),
        lambda m: m.to(torch.bfloat16),
        lambda m: m.to(dtype=torch.float16),
        lambda m: m.half(),
        lambda m: m.bfloat16(),
        lambda m: m.double(),
        lambda m: m.float(),
        lambda m: torch.nn.Sequential(m).to(torch.bfloat16)[0],
    ],
    ids=["to_f64", "to_bf16", "to_dtype_kw_f16", "half", "bfloat16", "double", "float", "parent_to_bf16"],
)
def test_dtype_casts_leave_nf4_storage_alone(cast, compress_statistics):
    # nn.Module.to(dtype) casts every floating buffer; rounding the fp32 statistics to bf16 would
    # silently change every dequantized weight.  The container must keep its bytes and dtypes.
    w = _weights((2, 64, 192), torch.bfloat16, seed=13)
    m = NF4Weight.quantize(w, 64, compress_statistics)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    deq = m.dequantize()
    m2 = cast(m)
    after = m2.state_dict()
    for k, v in before.items():
        assert after[k].dtype == v.dtype, k
        assert torch.equal(after[k], v), k
    assert m2.dtype == torch.bfloat16
    assert torch.equal(m2.dequantize(), deq)


def test_device_moves_still_apply():
    m = NF4Weight.quantize(_weights((2, 64, 64), torch.float16, seed=8), 64, True)
    meta = m.to("meta")
    assert all(b.device.type == "meta" for b in meta.buffers())
    assert {k: v.dtype for k, v in meta.state_dict().items()} == {
        "packed": torch.uint8, "absmax": torch.uint8, "absmax2": torch.float32,
        "code2": torch.float32, "offset": torch.float32,
    }
    m2 = NF4Weight.quantize(_weights((2, 64, 64), torch.float16, seed=8), 64, False).to("meta", torch.bfloat16)
    assert m2.absmax.device.type == "meta" and m2.absmax.dtype == torch.float32


# ---------------------------------------------------------------------------------------- errors
def test_error_in_not_multiple_of_blocksize():
    w = _weights((2, 64, 96), torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match=r"in_features \(96\).*blocksize \(64\)"):
        NF4Weight.quantize(w, 64)


def test_error_invalid_blocksize():
    w = _weights((2, 64, 192), torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        NF4Weight.quantize(w, 48)


def test_error_quant_type_fp4():
    w = _weights((2, 64, 64), torch.bfloat16, seed=1)
    with pytest.raises(ValueError, match="quant_type must be 'nf4'.*'fp4'"):
        NF4Weight.quantize(w, 64, quant_type="fp4")


def test_error_from_bnb_fp4_state():
    w = _weights((2, 64, 64), torch.bfloat16, seed=1)
    q, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="fp4")
    with pytest.raises(ValueError, match=r"quant_state\.quant_type must be 'nf4'.*'fp4'"):
        NF4Weight.from_bnb(q, st)


@pytest.mark.parametrize("shape", [(64, 128), (2, 2, 2, 64, 64), (128,)])
def test_error_wrong_rank(shape):
    w = torch.randn(shape, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"^w must be 3-D \(E, out, in\) or 4-D \(E, parts, rows, in\)"):
        NF4Weight.quantize(w)


def test_four_d_view_quantizes_as_its_rows_in_order():
    """A 4-D (E, parts, rows, in) view (interleaved gate/up rows put in [gate; up] order) gives the bytes of
    quantizing the reordered 3-D tensor."""
    w = torch.randn(3, 8, 64, dtype=torch.bfloat16)  # rows [g0, u0, g1, u1, ...]
    view = w.view(3, 4, 2, 64).transpose(1, 2)  # (E, 2, I, H): [gate; up], no copy
    a = NF4Weight.quantize(view)
    b = NF4Weight.quantize(torch.cat((w[:, 0::2], w[:, 1::2]), dim=1))
    for name, t in b.state_dict().items():
        assert torch.equal(a.state_dict()[name], t), name


def test_error_from_bnb_wrong_rank():
    w = torch.randn(64, 128, dtype=torch.bfloat16)
    q, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    with pytest.raises(ValueError, match=r"quant_state\.shape must be 3-D"):
        NF4Weight.from_bnb(q, st)


def test_error_from_bnb_wrong_byte_count():
    w = _weights((2, 64, 64), torch.bfloat16, seed=1)
    q, st = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    with pytest.raises(ValueError, match="packed has"):
        NF4Weight.from_bnb(q[:-1], st)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int64, torch.float64, torch.bool])
def test_error_unsupported_dtype(dtype):
    w = torch.randint(0, 5, (2, 64, 64)).to(dtype)
    with pytest.raises(TypeError, match=r"^w must be one of"):
        NF4Weight.quantize(w)


def test_error_not_a_tensor():
    with pytest.raises(TypeError, match="w must be a torch.Tensor"):
        NF4Weight.quantize([[[1.0] * 64]])
