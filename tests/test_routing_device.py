"""The device routing (kernels.ops.route under the launch plan's routing choice, no host sync) against the
reference routing, on arbitrary id tensors including sentinels and negative ids; and its three paths (the
one-launch Triton kernel up to TRITON_MAX_PAIRS pairs, the chunked counting sort up to CHUNKED_MAX_PAIRS,
torch's stable sort + searchsorted above) against each other, bit for bit.  ``build_routing`` (triton_cases)
is the layer's routing alone: make_plan's choice of the routing form, then ops.route."""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nf4moe.kernels import ops
from nf4moe.kernels import routing as R
from nf4moe.reference import route
from nf4moe.reference.routing import Routing
from triton_cases import assert_negative_ids_trap, build_routing, count_calls, routing_plan


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(0, 40), k=st.integers(1, 6), e=st.integers(1, 12),
    dtype=st.sampled_from([torch.int64, torch.int32]), seed=st.integers(0, 2**31 - 1),
)
def test_build_routing_matches_reference(t, k, e, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, e + 3, (t, k), generator=g)  # ids >= E are sentinels
    idx[torch.rand(t, k, generator=g) < 0.05] = 2**40 if dtype == torch.int64 else 2**30  # huge sentinels
    idx = idx.to(dtype)
    got = build_routing(idx, e)
    ref = route(idx, e)
    assert got.sorted_pair_ids.dtype == torch.int32 and got.expert_offsets.dtype == torch.int32
    assert torch.equal(got.expert_offsets, ref.expert_offsets)
    n = int(ref.expert_offsets[-1])
    assert torch.equal(got.sorted_pair_ids[:n], ref.sorted_pair_ids[:n])  # stable: token order kept per expert
    assert got.top_k == k and got.num_experts == e


def test_negative_ids_are_counted_before_expert_zero():
    idx = torch.tensor([[0, -1], [2, 1], [-5, 0]])
    r = build_routing(idx, 3)
    assert int(r.expert_offsets[0]) == 2  # what the layer's check reads to reject them
    assert r.counts.tolist() == [2, 1, 1]


# --------------------------------------------------------------------------- the one-launch Triton path
# Under TRITON_INTERPRET=1 (or on a GPU) the plan takes the single-program kernel for P <= the module
# threshold (routing.triton_fits); forced each way by monkeypatching it, both paths must agree bit for bit.

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_TRITON = os.environ.get("TRITON_INTERPRET") == "1" or DEV == "cuda"
needs_triton = pytest.mark.skipif(not _TRITON, reason="needs a GPU or TRITON_INTERPRET=1")


def _ids(t, k, e, dtype, mode, seed):
    """Fresh (T, K) ids; ``mixed`` has negatives, sentinels == E and huge sentinels next to real ids."""
    g = torch.Generator().manual_seed(seed)
    if mode == "mixed":
        idx = torch.randint(-2, e + 2, (t, k), generator=g)
        idx[torch.rand(t, k, generator=g) < 0.1] = 2**40 if dtype == torch.int64 else 2**31 - 1
        idx[torch.rand(t, k, generator=g) < 0.05] = -(2**40) if dtype == torch.int64 else -(2**31)
    elif mode == "valid":
        idx = torch.randint(0, e, (t, k), generator=g)
    elif mode == "one_expert":
        idx = torch.full((t, k), e - 1)
    elif mode == "all_sentinels":
        idx = torch.full((t, k), e)
    return idx.to(dtype).to(DEV)


def _torch_path(idx, e, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(R, "TRITON_MAX_PAIRS", 0)
        m.setattr(R, "CHUNKED_MAX_PAIRS", 0)
        assert routing_plan(idx, e).routing == "torch"
        return build_routing(idx, e)


def _triton_path(idx, e, monkeypatch):
    def no_torch(*a):
        raise AssertionError("took the torch path")

    with monkeypatch.context() as m:
        m.setattr(ops, "torch_routing", no_torch)  # ops.route's torch sort
        assert routing_plan(idx, e).routing == "kernel"
        return build_routing(idx, e)


def route_like_torch(idx, e):
    pairs, offsets = R.torch_routing(idx, e)
    return Routing(sorted_pair_ids=pairs, expert_offsets=offsets, num_experts=e, top_k=idx.shape[1])


def _assert_same(a, b):
    assert a.sorted_pair_ids.dtype == b.sorted_pair_ids.dtype == torch.int32
    assert a.expert_offsets.dtype == b.expert_offsets.dtype == torch.int32
    assert torch.equal(a.sorted_pair_ids, b.sorted_pair_ids)  # every entry, dropped pairs included
    assert torch.equal(a.expert_offsets, b.expert_offsets)
    assert (a.num_experts, a.top_k) == (b.num_experts, b.top_k)


TRITON_CASES = [
    # (T, K, E, mode)
    (1, 1, 4, "mixed"),           # P = 1
    (1, 8, 256, "valid"),         # decode step, E = 256
    (7, 3, 5, "mixed"),           # P = 21 (not a power of two), E not a power of two
    (33, 4, 4, "mixed"),          # K == E
    (20, 2, 6, "one_expert"),     # every pair to the last expert
    (9, 2, 3, "all_sentinels"),   # every pair dropped
    (1, 2, 1, "mixed"),           # E = 1
    (64, 2, 2, "valid"),          # P = 128 = the smallest sorted width exactly
    (65, 2, 7, "mixed"),          # P = 130: the next width
    (120, 8, 256, "mixed"),       # P = 960, near the threshold (1024)
    (97, 6, 512, "valid"),        # E = 512
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("t,k,e,mode", TRITON_CASES)
def test_triton_path_matches_torch_path(t, k, e, mode, dtype, monkeypatch):
    idx = _ids(t, k, e, dtype, mode, seed=t * 31 + k * 7 + e)
    _assert_same(_triton_path(idx, e, monkeypatch), _torch_path(idx, e, monkeypatch))


@needs_triton
def test_triton_path_at_the_threshold(monkeypatch):
    """P == TRITON_MAX_PAIRS (the largest sort one program does) takes the one-program kernel; P + 1 the
    chunked counting sort (two launches), with the same results as torch."""
    t, k, e = R.TRITON_MAX_PAIRS // 8, 8, 384
    idx = _ids(t, k, e, torch.int64, "mixed", seed=5)
    _assert_same(_triton_path(idx, e, monkeypatch), _torch_path(idx, e, monkeypatch))
    over = _ids(t + 1, k, e, torch.int64, "mixed", seed=6)
    assert R.triton_fits(over.numel(), e)
    launched = _count_launches(monkeypatch)
    _assert_same(build_routing(over, e), route_like_torch(over, e))
    assert launched == ["routing_count_kernel", "routing_scatter_kernel"]


def _count_launches(monkeypatch) -> list:
    """Names of the routing kernels launched from now on (R.launch is the one launch path)."""
    names = []
    real = R.launch
    monkeypatch.setattr(R, "launch", lambda kernel, *a, **kw: names.append(kernel.__name__) or real(kernel, *a, **kw))
    return names


# Chunked path with small chunks, so several chunks (and the prefix over earlier chunks, read in blocks of
# CB chunks) are exercised at interpreter-friendly sizes: (T, K, E, mode, chunk).
CHUNKED_CASES = [
    (20, 3, 5, "mixed", 16),          # 4 chunks, the last one partial (padding)
    (64, 2, 7, "mixed", 32),          # 4 full chunks
    (33, 4, 4, "one_expert", 16),     # every pair to one expert: ranks run across chunks
    (40, 2, 6, "all_sentinels", 16),  # every pair dropped
    (150, 4, 3, "mixed", 16),         # 38 chunks
    (90, 8, 256, "valid", 64),        # E = 256 (512 bins)
    (150, 4, 254, "mixed", 4),        # 150 chunks of 256 bins: the prefix read runs 5 blocks of CB = 32 chunks
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("t,k,e,mode,chunk", CHUNKED_CASES)
def test_chunked_path_matches_torch_path(t, k, e, mode, chunk, dtype, monkeypatch):
    monkeypatch.setattr(R, "TRITON_MAX_PAIRS", 8)
    monkeypatch.setattr(R, "CHUNK", chunk)
    idx = _ids(t, k, e, dtype, mode, seed=t * 13 + k + e)
    chunks, bins = -(-t * k // chunk), R.pow2(e + 2)
    if (t, k, e) == (150, 4, 254):  # the case meant to run the scatter kernel's prefix loop more than once
        assert chunks > 8192 // bins
    launched = _count_launches(monkeypatch)
    _assert_same(_triton_path(idx, e, monkeypatch), _torch_path(idx, e, monkeypatch))
    assert launched == ["routing_count_kernel", "routing_scatter_kernel"]


@needs_triton
def test_chunked_path_at_its_size_limit(monkeypatch):
    """CHUNKED_MAX_PAIRS pairs take the chunked kernels, one more the torch path; same results."""
    monkeypatch.setattr(R, "TRITON_MAX_PAIRS", 8)
    monkeypatch.setattr(R, "CHUNK", 16)
    monkeypatch.setattr(R, "CHUNKED_MAX_PAIRS", 96)
    idx = _ids(48, 2, 9, torch.int32, "mixed", seed=1)
    launched = _count_launches(monkeypatch)
    _assert_same(build_routing(idx, 9), route_like_torch(idx, 9))
    assert len(launched) == 2
    over = _ids(97, 1, 9, torch.int32, "mixed", seed=2)
    assert not R.triton_fits(97, 9)
    _assert_same(build_routing(over, 9), route_like_torch(over, 9))
    assert len(launched) == 2


@needs_triton
def test_chunked_path_at_full_chunk_size(monkeypatch):
    """The shipped CHUNK (1024) over two chunks, as a prefill call of 129 tokens x top-8 runs it."""
    idx = _ids(129, 8, 128, torch.int64, "mixed", seed=9)
    launched = _count_launches(monkeypatch)
    _assert_same(build_routing(idx, 128), route_like_torch(idx, 128))
    assert launched == ["routing_count_kernel", "routing_scatter_kernel"]


@needs_triton
@pytest.mark.parametrize("p", [48, 49])
def test_lowered_threshold_dispatch(p, monkeypatch):
    """With both thresholds moved to 48: P = 48 runs a kernel, P = 49 the torch path, same results."""
    monkeypatch.setattr(R, "TRITON_MAX_PAIRS", 48)
    monkeypatch.setattr(R, "CHUNKED_MAX_PAIRS", 48)
    idx = _ids(p, 1, 10, torch.int32, "mixed", seed=p)
    calls = count_calls(monkeypatch, ops, "launch_routing")  # the routing op's body calls this name
    _assert_same(build_routing(idx, 10), route_like_torch(idx, 10))
    assert len(calls) == (1 if p <= 48 else 0)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("path", ["one_program", "chunked"])
def test_launcher_writes_every_output_element(dtype, path, monkeypatch):
    """Outputs poisoned before the launch: an element the kernel forgets shows up as the poison value."""
    if path == "chunked":
        monkeypatch.setattr(R, "TRITON_MAX_PAIRS", 8)
        monkeypatch.setattr(R, "CHUNK", 16)
    t, k, e = 37, 3, 11
    idx = _ids(t, k, e, dtype, "mixed", seed=77)
    pairs = torch.full((t * k,), -7777, dtype=torch.int32, device=DEV)
    offsets = torch.full((e + 1,), -7777, dtype=torch.int32, device=DEV)
    got = R.launch_routing(idx, e, pairs, offsets)
    assert got[0] is pairs and got[1] is offsets
    ref_pairs, ref_offsets = R.torch_routing(idx, e)
    assert torch.equal(pairs, ref_pairs) and torch.equal(offsets, ref_offsets)


@needs_triton
def test_non_contiguous_ids():
    idx = _ids(12, 6, 9, torch.int64, "mixed", seed=3)[:, ::2]
    _assert_same(build_routing(idx, 9), route_like_torch(idx, 9))


def test_triton_fits_keeps_int32_keys_from_overflowing():
    # Largest key (E + 2) * P_POW2 - 1 must stay <= 2**31 - 1.
    assert R.triton_fits(R.TRITON_MAX_PAIRS, 2**31 // R.TRITON_MAX_PAIRS - 2)
    assert not R.triton_fits(R.TRITON_MAX_PAIRS, 2**31 // R.TRITON_MAX_PAIRS - 1)
    assert not R.triton_fits(0, 4)
    # the chunked sort: up to CHUNKED_MAX_PAIRS, its histogram bins in registers
    assert R.triton_fits(R.TRITON_MAX_PAIRS + 1, 4) and R.triton_fits(R.CHUNKED_MAX_PAIRS, 254)
    assert not R.triton_fits(R.CHUNKED_MAX_PAIRS + 1, 4) and not R.triton_fits(R.TRITON_MAX_PAIRS + 1, 4095)
    # many experts lower the chunked sort's pair limit (every program reads all chunks' histograms)
    assert R.triton_fits(64 * R.CHUNK, 4094) and not R.triton_fits(65 * R.CHUNK, 4094)


def test_launcher_rejects_what_it_cannot_take():
    with pytest.raises(TypeError, match="int32 or int64"):
        R.launch_routing(torch.zeros(2, 2, dtype=torch.int16), 4)
    with pytest.raises(ValueError, match="pairs"):
        R.launch_routing(torch.zeros(R.CHUNKED_MAX_PAIRS + 1, 1, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="check=True needs a CUDA top_k_index"):
        R.launch_routing(torch.zeros(2, 2, dtype=torch.int64), 4, check=True)


# --------------------------------------------------------------------------- rejecting negative ids
# check_ids=True: a GPU's direct launch checks inside the routing kernel (a device-side assert, no extra launch);
# every other path checks the offsets after the sort (CPU: ValueError now).

def _force_path(monkeypatch, path):
    if path == "chunked":
        monkeypatch.setattr(R, "TRITON_MAX_PAIRS", 8)
        monkeypatch.setattr(R, "CHUNK", 16)
    elif path == "torch":
        monkeypatch.setattr(R, "TRITON_MAX_PAIRS", 0)
        monkeypatch.setattr(R, "CHUNKED_MAX_PAIRS", 0)


@pytest.mark.parametrize("path", ["one_program", "chunked", "torch"])
def test_check_ids_passes_valid_ids_unchanged(path, monkeypatch):
    if path != "torch" and not _TRITON:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    _force_path(monkeypatch, path)
    idx = _ids(40, 4, 9, torch.int64, "valid", seed=21)
    idx[3, 1], idx[30, 0] = 9, 2**40  # sentinels pass
    _assert_same(build_routing(idx, 9, check_ids=True), build_routing(idx, 9))


@pytest.mark.parametrize("path", ["one_program", "chunked", "torch"])
def test_check_ids_rejects_negative_ids_on_the_cpu(path, monkeypatch):
    if path != "torch" and not _TRITON:
        pytest.skip("needs TRITON_INTERPRET=1")
    _force_path(monkeypatch, path)
    idx = _ids(40, 4, 9, torch.int64, "valid", seed=22).cpu()
    idx[17, 2] = -3
    with pytest.raises(ValueError, match="top_k_index has negative expert ids"):
        build_routing(idx, 9, check_ids=True)
    assert int(build_routing(idx, 9).expert_offsets[0]) == 1  # unchecked: counted before expert 0, dropped


def test_check_ids_checks_in_the_kernel_only_on_a_gpu(monkeypatch):
    """On a GPU the layer's eager routing checks in the kernel (the plan's check_ids_in_kernel):
    check_routing_ids (two launches) is not called; elsewhere it is."""
    calls = count_calls(monkeypatch, ops, "check_routing_ids")
    idx = _ids(6, 2, 5, torch.int64, "valid", seed=23)
    assert routing_plan(idx, 5).check_ids_in_kernel == (DEV == "cuda")
    build_routing(idx, 5, check_ids=True)
    assert len(calls) == (0 if DEV == "cuda" else 1)


_DEVICE_ASSERT = """
import sys, torch
from nf4moe.kernels import routing as R
from triton_cases import build_routing
p = int(sys.argv[1])
idx = torch.randint(0, 8, (p // 4, 4), device="cuda")
idx[p // 8, 1] = -1
if p > R.TRITON_MAX_PAIRS:
    assert R.triton_fits(p, 8)
"""


@pytest.mark.skipif(DEV != "cuda", reason="the device-side assert needs a GPU")
@pytest.mark.parametrize("pairs", [32, 4096])
def test_check_ids_device_assert_fires_on_the_gpu(pairs):
    """A negative id traps the one-program and the chunked kernel (a child process: a device assert leaves
    the CUDA context unusable; the chunked path's second launch already sees the first one's trap)."""
    assert_negative_ids_trap(_DEVICE_ASSERT, "build_routing(idx, 8, check_ids=True)", str(pairs))


@needs_triton
@pytest.mark.parametrize("args", [(), (False, False)])
def test_opcheck_routing_op(args):
    idx = _ids(10, 4, 6, torch.int64, "mixed", seed=8)
    torch.library.opcheck(ops.routing, (idx, 6, *args), test_utils=("test_schema", "test_faketensor"))


@needs_triton
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("path", ["one_program", "chunked"])
def test_torch_compile_fullgraph_goes_through_the_op(dynamic, path, monkeypatch):
    """Traced by dynamo (as inside triton_forward, the plan built in the trace), the routing must reach the
    kernels through the registered op nf4moe::routing, in one graph, with the eager results (the chunked path:
    small chunks)."""
    if path == "chunked":
        monkeypatch.setattr(R, "TRITON_MAX_PAIRS", 4)
        monkeypatch.setattr(R, "CHUNK", 16)
    torch._dynamo.reset()  # one code object across the parametrization: start each case with no cached guards
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward if DEV == "cpu" else torch._inductor.compile(gm, example_inputs)

    def f(idx):
        r = build_routing(idx, 7)
        return r.sorted_pair_ids, r.expert_offsets

    compiled = torch.compile(f, fullgraph=True, backend=backend, dynamic=dynamic)
    for t in (3, 11, 26):
        idx = _ids(t, 2, 7, torch.int64, "mixed", seed=t)
        pairs, offsets = compiled(idx)
        ref = route_like_torch(idx, 7)
        assert torch.equal(pairs, ref.sorted_pair_ids) and torch.equal(offsets, ref.expert_offsets)
    assert graphs and all("nf4moe.routing" in g.code for g in graphs)
    assert all("torch.sort" not in g.code for g in graphs)


@needs_triton
def test_fake_tensors_take_the_op_path():
    """Under FakeTensorMode (memory planning, tracing) the routing must not launch the kernel on fake
    storage: it goes through the registered op and its meta function (the plan sees a traced call)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        idx = mode.from_tensor(_ids(5, 2, 4, torch.int64, "valid", seed=7))
        plan = routing_plan(idx, 4)
        assert plan.routing == "kernel" and not plan.check_ids_in_kernel and not plan.pdl
        rt = build_routing(idx, 4)
    assert rt.sorted_pair_ids.shape == (10,) and rt.expert_offsets.shape == (5,)
    assert rt.sorted_pair_ids.dtype == rt.expert_offsets.dtype == torch.int32


@needs_triton
@pytest.mark.parametrize("small", [0, 128])
@pytest.mark.parametrize("seed", [0, 1])
def test_tile_table_covers_every_row_once(small, seed, monkeypatch):
    """The Gluon GEMM's row-tile tables (tile_table.py): every sorted row in exactly one tile of its own
    expert; 256-row tiles, and with ``small`` the remainders of at most 128 rows in 128-row tiles of their own.
    The table is poisoned with (0, 0, 0) entries (expert 0, a tile at row 0) before the kernel fills it."""
    from nf4moe.kernels import tile_table as tt

    real_empty = torch.empty
    monkeypatch.setattr(tt.torch, "empty", lambda *a, **kw: real_empty(*a, **kw).fill_(0))
    launch_tile_table = tt.launch_tile_table

    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([0, 100, 128, 129, 256, 300, 384, 385, 512, 1, 255, 257])
    counts = counts[torch.randperm(counts.numel(), generator=g)]
    eoff = torch.zeros(counts.numel() + 1, dtype=torch.int32)
    eoff[1:] = counts.cumsum(0)
    rows, e_count = int(eoff[-1]), counts.numel()
    main, rest = launch_tile_table(eoff.to(DEV), rows, 256, small=small)
    owner = torch.full((rows,), -1)
    for table, bm in ((main, 256), (rest, 128)):
        if table is None:
            continue
        for e, lo, hi in table.cpu().tolist():
            if e >= e_count:
                continue
            assert eoff[e] <= lo < eoff[e + 1] and hi == eoff[e + 1]
            seg = slice(lo, min(lo + bm, hi))
            assert (owner[seg] == -1).all(), "a row in two tiles"
            owner[seg] = e
            if table is rest:
                assert hi - lo <= small
    assert (owner == torch.repeat_interleave(torch.arange(e_count), counts)).all(), "a row in no tile"
    if small:
        assert (rest[:, 0] < e_count).sum().item() == int(((counts % 256 > 0) & (counts % 256 <= small)).sum())
    else:
        assert rest is None
