"""The Triton backend against the fp32 reference on the same NF4 weights.

On the CPU this runs under TRITON_INTERPRET=1 (./run tests sets it); on a GPU the same tests run compiled.
Bounds: the reference computes in fp32 from the same dequantized weights, so the only differences are
the kernel's rounding of operands and intermediates to the activation dtype (bf16: 8 mantissa bits,
about 4e-3 relative per rounding; the weight tile, the SwiGLU intermediate, the weighted slot outputs and
the final output are each rounded once, hence 2e-2), fp16 (11 bits: 5e-3) and fp32 (tf32 dot on GPU, 10-bit operands,
about 1e-3 per product and several products in a row, hence 5e-3; exact fp32 in the interpreter).
"""
from __future__ import annotations

import os

import pytest
import torch

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


@pytest.fixture(params=["gemv", "gemm", "gemm_natural_k"])
def kernel_path(request, monkeypatch):
    """Both inference kernels, each forced at every size: the decode GEMV (grouped_gemv.py; by default up to
    64 routed rows, NF4MOE_GEMV_ROWS) and the MMA GEMM (the default above), the GEMM both with its K steps
    in MMA k order (the default, nf4_decode.mma_k_order) and in natural order (NF4MOE_KPERM=0); the
    natural-order run also carries the opt-in K-loop hint (NF4MOE_WGMMA_PIPE=1)."""
    monkeypatch.setenv("NF4MOE_GEMV_ROWS", str(1 << 30) if request.param == "gemv" else "0")
    monkeypatch.setenv("NF4MOE_KPERM", "0" if request.param == "gemm_natural_k" else "1")
    monkeypatch.setenv("NF4MOE_WGMMA_PIPE", "1" if request.param == "gemm_natural_k" else "0")
    return request.param


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
    """Blocksize 32 forces the K step down to 32 (one absmax per tile row); I=96 is not a multiple of the
    default K step (64), so the down projection takes the fallback config there too."""
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


def test_opcheck():
    from nf4moe.kernels import ops
    from nf4moe.kernels.routing import build_routing

    m = make_layer(4, 128, 64, rank=8, seed=31)
    x = torch.randn(6, 128, device=DEV, dtype=torch.float32)
    idx, w = routing(6, 4, 2, seed=32)
    r = build_routing(idx, 4)
    gu = m.gate_up_nf4
    args = (x, gu.packed, gu.absmax, gu.absmax2, gu.code2, gu.offset, m.lora_A["gate_up_proj"].detach(),
            m.lora_B["gate_up_proj"].detach(), m.scaling, r.sorted_pair_ids, r.expert_offsets, 2, 64, 256, "silu")
    torch.library.opcheck(ops.moe_up, args, test_utils=("test_schema", "test_faketensor"))
    h = ops.moe_up(*args)
    dn = m.down_nf4
    dargs = (h, dn.packed, dn.absmax, dn.absmax2, dn.code2, dn.offset, None, None, 1.0, r.sorted_pair_ids,
             r.expert_offsets, w.reshape(-1), idx, 64, 256)
    torch.library.opcheck(ops.moe_down_combine, dargs, test_utils=("test_schema", "test_faketensor"))
    y = torch.randn(idx.numel(), 128, device=DEV)
    torch.library.opcheck(ops.combine, (y, idx, 4), test_utils=("test_schema", "test_faketensor"))


def test_lora_xa_split_partials_sum_to_the_whole(nan_new_empty):
    """At small P the X·Aᵀ precompute splits K into slices (partials summed by the consumer); their sum
    equals the one-slice result and x[row]·A[e]ᵀ computed directly."""
    from nf4moe.kernels.lora_xa import launch_lora_xa, xa_split
    from nf4moe.kernels.routing import build_routing

    t, e, k, r, kdim = 6, 4, 2, 8, 512
    g = torch.Generator().manual_seed(21)
    x = torch.randn(t, kdim, generator=g).to(DEV)
    a = (torch.randn(e, r, kdim, generator=g) * 0.1).to(DEV)
    idx, _ = routing(t, e, k, seed=22)
    rt = build_routing(idx, e)
    assert xa_split(kdim, t * k, 64) == 4
    parts = launch_lora_xa(x, a, rt.sorted_pair_ids, rt.expert_offsets, top_k=k, gather=True, r_pad=16)
    whole = launch_lora_xa(x, a, rt.sorted_pair_ids, rt.expert_offsets, top_k=k, gather=True, r_pad=16,
                           out=torch.full((t * k, 16), float("nan"), device=DEV))
    assert parts.shape == (4, t * k, 16)
    pairs = rt.sorted_pair_ids.long()
    want = torch.einsum("pk,prk->pr", x[pairs // k].double(), a[idx.reshape(-1)[pairs]].double())
    tol = 1e-4 if INTERP else 5e-3  # exact fp32 in the interpreter; tf32 dot operands on the GPU
    torch.testing.assert_close(parts.sum(0)[:, :r].double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(whole[:, :r].double(), want, rtol=tol, atol=tol)


def test_second_launch_skips_the_autotuner(monkeypatch):
    """configs.launch_tuned: once a launch key has its config, eager launches call the JIT function with it
    directly (the autotuner's per-call key building is host time at small T); results are unchanged."""
    from nf4moe.kernels.grouped_gemm import nf4_moe_gemm_kernel

    monkeypatch.setenv("NF4MOE_GEMV_ROWS", "0")
    m = make_layer(4, 128, 64, rank=8, seed=31)
    x = torch.randn(5, 128, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(5, 4, 2, seed=32)
    with torch.no_grad():
        first = m(x, idx, w)

        def autotuner_again(*args, **kwargs):
            raise AssertionError("the autotuner ran for a key that already has its config")

        monkeypatch.setattr(nf4_moe_gemm_kernel, "run", autotuner_again)
        assert torch.equal(m(x, idx, w), first)


@pytest.mark.parametrize("xa_mode", ["0", "1", "auto"])
@pytest.mark.parametrize("t", [3, 40])  # 6 and 80 routed rows: either side of the automatic switch at 64
def test_lora_xa_in_loop_and_precomputed(monkeypatch, xa_mode, t):
    """LoRA X·Aᵀ accumulated in the GEMM's K loop (NF4MOE_XA_PRE=0, the default up to 64 rows) and by
    the lora_xa kernel beforehand (=1, the default above) both match the reference, MMA K order included."""
    import nf4moe.kernels.grouped_gemm as gg

    monkeypatch.setenv("NF4MOE_XA_PRE", xa_mode)
    monkeypatch.setenv("NF4MOE_GEMV_ROWS", "0")  # the MMA GEMM at every size (the GEMV always precomputes)
    calls = count_calls(monkeypatch, gg, "launch_lora_xa")
    m = make_layer(4, 128, 64, rank=16, seed=31)
    x = torch.randn(t, 128, device=DEV)
    idx, w = routing(t, 4, 2, seed=32)
    assert_matches_reference(m, x, idx, w, BOUND[torch.float32])
    precomputed = xa_mode == "1" or (xa_mode == "auto" and 2 * t > 64)
    assert len(calls) == (2 if precomputed else 0)  # one X·Aᵀ launch per projection, or none


def gemv_calls(monkeypatch) -> tuple[list, list]:
    """Calls of the GEMV launcher (grouped_gemm's): the up projection's (gated), and the down projection's, each
    recorded as what it returned: whether it fused the combine."""
    import nf4moe.kernels.grouped_gemm as gg

    up, down = [], []
    real = gg.launch_nf4_moe_gemv

    def record(*a, **kw):
        fused = real(*a, **kw)
        (up if kw["gated"] else down).append(fused)
        return fused

    monkeypatch.setattr(gg, "launch_nf4_moe_gemv", record)
    return up, down


@pytest.mark.parametrize("t,gemv", [(1, True), (32, True), (33, False)])  # 2, 64, 66 routed rows at top-2
def test_decode_gemv_is_the_default_up_to_64_rows(monkeypatch, t, gemv):
    """Inference calls of up to 64 routed rows take the decode GEMV (both projections), larger ones the GEMM."""
    import nf4moe.kernels.grouped_gemm as gg

    monkeypatch.delenv("NF4MOE_GEMV_ROWS", raising=False)
    up, down = gemv_calls(monkeypatch)
    m = make_layer(4, 128, 64, rank=8, seed=33)
    x = torch.randn(t, 128, device=DEV)
    idx, w = routing(t, 4, 2, seed=34)
    assert_matches_reference(m, x, idx, w, BOUND[torch.float32])
    assert (up, down) == (([False], [True]) if gemv else ([], []))  # the down GEMV with its fused combine


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gemv_fused_combine_equals_down_then_combine(monkeypatch, nan_new_empty, dtype):
    """The down GEMV's fused combine (the last routed slot of each token and N tile sums the token's slot rows)
    against the same GEMV's slot rows summed by the combine kernel: bit-identical (same values, same fixed
    order), with sentinel slots, a token whose every slot is a sentinel (a zero row, written by its dropped
    pairs), a token routed twice to one expert; every arrival counter back at zero afterwards."""
    from nf4moe.kernels import ops
    from nf4moe.kernels.grouped_gemm import split_k_counters
    from nf4moe.kernels.operands import NF4Operand
    from nf4moe.kernels.routing import build_routing

    import triton

    from nf4moe.kernels import configs

    class Pinned(dict):  # both launches on one config: the same slot rows, bit for bit
        def get(self, key, default=None):
            return cfg if key[0] in ("gemv", "gemv_combine") else super().get(key, default)

    # two N tiles per program: the second tile's arrival counters too
    cfg = triton.Config({"BLOCK_M": 1, "BLOCK_N": 32, "LANES": 4, "STEPS": 4, "VEC": 4, "TILES": 2}, num_warps=1,
                        num_stages=1).all_kwargs()
    monkeypatch.setattr(configs, "_TUNED", Pinned())
    monkeypatch.setenv("NF4MOE_GEMV_ROWS", str(1 << 30))
    e, k, t = 5, 3, 4
    m = make_layer(e, 128, 64, rank=8, seed=61)
    idx = torch.tensor([[0, 4, e], [e + 2, e, e], [2, 2, 1], [3, e, 0]], device=DEV)
    w = torch.rand(t, k, device=DEV, dtype=dtype) + 0.1
    r = build_routing(idx, e)
    h = torch.randn(t * k, 64, device=DEV, dtype=dtype)
    dn = m.down_nf4
    op = NF4Operand(dn.packed, dn.absmax, dn.absmax2, dn.code2, dn.offset, dn.blocksize, dn.blocksize2)
    la, lb = m.lora_A["down_proj"].detach(), m.lora_B["down_proj"].detach()
    up, down = gemv_calls(monkeypatch)
    args = (h, op, la, lb, m.scaling, r.sorted_pair_ids, r.expert_offsets, w.reshape(-1))
    with torch.no_grad():
        fused = ops._down(*args, idx)
        monkeypatch.setenv("NF4MOE_FUSE_COMBINE", "0")  # the GEMV's slot rows, then the combine kernel
        apart = ops._down(*args, idx)
        rows = ops._down(*args)
    assert down == [True, False, False]  # the fused path really ran, then twice the plain GEMV
    assert torch.equal(fused, apart) and torch.equal(apart, ops._combine(rows, idx, e))
    assert torch.equal(fused[1], torch.zeros_like(fused[1])) and torch.isfinite(fused).all()
    assert int(split_k_counters(h.device, t * 128).count_nonzero()) == 0


def test_operand_rejects_input_columns_off_the_blocksize():
    """Rows of a packed operand start 16-byte aligned only when K is a multiple of the blocksize (the kernels'
    row_bytes hint and absmax indexing rely on it): anything else is refused when the operand is built."""
    from nf4moe.kernels.operands import NF4Operand

    packed = torch.zeros(2, 4, 48, dtype=torch.uint8)  # 96 input columns
    with pytest.raises(ValueError, match=r"96 input columns.*blocksize \(64\)"):
        NF4Operand(packed, torch.ones(2, 4, 1), None, None, None, 64)
    assert NF4Operand(packed, torch.ones(2, 4, 3), None, None, None, 32).blocksize == 32


def test_gemv_capture_runs_the_plain_gemv_tuned_by_the_first_eager_call(monkeypatch):
    """The first eager fused down GEMV of a shape also tunes the plain GEMV; a later launch while a CUDA graph is
    captured (simulated here: ``capturing`` patched) runs that plain GEMV and the combine kernel, with no tuning,
    and equals the eager unfused path bit for bit; with the plain GEMV never tuned it stays fused."""
    from nf4moe.kernels import configs, ops
    from nf4moe.kernels import grouped_gemv as gv

    monkeypatch.setenv("NF4MOE_GEMV_ROWS", str(1 << 30))
    monkeypatch.setattr(configs, "_TUNED", {})
    m = make_layer(4, 128, 64, rank=8, seed=81)
    x = torch.randn(2, 128, device=DEV)
    idx, w = routing(2, 4, 2, seed=82)
    up, down = gemv_calls(monkeypatch)
    keys = []
    real_tune = configs.launch_tuned
    monkeypatch.setattr(gv, "launch_tuned", lambda kernel, grid, key, *a, **kw: keys.append(
        (key[0], key[1], configs.tuned(key))) or real_tune(kernel, grid, key, *a, **kw))
    with torch.no_grad():
        eager = m(x, idx, w)
        # (kind, N, tuned before) of each launch: the up projection (N = 64), then the down's (N = 128): the plain
        # GEMV tuned first, then the fused one
        assert down == [True] and keys == [("gemv", 64, False), ("gemv", 128, False), ("gemv_combine", 128, False)]
        monkeypatch.setattr(gv, "capturing", lambda t: True)
        keys.clear()
        captured = m(x, idx, w)
        assert down[-1] is False and keys == [("gemv", 64, True), ("gemv", 128, True)]  # plain, nothing tuned
        monkeypatch.setattr(gv, "capturing", lambda t: False)
        monkeypatch.setenv("NF4MOE_FUSE_COMBINE", "0")
        assert torch.equal(captured, m(x, idx, w))
        torch.testing.assert_close(captured, eager, rtol=1e-5, atol=1e-5)
        monkeypatch.delenv("NF4MOE_FUSE_COMBINE")
        monkeypatch.setattr(configs, "_TUNED", {k: v for k, v in configs._TUNED.items() if k[:2] != ("gemv", 128)})
        monkeypatch.setattr(gv, "capturing", lambda t: True)
        m(x, idx, w)
        assert down[-1] is True  # the plain GEMV untuned: fused (no autotuning inside a capture)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("t", [1, 2, 40])
def test_cuda_graph_replays_match_eager(monkeypatch, t):
    """The layer captured in a CUDA graph after one eager call (the decode GEMV at T <= 2: eager calls fuse the
    combine into the down GEMV, the capture runs the plain GEMV, tuned by that first eager call, and the
    combine kernel; the GEMM above), replayed on new inputs copied into the captured buffers: each replay equals
    an eager call of the same path (``NF4MOE_FUSE_COMBINE=0``) bit for bit, and the fused eager call to
    rounding (the two GEMV variants may run different tuned configs)."""
    from nf4moe.kernels import grouped_gemm as gg

    captured = []
    real = gg.launch_nf4_moe_gemv
    monkeypatch.setattr(gg, "launch_nf4_moe_gemv", lambda *a, **kw: captured.append(
        (torch.cuda.is_current_stream_capturing(), kw["gated"], real(*a, **kw))) or captured[-1][2])
    m = make_layer(8, 256, 128, rank=8, seed=71)
    x = torch.randn(t, 256, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(t, 8, 4, seed=72)
    w = w.to(torch.bfloat16)
    with torch.no_grad():
        m(x, idx, w)  # compile and tune outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(x, idx, w)
        # (capturing, gated, fused) of each GEMV launch: eager fused, captured plain
        assert captured == ([(False, True, False), (False, False, True), (True, True, False), (True, False, False)]
                            if t <= 2 else [])
        for seed in (73, 74, 75):
            refill(x, idx, w, e=8, seed=seed)
            graph.replay()
            fused = m(x, idx, w)
            monkeypatch.setenv("NF4MOE_FUSE_COMBINE", "0")
            assert torch.equal(out, m(x, idx, w))
            monkeypatch.delenv("NF4MOE_FUSE_COMBINE")
            torch.testing.assert_close(out, fused, rtol=2e-2, atol=2e-2)


def pdl_case(t, seed):
    """A small layer, activations and routing for the PDL tests on this GPU (skipped before sm_90)."""
    from nf4moe.kernels import launch as L

    m = make_layer(8, 256, 128, rank=8, seed=seed)
    x = torch.randn(t, 256, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(t, 8, 4, seed=seed + 1)
    if not L._pdl_capable(x.device.index):
        pytest.skip("programmatic dependent launch needs sm_90 or newer")
    return m, x, idx, w.to(torch.bfloat16)


def pdl_chain(t, captured):
    """The PDL kernels of a layer call at ``t`` tokens (4 slots): routing with the up X·Aᵀ, the down X·Aᵀ and the
    decode GEMVs, or routing, both X·Aᵀ, the MMA GEMMs and combine; ``captured``: a capture's decode path also
    launches the combine kernel (eager decode calls fuse it into the GEMV)."""
    from nf4moe.kernels.grouped_gemv import gemv_takes

    if gemv_takes(t * 4):
        decode = {"routing_xa_kernel", "nf4_moe_gemv_kernel", "lora_xa_kernel"}
        return decode | {"combine_kernel"} if captured else decode
    return {"routing_kernel", "nf4_moe_gemm_kernel", "lora_xa_kernel", "combine_kernel"}


def compiled_kernels(**want):
    """Names of the kernels launch.launch has compiled with all of the keyword arguments ``want``."""
    from nf4moe.kernels import launch as L

    return {k[0].__name__ for k in L._COMPILED if all((n, v) in k[3] for n, v in want.items())}


@pytest.mark.skipif(DEV != "cuda", reason="programmatic dependent launch needs a GPU")
@pytest.mark.parametrize("t", [1, 16, 128])
def test_pdl_launches_give_the_same_bits(monkeypatch, t):
    """v46 (NF4MOE_PDL=1): the inference path's kernels (routing with the up X·Aᵀ, X·Aᵀ, decode GEMV or MMA
    GEMM, combine) launched as programmatic dependent launches, each waiting for its predecessor first: eager
    calls and CUDA-graph replays on new inputs give the bits of the same path without PDL (the configs tuned
    without it are reused: grouped_gemm.launch_key), on sm_90 and newer."""
    m, x, idx, w = pdl_case(t, seed=81)
    with torch.no_grad():
        monkeypatch.setenv("NF4MOE_PDL", "0")
        ref = m(x, idx, w)
        monkeypatch.setenv("NF4MOE_PDL", "1")
        assert torch.equal(m(x, idx, w), ref)
        pdl = compiled_kernels(PDL=True, launch_pdl=True)
        assert pdl_chain(t, captured=False) <= pdl, pdl
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(x, idx, w)
        monkeypatch.setenv("NF4MOE_FUSE_COMBINE", "0")  # the captured decode path: plain GEMV + combine kernel
        for seed in (83, 84, 85):
            refill(x, idx, w, e=8, seed=seed)
            graph.replay()
            monkeypatch.setenv("NF4MOE_PDL", "0")
            assert torch.equal(out, m(x, idx, w))
            monkeypatch.setenv("NF4MOE_PDL", "1")


@pytest.mark.skipif(DEV != "cuda", reason="programmatic dependent launch needs a GPU")
@pytest.mark.parametrize("t", [1, 32])  # 4 and 128 routed rows: the decode GEMV, the MMA GEMM
def test_captures_take_pdl_and_early_xa_by_default(monkeypatch, t):
    """NF4MOE_PDL and NF4MOE_GEMV_XA_EARLY unset (configs.graph_flag): eager calls launch without either, a CUDA
    graph captured after them compiles and launches the PDL kernels (and the decode GEMV's early X·Aᵀ sum) with
    the configs its eager calls tuned, and its replays on new inputs give the eager calls' bits."""
    from nf4moe.kernels import launch as L
    from nf4moe.kernels.grouped_gemv import gemv_takes

    for flag in ("NF4MOE_PDL", "NF4MOE_GEMV_XA_EARLY", "NF4MOE_FUSE_COMBINE"):
        monkeypatch.delenv(flag, raising=False)
    m, x, idx, w = pdl_case(t, seed=88)
    with torch.no_grad():
        assert L.pdl_options(x, None) == {"PDL": False, "launch_pdl": False}  # eager: plain launches
        m(x, idx, w)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = m(x, idx, w)
        pdl = compiled_kernels(PDL=True, launch_pdl=True)
        assert pdl_chain(t, captured=True) <= pdl, pdl
        if gemv_takes(t * 4):
            assert "nf4_moe_gemv_kernel" in compiled_kernels(PDL=True, XA_EARLY=True)
        monkeypatch.setenv("NF4MOE_FUSE_COMBINE", "0")  # eager calls on the captured decode path's kernels
        for seed in (90, 91):
            refill(x, idx, w, e=8, seed=seed)
            graph.replay()
            assert torch.equal(out, m(x, idx, w))


@pytest.mark.skipif(DEV != "cuda", reason="programmatic dependent launch needs a GPU")
def test_pdl_training_step_gives_the_same_gradients(monkeypatch):
    """The training forward's GEMMs and X·Aᵀ launched with PDL (the backward's kernels without): the same
    output and gradients, bit for bit."""
    m, x0, idx, w0 = pdl_case(16, seed=86)
    gy = torch.randn(16, 256, device=DEV, dtype=torch.bfloat16)
    results = []
    for flag in ("0", "1"):
        monkeypatch.setenv("NF4MOE_PDL", flag)
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        for p in m.parameters():
            p.grad = None
        out = m(x, idx, w)
        out.backward(gy)
        results.append([out, x.grad, w.grad] + [p.grad for p in m.parameters() if p.requires_grad])
    for a, b in zip(*results):
        assert torch.equal(a, b)


GEMV_PINS = [  # (BLOCK_M, BLOCK_N, LANES, STEPS, VEC, num_warps, TILES), dtype: the 16- and 8-byte lanes, one row
    # per program (the direct row-to-expert lookup) and two (the per-expert tile schedule), K chunks of 256, 128 and
    # 64 columns (up, K = 256: 1, 2, 4 chunks; down, K = 128: a tail, 1, 2); VEC = 4 is the interpreter's.  TILES:
    # 3 N tiles per program, the prefetch across tiles, and tiles past N (up N = 128: 4 tiles, the second program's
    # last two are past N; down N = 256: 8 tiles, one past N)
    (1, 32, 8, 1, 16, 1, 1, torch.bfloat16), (2, 32, 4, 1, 16, 1, 1, torch.float16),
    (1, 32, 4, 1, 8, 1, 1, torch.bfloat16), (1, 32, 4, 1, 8, 1, 3, torch.float32)]


@pytest.mark.parametrize("pin", GEMV_PINS)
def test_gemv_configs_match_reference(monkeypatch, nan_new_empty, pin):
    """Each GEMV lane width and row count per program, pinned through the launcher's config cache, against
    the reference: one or several whole K chunks (the next chunk's loads issued before the current one's
    decode) and a masked tail."""
    import triton

    import nf4moe.kernels.grouped_gemm as gg
    from nf4moe.kernels import configs

    bm, bn, lanes, steps, vec, warps, tiles, dtype = pin
    cfg = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "LANES": lanes, "STEPS": steps, "VEC": vec, "TILES": tiles},
                        num_warps=warps, num_stages=1)

    class Pinned(dict):  # the down projection's fused combine takes one row per program
        def get(self, key, default=None):
            if key[0] == "gemv" or (key[0] == "gemv_combine" and bm == 1):
                return cfg.all_kwargs()
            return super().get(key, default)

    monkeypatch.setattr(configs, "_TUNED", Pinned())
    monkeypatch.setenv("NF4MOE_GEMV_ROWS", str(1 << 30))
    up, down = gemv_calls(monkeypatch)
    m = make_layer(4, 256, 128, rank=8, seed=50 + vec + bm)
    x = torch.randn(3, 256, device=DEV, dtype=dtype)
    idx, w = routing(3, 4, 2, seed=51)
    assert_matches_reference(m, x, idx, w, BOUND[dtype])
    assert (up, down) == ([False], [True])


@pytest.mark.parametrize("splits,xa_mode,dtype", [(2, "0", torch.float32), (4, "0", torch.bfloat16),
                                                  (4, "1", torch.float32)])
def test_split_k_matches_reference(monkeypatch, splits, xa_mode, dtype):
    """NF4MOE_SPLIT_K (opt-in, <= 64 routed rows): every split stores fp32 partials, the last to arrive sums
    them in split order and runs the epilogue.  Against the reference, bit-identical on a repeat (fixed order),
    the GEMMs really launched split, and every arrival counter back at zero (CUDA-graph replays rely on it)."""
    import nf4moe.kernels.grouped_gemm as gg

    monkeypatch.setenv("NF4MOE_GEMV_ROWS", "0")
    monkeypatch.setenv("NF4MOE_SPLIT_K", str(splits))
    monkeypatch.setenv("NF4MOE_XA_PRE", xa_mode)  # the in-loop X·Aᵀ partials are split too
    seen = []
    real = gg.launch_tuned
    monkeypatch.setattr(gg, "launch_tuned", lambda *a, **kw: seen.append(kw["SPLIT_K"]) or real(*a, **kw))
    m = make_layer(6, 256, 128, rank=8, nested=True, seed=41)
    x = torch.randn(7, 256, device=DEV, dtype=dtype)
    idx, w = routing(7, 6, 3, seed=42)
    with torch.no_grad():
        out = m(x, idx, w.to(dtype))
        assert rel_err(out, reference(m, x, idx, w.to(dtype))) < BOUND[dtype]
        assert torch.equal(m(x, idx, w.to(dtype)), out)
    assert seen and all(s == splits for s in seen), seen  # K = 256 and 128 both take 4 splits of 32
    assert all(int(c.count_nonzero()) == 0 for c in gg._COUNTERS.values())


@pytest.mark.skipif(not INTERP, reason="reorders the interpreter's programs")
def test_split_k_does_not_depend_on_program_order(monkeypatch):
    """On a GPU the splits of a tile arrive in any order; the interpreter runs programs in grid order, where
    the last split is always the last one.  Here every launch runs its programs in a fresh random order
    (several row tiles per expert, several N tiles): the result must equal the in-order one bit for bit."""
    import random

    import triton.runtime.interpreter as interp

    monkeypatch.setenv("NF4MOE_GEMV_ROWS", "0")
    monkeypatch.setenv("NF4MOE_SPLIT_K", "4")
    monkeypatch.setenv("NF4MOE_XA_PRE", "0")
    m = make_layer(2, 256, 128, rank=8, nested=True, seed=43)
    x = torch.randn(30, 256, device=DEV)
    idx, w = routing(30, 2, 2, seed=44)  # 30 rows per expert: two row tiles each
    with torch.no_grad():
        in_order = m(x, idx, w)
        builder = type(interp.interpreter_builder)
        real = builder.set_grid_idx
        rng, perm = random.Random(5), {}

        def shuffled(self, x_, y_, z_):
            nx, ny, nz = self.grid_dim
            i = x_ + nx * (y_ + ny * z_)
            if i == 0:  # the interpreter starts each launch at program (0, 0, 0): a new order
                perm["p"] = rng.sample(range(nx * ny * nz), nx * ny * nz)
            j = perm["p"][i]
            real(self, j % nx, j // nx % ny, j // (nx * ny))

        monkeypatch.setattr(builder, "set_grid_idx", shuffled)
        for _ in range(2):
            assert torch.equal(m(x, idx, w), in_order)
    assert rel_err(in_order, reference(m, x, idx, w)) < BOUND[torch.float32]


def test_split_k_stays_off_where_it_does_not_apply(monkeypatch):
    """Above 64 routed rows, in training and when traced, the GEMM does not split; a bad value is an error."""
    from nf4moe.kernels.grouped_gemm import split_k

    monkeypatch.setenv("NF4MOE_SPLIT_K", "4")
    assert split_k(64, 2048, False, None) == 4 and split_k(65, 2048, False, None) == 1
    assert split_k(8, 2048, True, None) == 1 and split_k(8, 2048, False, object()) == 1
    assert split_k(8, 96, False, None) == 1  # K = 96: 96 / 2 = 48 is no multiple of the 32-column K step
    for bad in ("3", "0", "two", ""):
        monkeypatch.setenv("NF4MOE_SPLIT_K", bad)
        with pytest.raises(ValueError, match="NF4MOE_SPLIT_K"):
            split_k(8, 2048, False, None)


WGMMA_CASES = [
    # (T, E, H, I, K, mode): N not a multiple of the tile (I = 192 < 2 x 128, H = 192 < 256), an expert with
    # more than one 128-row tile, experts with none, sentinels, K = E
    (300, 8, 256, 192, 4, "random"),
    (200, 4, 128, 320, 2, "one_expert"),
    (150, 8, 192, 128, 3, "sentinels"),
    (70, 4, 320, 64, 4, "random"),
]


@pytest.fixture
def wgmma_counted(monkeypatch):
    """Force the Gluon GEMM (grouped_gemm_wgmma.py) at every row count and count its launches."""
    if DEV != "cuda" or INTERP or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon GEMM runs on Hopper only")
    import nf4moe.kernels.grouped_gemm_wgmma as wg

    monkeypatch.setenv("NF4MOE_WGMMA_ROWS", "1")
    calls = []
    real = wg.launch_nf4_moe_gemm_wgmma

    def counted(*a, **kw):
        calls.append(kw["gated"])
        return real(*a, **kw)

    monkeypatch.setattr(wg, "launch_nf4_moe_gemm_wgmma", counted)
    return calls


@pytest.mark.parametrize("t,e,h,i,k,mode", WGMMA_CASES)
@pytest.mark.parametrize("rank", [0, 16])
@pytest.mark.parametrize("dtype,nested,act", [(torch.bfloat16, True, "silu"), (torch.float16, False, "gelu_tanh")])
def test_wgmma_gemm_matches_reference(wgmma_counted, nan_new_empty, t, e, h, i, k, mode, rank, dtype, nested, act):
    m = make_layer(e, h, i, rank=rank, nested=nested, act=act, seed=t + rank)
    x = torch.randn(t, h, device=DEV, dtype=dtype)
    idx, w = routing(t, e, k, seed=t * 5 + rank, mode=mode)
    with torch.no_grad():
        out = m(x, idx, w.to(dtype))
        ref = reference(m, x, idx, w.to(dtype))
    assert sorted(wgmma_counted) == [False, True], "the Gluon GEMM did not run for both projections"
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, ref) < BOUND[dtype]


@pytest.mark.parametrize("tile,stages,early,regs", [("256x128", "4", "0", "0"), ("128x256", "5", "0", "0"),
                                                    ("256x128", "4", "1", "0"), ("128x256", "4", "1", "0"),
                                                    ("256x128", "4", "0", "1"), ("128x256", "4", "0", "1")])
@pytest.mark.parametrize("t,e,h,i,k,mode", WGMMA_CASES[:3])
def test_wgmma_gemm_opt_in_configs(wgmma_counted, nan_new_empty, monkeypatch, tile, stages, early, regs, t, e, h, i, k,
                                   mode):
    """The other configurations: the 256-row tile (every weight decoded once per 256 rows), rings of 5 (copies
    three steps ahead), the activation copies issued before the block barrier (NF4MOE_WGMMA_EARLY_COPY), the
    decode's table words in registers (NF4MOE_LUT_REGS, the default since v42) or as immediates."""
    monkeypatch.setenv("NF4MOE_WGMMA_TILE", tile)
    monkeypatch.setenv("NF4MOE_WGMMA_STAGES", stages)
    monkeypatch.setenv("NF4MOE_WGMMA_EARLY_COPY", early)
    monkeypatch.setenv("NF4MOE_LUT_REGS", regs)
    m = make_layer(e, h, i, rank=16, seed=t)
    x = torch.randn(t, h, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(t, e, k, seed=t * 3, mode=mode)
    with torch.no_grad():
        out = m(x, idx, w.to(torch.bfloat16))
        ref = reference(m, x, idx, w.to(torch.bfloat16))
    assert sorted(set(wgmma_counted)) == [False, True]  # 256x128: plus the remainder launches (NF4MOE_WGMMA_SPLIT)
    assert torch.isfinite(out).all() and rel_err(out, ref) < BOUND[torch.bfloat16]


@pytest.mark.parametrize("tile", ["256x128", "128x256"])
@pytest.mark.parametrize("t,e,h,i,k,mode", WGMMA_CASES)
@pytest.mark.parametrize("dtype,nested,act,rank", [(torch.bfloat16, True, "silu", 16),
                                                   (torch.float16, False, "gelu_tanh", 0)])
def test_wgmma_ws_gemm_matches_reference(wgmma_counted, nan_new_empty, monkeypatch, tile, t, e, h, i, k, mode, dtype,
                                         nested, act, rank):
    """The warp-specialised Gluon GEMM (NF4MOE_WGMMA_WS=1: producer warps decode, consumer warps multiply, mbarriers
    between them), both tiles, both projections."""
    monkeypatch.setenv("NF4MOE_WGMMA_WS", "1")
    monkeypatch.setenv("NF4MOE_WGMMA_TILE", tile)
    m = make_layer(e, h, i, rank=rank, nested=nested, act=act, seed=t + rank + 7)
    x = torch.randn(t, h, device=DEV, dtype=dtype)
    idx, w = routing(t, e, k, seed=t * 7, mode=mode)
    with torch.no_grad():
        out = m(x, idx, w.to(dtype))
        ref = reference(m, x, idx, w.to(dtype))
    assert sorted(set(wgmma_counted)) == [False, True]  # 256x128: plus the remainder launches
    assert out.dtype == dtype and torch.isfinite(out).all() and rel_err(out, ref) < BOUND[dtype]


@pytest.mark.parametrize("t,e,h,i,k,mode", [
    (600, 4, 256, 192, 2, "random"),      # ~300 rows per expert: a 256-row tile and a 128-row remainder each
    (700, 8, 192, 320, 4, "random"),      # ~350: remainders either side of 128 (some padded 256-row tiles)
    (150, 8, 192, 128, 3, "sentinels"),   # ~56: remainder tiles only
    (700, 4, 128, 256, 2, "one_expert"),  # one expert of 700 rows (700 % 256 = 188: no remainder tile)
])
def test_wgmma_split_remainders_match_reference(wgmma_counted, nan_new_empty, monkeypatch, t, e, h, i, k, mode):
    """NF4MOE_WGMMA_SPLIT=1: the 256-row tiles, then each expert's last <= 128 rows as a 128-row tile in a
    second launch; every output row written once (outputs poisoned), against the reference."""
    monkeypatch.setenv("NF4MOE_WGMMA_TILE", "256x128")
    monkeypatch.setenv("NF4MOE_WGMMA_SPLIT", "1")
    m = make_layer(e, h, i, rank=16, seed=t + 11)
    x = torch.randn(t, h, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(t, e, k, seed=t * 11, mode=mode)
    with torch.no_grad():
        out = m(x, idx, w.to(torch.bfloat16))
        ref = reference(m, x, idx, w.to(torch.bfloat16))
    assert sorted(set(wgmma_counted)) == [False, True] and len(wgmma_counted) == 4, wgmma_counted
    assert torch.isfinite(out).all() and rel_err(out, ref) < BOUND[torch.bfloat16]


@pytest.mark.parametrize("recompute,ws", [("0", "0"), ("1", "0"), ("0", "1")])
def test_wgmma_gemm_training_forward_and_grads(wgmma_counted, monkeypatch, recompute, ws):
    """The training forward through the Gluon GEMM (pre-activations and X·Aᵀ saved; in recompute mode the
    backward's up pass writes only the pre-activations; ws: the warp-specialised kernel) gives the Triton
    GEMM's gradients within bf16 rounding."""
    monkeypatch.setenv("NF4MOE_RECOMPUTE", recompute)
    monkeypatch.setenv("NF4MOE_WGMMA_WS", ws)
    m = make_layer(8, 256, 192, rank=16, seed=4)
    x0 = torch.randn(300, 256, device=DEV, dtype=torch.bfloat16)
    idx, w = routing(300, 8, 4, seed=9)

    def grads():
        m.zero_grad()
        x = x0.clone().requires_grad_(True)
        ww = w.to(torch.bfloat16).clone().requires_grad_(True)
        out = m(x, idx, ww)
        out.float().square().sum().backward()
        return [out, x.grad, ww.grad] + [p.grad.clone() for p in (*m.lora_A.values(), *m.lora_B.values())]

    fast = grads()
    assert True in wgmma_counted
    monkeypatch.setenv("NF4MOE_WGMMA_ROWS", "0")
    slow = grads()
    for a, b in zip(fast, slow):
        assert rel_err(a, b.float()) < 2e-2


def test_wgmma_switch(monkeypatch):
    """NF4MOE_WGMMA_ROWS: default 8192 routed rows, 0 off, anything else refused by name; never on CPU tensors."""
    from nf4moe.kernels.grouped_gemm import use_wgmma, wgmma_min_rows

    monkeypatch.delenv("NF4MOE_WGMMA_ROWS", raising=False)
    assert wgmma_min_rows() == 8192
    monkeypatch.setenv("NF4MOE_WGMMA_ROWS", "many")
    with pytest.raises(ValueError, match="NF4MOE_WGMMA_ROWS"):
        wgmma_min_rows()
    monkeypatch.setenv("NF4MOE_WGMMA_ROWS", "1")
    assert not use_wgmma(torch.randn(8, 128, dtype=torch.bfloat16), None, 1 << 20, None)  # a CPU tensor
    from nf4moe.kernels.grouped_gemm import gluon_available

    if gluon_available():
        from nf4moe.kernels.grouped_gemm_wgmma import tile_shape

        monkeypatch.delenv("NF4MOE_WGMMA_TILE", raising=False)
        assert tile_shape(255 * 128, 128) == (128, 256) and tile_shape(256 * 128, 128) == (256, 128)
        monkeypatch.setenv("NF4MOE_WGMMA_TILE", "128x256")
        assert tile_shape(1 << 20, 128) == (128, 256)
        monkeypatch.setenv("NF4MOE_WGMMA_TILE", "256x128")
        assert tile_shape(8, 128) == (256, 128)
        monkeypatch.setenv("NF4MOE_WGMMA_TILE", "256x256")
        with pytest.raises(ValueError, match="NF4MOE_WGMMA_TILE"):
            tile_shape(8, 128)
        from nf4moe.kernels.grouped_gemm_wgmma import stages

        from nf4moe.kernels.grouped_gemm_wgmma import split_remainders, warp_specialized

        monkeypatch.delenv("NF4MOE_WGMMA_SPLIT", raising=False)
        assert split_remainders()
        from nf4moe.kernels.grouped_gemm_wgmma import early_copy

        monkeypatch.delenv("NF4MOE_WGMMA_EARLY_COPY", raising=False)
        assert not early_copy()
        monkeypatch.setenv("NF4MOE_WGMMA_EARLY_COPY", "2")
        with pytest.raises(ValueError, match="NF4MOE_WGMMA_EARLY_COPY"):
            early_copy()
        monkeypatch.setenv("NF4MOE_WGMMA_SPLIT", "on")
        with pytest.raises(ValueError, match="NF4MOE_WGMMA_SPLIT"):
            split_remainders()

        monkeypatch.delenv("NF4MOE_WGMMA_WS", raising=False)
        assert not warp_specialized()
        monkeypatch.setenv("NF4MOE_WGMMA_WS", "8,96,128,5,2")
        assert warp_specialized() == (8, 96, 128, 5, 2)
        for bad in ("yes", "8,96,128,5", "6,96,128,4,3", "8,100,128,4,3"):
            monkeypatch.setenv("NF4MOE_WGMMA_WS", bad)
            with pytest.raises(ValueError, match="NF4MOE_WGMMA_WS"):
                warp_specialized()
        monkeypatch.delenv("NF4MOE_WGMMA_STAGES", raising=False)
        assert stages(128) == 4 and stages(256) == 4
        monkeypatch.setenv("NF4MOE_WGMMA_STAGES", "5")
        assert stages(128) == 5
        with pytest.raises(ValueError, match="NF4MOE_WGMMA_STAGES"):
            stages(256)  # 5 rings of 256-row tiles do not fit in shared memory


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
    one nf4moe::moe_experts call) read one tile table built once from the shared routing.  The Gluon kernel is
    replaced by a recorder here (it has no interpreter path; its results are tested on the GPU), so only the
    tables it would get are checked, against tile_table's own build of the same routing."""
    from nf4moe.kernels import grouped_gemm as gg
    from nf4moe.kernels import grouped_gemm_wgmma as gw
    from nf4moe.kernels import tile_table as tt
    from nf4moe.kernels.routing import build_routing

    monkeypatch.setenv("NF4MOE_GEMV_ROWS", "0")
    monkeypatch.setattr(gg, "use_wgmma", lambda *a: True)
    built = count_calls(monkeypatch, tt, "launch_tile_table")
    seen = []
    monkeypatch.setattr(gw, "launch_nf4_moe_gemm_wgmma", lambda *a, **kw: seen.append((a[6], kw["gated"])) or a[8])
    m = make_layer(4, 128, 64, rank=8, seed=91)
    x = torch.randn(6, 128, device=DEV, requires_grad=grad)
    idx, w = routing(6, 4, 2, seed=92)
    with torch.set_grad_enabled(grad):
        m(x, idx, w)
    assert len(built) == 1 and [g for _, g in seen] == [True, False] and seen[0][0] is seen[1][0]
    rows = idx.numel()
    bm, _ = gw.tile_shape(rows, 4)
    expect, _ = tt.launch_tile_table(build_routing(idx, 4).expert_offsets, rows, bm)
    assert torch.equal(seen[0][0], expect)


@pytest.mark.parametrize("ws", ["0", "1"])
def test_gluon_launch_fits_the_compiled_kernel_cache(monkeypatch, ws):
    """The Gluon GEMM launches through launch.py's compiled-kernel cache (Triton's own launch path re-keys its
    ~35 arguments per call, NOTES v34): every constexpr by keyword, every parameter given (later launches list
    them from the keywords), as launch's own check demands (the block-barrier and the warp-specialised kernel).
    Checked here without running the kernel (no interpreter path); the GPU tests run it."""
    from nf4moe.kernels import grouped_gemm_wgmma as gw
    from nf4moe.kernels import launch as L
    from nf4moe.kernels.operands import NF4Operand

    monkeypatch.setenv("NF4MOE_WGMMA_WS", ws)
    calls = []
    monkeypatch.setattr(gw, "launch", lambda kernel, grid, launcher, *a, **kw: calls.append(
        (kernel, grid, launcher)) or L._check_call(kernel, a, kw))
    m = make_layer(4, 128, 64, rank=8, seed=93)
    g = m.gate_up_nf4
    op = NF4Operand(g.packed, g.absmax, g.absmax2, g.code2, g.offset, g.blocksize, g.blocksize2)
    p = 12
    x = torch.randn(6, 128, device=DEV, dtype=torch.bfloat16)
    out = torch.empty(p, 64, device=DEV, dtype=torch.bfloat16)
    xa = torch.zeros(1, p, 16, device=DEV)
    ids = torch.arange(p, device=DEV, dtype=torch.int32)
    table = torch.zeros(3, 3, device=DEV, dtype=torch.int32)
    gw.launch_nf4_moe_gemm_wgmma(x, op, m.lora_B["gate_up_proj"].detach(), m.scaling, xa, ids, table, None, out,
                                 n=64, top_k=2, gated=True, act_code=0, r=8, r_pad=16, block_m=128, tile_n=256)
    kernel = gw.nf4_moe_gemm_ws_kernel if ws == "1" else gw.nf4_moe_gemm_wgmma_kernel
    assert calls == [(kernel, (1, 3), None)]


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
    """NF4MOE_XA_IN_ROUTING=1 (the default): the decode path's layer output against the fp32 reference and the
    path with two lora_xa launches (=0); the up projection's lora_xa launch gone (only the down's left), the
    routing launch computing it."""
    import nf4moe.kernels.grouped_gemv as gv
    from nf4moe.moe_layers import triton_backend as tb

    monkeypatch.delenv("NF4MOE_GEMV_ROWS", raising=False)
    m = make_layer(4, 128, 64, rank=8, seed=81)
    x = torch.randn(t, 128, device=DEV, dtype=dtype)
    idx, w = routing(t, 4, 2, seed=82, mode="sentinels")
    w = w.to(dtype)
    with torch.no_grad():
        monkeypatch.setattr(tb, "_XA_IN_ROUTING", False)
        two_xa_calls = count_calls(monkeypatch, gv, "launch_lora_xa")
        default = m(x, idx, w)
        assert len(two_xa_calls) == 2
        monkeypatch.setattr(tb, "_XA_IN_ROUTING", True)
        xa_calls = count_calls(monkeypatch, gv, "launch_lora_xa")
        fused_calls = count_calls(monkeypatch, tb, "build_routing_xa")
        out = m(x, idx, w)
    assert len(fused_calls) == 1 and len(xa_calls) == 1  # the down projection's X·Aᵀ only
    assert torch.isfinite(out).all()
    assert rel_err(out, reference(m, x, idx, w)) < BOUND[dtype]
    assert rel_err(out, default.float()) < BOUND[dtype]


@pytest.mark.parametrize("t", [1, 3])
def test_gemv_xa_early_changes_no_bit(monkeypatch, nan_new_empty, t):
    """NF4MOE_GEMV_XA_EARLY=1: the decode GEMVs sum their X·Aᵀ partials (the up projection's from the routing
    launch, by pair id; the down's from lora_xa, by sorted row) right after the first chunks' loads, all at
    once: the layer's output is the same bits as with the epilogue's sum, and matches the reference."""
    import nf4moe.kernels.grouped_gemv as gv

    monkeypatch.delenv("NF4MOE_GEMV_ROWS", raising=False)
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
        monkeypatch.setenv("NF4MOE_GEMV_XA_EARLY", "0")
        late = m(x, idx, w)
        n_late = len(kinds)  # the shape's first call also tunes the plain down GEMV: one launch more than later calls
        monkeypatch.setenv("NF4MOE_GEMV_XA_EARLY", "1")
        early = m(x, idx, w)
    assert set(kinds[:n_late]) == {False} and set(kinds[n_late:]) == {True}, kinds
    assert torch.equal(early, late)
    assert rel_err(early, reference(m, x, idx, w)) < BOUND[torch.bfloat16]


def test_gemv_xa_early_refuses_more_partials_than_it_unrolls(monkeypatch):
    """XA_EARLY unrolls XA_MAX partial loads: a launch handing more is refused, naming the count, not summed short."""
    from nf4moe.kernels.grouped_gemv import XA_MAX, launch_nf4_moe_gemv
    from nf4moe.kernels.operands import NF4Operand
    from nf4moe.kernels.routing import build_routing

    monkeypatch.setenv("NF4MOE_GEMV_XA_EARLY", "1")
    e, k, t = 4, 2, 1
    m = make_layer(e, 128, 64, rank=8, seed=85)
    gu = m.gate_up_nf4
    op = NF4Operand(gu.packed, gu.absmax, gu.absmax2, gu.code2, gu.offset, gu.blocksize, gu.blocksize2)
    idx = torch.tensor([[0, 3]], device=DEV)
    r = build_routing(idx, e)
    x = torch.randn(t, 128, device=DEV, dtype=torch.bfloat16)
    xa = torch.zeros(XA_MAX.value + 1, t * k, 16, device=DEV)
    out = torch.empty(t * k, 64, device=DEV, dtype=torch.bfloat16)
    la, lb = m.lora_A["gate_up_proj"].detach(), m.lora_B["gate_up_proj"].detach()
    with pytest.raises(ValueError, match=f"{XA_MAX.value + 1} X·Aᵀ partials"):
        launch_nf4_moe_gemv(x, op, la, lb, m.scaling, r.sorted_pair_ids, r.expert_offsets, None, out, n=64,
                            top_k=k, gated=True, act="silu", xa_pairs=xa)


def test_traced_fused_combine_takes_fresh_counters(monkeypatch):
    """A traced launch (wrap_triton's launcher, under torch.compile) of the down GEMV's fused combine takes a fresh
    zeroed counter buffer, never the cached one: a cached buffer made during one trace holds that trace's fake
    tensor, and Inductor's lowering, under another fake mode, refused it ("Mixing fake modes", H100, session
    21).  The launch's output is the unfused path's (the launcher here runs the kernel directly)."""
    from nf4moe.kernels import grouped_gemm as gg
    from nf4moe.kernels.grouped_gemv import launch_nf4_moe_gemv
    from nf4moe.kernels.operands import NF4Operand
    from nf4moe.kernels.routing import build_routing

    e, k, t, h, n = 4, 2, 3, 64, 128
    m = make_layer(e, n, h, rank=0, seed=86)
    dn = m.down_nf4
    op = NF4Operand(dn.packed, dn.absmax, dn.absmax2, dn.code2, dn.offset, dn.blocksize, dn.blocksize2)
    idx, w = routing(t, e, k, seed=87)
    r = build_routing(idx, e)
    x = torch.randn(t * k, h, device=DEV)
    seen = []
    real = gg.split_k_counters

    def spy(device, size, traced=False):
        buf = real(device, size, traced)
        seen.append((traced, buf))
        return buf

    monkeypatch.setattr(gg, "split_k_counters", spy)
    outs = []
    for launcher in (lambda kernel: kernel, None):
        cached = dict(gg._COUNTERS)
        out = torch.full((t * k, n), float("nan"), device=DEV)
        comb = torch.full((t, n), float("nan"), device=DEV)
        fused = launch_nf4_moe_gemv(x, op, None, None, 1.0, r.sorted_pair_ids, r.expert_offsets, w.reshape(-1),
                                    out, n=n, top_k=k, gated=False, act="silu", combine=(comb, idx.contiguous()),
                                    launcher=launcher)
        assert fused
        outs.append(comb)
        if launcher is not None:  # a fresh buffer, neither cached nor taken from the cache
            assert len(seen) == 1 and seen[0][0] is True and gg._COUNTERS == cached
            assert all(seen[0][1] is not buf for buf in cached.values())
    assert [traced for traced, _ in seen[1:]] == [False]
    assert torch.equal(outs[0], outs[1]) and torch.isfinite(outs[0]).all()
    with torch._subclasses.fake_tensor.FakeTensorMode():
        before = dict(gg._COUNTERS)
        fresh = real(torch.device(DEV), 64, traced=True)
        assert fresh.shape == (64,) and gg._COUNTERS == before


def test_xa_in_routing_off_when_a_gradient_is_needed_or_without_lora(monkeypatch):
    from nf4moe.moe_layers import triton_backend as tb

    monkeypatch.setattr(tb, "_XA_IN_ROUTING", True)
    calls = count_calls(monkeypatch, tb, "build_routing_xa")
    x = torch.randn(2, 128, device=DEV)
    idx, w = routing(2, 4, 2, seed=83)
    with torch.no_grad():
        make_layer(4, 128, 64, rank=0, seed=84)(x, idx, w)
    m = make_layer(4, 128, 64, rank=8, seed=85)
    m(x.requires_grad_(), idx, w).sum().backward()
    assert calls == []


def test_xa_in_routing_rejects_negative_ids(monkeypatch):
    from nf4moe.moe_layers import triton_backend as tb

    if DEV != "cpu":
        pytest.skip("on a GPU the routing kernel traps (test_negative_ids_raise covers the device assert)")
    monkeypatch.setattr(tb, "_XA_IN_ROUTING", True)
    m = make_layer(4, 128, 64, rank=8, seed=86)
    with torch.no_grad(), pytest.raises(ValueError, match="top_k_index has negative expert ids"):
        m(torch.randn(2, 128), torch.tensor([[0, -1], [2, 1]]), torch.rand(2, 2))


def test_xa_in_routing_leaves_other_index_dtypes_to_the_plain_routing(monkeypatch):
    """int16 ids (accepted by the layer, sorted by torch): the fold is not taken, the result is the default path's."""
    from nf4moe.moe_layers import triton_backend as tb

    m = make_layer(4, 128, 64, rank=8, seed=87)
    x = torch.randn(2, 128, device=DEV)
    idx, w = routing(2, 4, 2, seed=88)
    with torch.no_grad():
        monkeypatch.setattr(tb, "_XA_IN_ROUTING", False)
        default = m(x, idx.to(torch.int16), w)
        monkeypatch.setattr(tb, "_XA_IN_ROUTING", True)
        calls = count_calls(monkeypatch, tb, "build_routing_xa")
        out = m(x, idx.to(torch.int16), w)
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
