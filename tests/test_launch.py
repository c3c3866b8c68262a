"""launch.launch's compiled-kernel cache, with a stand-in kernel (the CPU has no compiled Triton kernels).

The first launch of a specialisation goes through ``kernel[grid]`` (Triton compiles and returns the
kernel); later launches with the same specialisation call the compiled kernel with every parameter in
signature order; any change Triton specialises on (dtype, 16-byte alignment, an int equal to 1 or a
multiple of 16 or beyond int32, a constexpr, an option) goes through Triton again.  The GPU suite runs the
real path (every eager layer call uses it).
"""
from __future__ import annotations

import os

import pytest
import torch

from nf4moe.kernels import launch as L


class FakeCompiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("compiled", grid, args))


class _Param:
    def __init__(self, name):
        self.name, self.is_constexpr = name, name.isupper()


class FakeKernel:
    arg_names = ["x_ptr", "n", "scale", "BLOCK"]
    params = [_Param(n) for n in arg_names]
    __name__ = "fake_kernel"

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append(("triton", grid, args, kwargs))
            return FakeCompiled(self.log)

        return run


@pytest.fixture
def direct(monkeypatch):
    monkeypatch.setattr(L, "_INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(L, "_COMPILED", {})
    monkeypatch.setattr(L, "_FLAGS", {})


def test_second_launch_calls_the_compiled_kernel_with_every_parameter(direct):
    k = FakeKernel()
    x = torch.zeros(64)
    grid = lambda meta: (3, meta["BLOCK"])  # noqa: E731
    L.launch(k, grid, None, x, 7, 0.5, BLOCK=32, num_warps=4)
    L.launch(k, grid, None, x, 7, 0.5, BLOCK=32, num_warps=4)
    assert [e[0] for e in k.log] == ["triton", "compiled"]
    assert k.log[1][1] == (3, 32, 1)  # the grid function sees the keyword arguments; padded to 3 dims
    assert k.log[1][2] == (x, 7, 0.5, 32)  # options (num_warps) are not parameters


@pytest.mark.parametrize("change", ["dtype", "misaligned", "int_one", "int_div16", "int64", "uint64", "constexpr",
                                    "option"])
def test_every_specialisation_change_goes_through_triton(direct, change):
    k = FakeKernel()
    base = torch.zeros(64)
    args, kw = [base, 7, 0.5], dict(BLOCK=32, num_warps=4)
    L.launch(k, (1,), None, *args, **kw)
    if change == "dtype":
        args[0] = torch.zeros(64, dtype=torch.float16)
    elif change == "misaligned":
        args[0] = torch.zeros(65)[1:]  # 4-byte offset: not a multiple of 16
    elif change == "int_one":
        args[1] = 1
    elif change == "int_div16":
        args[1] = 32
    elif change == "int64":
        args[1] = 1 << 33
    elif change == "uint64":  # Triton: u64, not i64
        args[1], base_big = (1 << 63) + 7, (1 << 33) + 7
        L.launch(k, (1,), None, base, base_big, 0.5, **kw)  # an i64 key first
        k.log.pop()
    elif change == "constexpr":
        kw["BLOCK"] = 64
    else:
        kw["num_warps"] = 8
    L.launch(k, (1,), None, *args, **kw)
    assert [e[0] for e in k.log] == ["triton", "triton"]
    L.launch(k, (1,), None, *args, **kw)  # and that new specialisation is cached in turn
    assert k.log[-1][0] == "compiled"


def test_same_specialisation_other_values_reuse_the_kernel(direct):
    k = FakeKernel()
    L.launch(k, (1,), None, torch.zeros(64), 7, 0.5, BLOCK=32)
    L.launch(k, (1,), None, torch.ones(128), 9, 2.0, BLOCK=32)  # aligned, n not 1 nor a multiple of 16
    assert [e[0] for e in k.log] == ["triton", "compiled"]


def test_traced_and_interpreted_launches_bypass_the_cache(monkeypatch):
    k = FakeKernel()
    wrapped = []
    L.launch(k, (1,), lambda kern: wrapped.append(kern) or kern, torch.zeros(4), 7, 0.5, BLOCK=32)
    assert wrapped == [k] and k.log[0][0] == "triton"
    monkeypatch.setattr(L, "_INTERPRET", True)
    monkeypatch.setattr(L, "_COMPILED", {})
    L.launch(k, (1,), None, torch.zeros(4), 7, 0.5, BLOCK=32)
    assert L._COMPILED == {}


def test_unknown_argument_type_is_refused(direct):
    with pytest.raises(TypeError, match="no specialisation rule"):
        L.launch(FakeKernel(), (1,), None, torch.zeros(4), "seven", 0.5, BLOCK=32)


def test_host_integer_helpers_match_triton():
    import triton

    from nf4moe.kernels.configs import cdiv, pow2

    for n in list(range(70)) + [1023, 1024, 1025, (1 << 20) + 1]:
        assert pow2(n) == triton.next_power_of_2(n)
        for b in (1, 3, 16, 64):
            assert cdiv(n, b) == triton.cdiv(n, b)


def test_calls_the_key_cannot_tell_apart_are_refused(direct):
    """Checked on the first launch of a key: a constexpr passed positionally (it would be keyed as a runtime
    value), a tensor keyword, a missing parameter, and a flag passed as bool here and int elsewhere."""
    x = torch.zeros(4)
    with pytest.raises(TypeError, match="constexpr 'BLOCK'.*positionally"):
        L.launch(FakeKernel(), (1,), None, x, 7, 0.5, 32)
    with pytest.raises(TypeError, match="keyword argument 'BLOCK' is a Tensor"):
        L.launch(FakeKernel(), (1,), None, x, 7, 0.5, BLOCK=torch.ones(1))
    with pytest.raises(TypeError, match=r"needs \['BLOCK'\]"):
        L.launch(FakeKernel(), (1,), None, x, 7, 0.5)
    k = FakeKernel()
    L.launch(k, (1,), None, x, 7, 0.5, BLOCK=True)
    with pytest.raises(TypeError, match="True and 1 share a key"):
        L.launch(k, (1,), None, x, 7, 0.5, BLOCK=2)


def test_key_is_as_fine_as_tritons_own_specialisation():
    """Over ints, bools, floats, None and tensors (dtypes, alignment, empty): wherever Triton's own
    specialisation of an argument differs, so does launch's key (so a cached kernel is never reused where
    Triton would compile another).  Uses this Triton's native specialiser (the GPU runs another version)."""
    libtriton = pytest.importorskip("triton._C.libtriton")
    native = getattr(libtriton, "native_specialize_impl", None)
    if native is None:
        pytest.skip("this Triton has no native_specialize_impl")
    from triton.backends.nvidia.compiler import CUDABackend

    base = torch.zeros(64, dtype=torch.float32)
    values = [0, 1, -1, 2, 15, 16, 17, -16, 32, (1 << 31) - 1, 1 << 31, -(1 << 31), -(1 << 31) - 1, (1 << 63) - 1,
              1 << 63, (1 << 64) - 1, True, False, 0.5, 1.0, None, base, base[1:], base[4:], base.half(),
              base.to(torch.bfloat16), torch.zeros(0), torch.zeros(8, dtype=torch.uint8)]
    theirs_by_ours: dict = {}
    for v in values:  # native(backend, value, is_const, specialize_value, align)
        theirs_by_ours.setdefault(L._spec([v]), set()).add(str(native(CUDABackend, v, False, True, True)))
    assert all(len(t) == 1 for t in theirs_by_ours.values()), theirs_by_ours


@pytest.mark.parametrize("k_dim,combine,bucket,tiles", [(7168, False, 8, "0"), (2048, True, 8, "0"), (768, False, 64, "0"),
                                                        (65536, False, 8, "0"), (7168, False, 8, "1"),
                                                        (2048, True, 8, "1")])
def test_gemv_candidates_fit_and_stay_short(monkeypatch, k_dim, combine, bucket, tiles):
    """The GEMV's tuned candidates (the GPU list, pruned): lanes inside one NF4 block, one row per program with
    the fused combine, at most MAX_CHUNKS unrolled K chunks (else only the widest chunks), and never the
    4-byte-lane fallback while another config fits (at K = 7168 it took minutes to compile)."""
    from nf4moe.kernels import grouped_gemv as gv

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU candidate list (nothing is compiled here)
    monkeypatch.delenv("NF4MOE_CONFIG", raising=False)
    monkeypatch.setenv("NF4MOE_GEMV_TILES", tiles)  # 1: also the opt-in configs of several N tiles per program
    configs = gv.gemv_configs()
    assert any(c.kwargs["TILES"] > 1 for c in configs) == (tiles == "1")
    kept = gv.prune_gemv(configs, {}, ROW_BUCKET=bucket, N=2048, BS=64, K_DIM=k_dim, COMBINE=combine)

    def chunks(c):
        return c.kwargs["TILES"] * -(-k_dim // (2 * c.kwargs["LANES"] * c.kwargs["STEPS"] * c.kwargs["VEC"]))

    assert kept and configs[-1] not in kept
    assert all(64 % (2 * c.kwargs["VEC"]) == 0 and c.kwargs["BLOCK_M"] <= (1 if combine else bucket) for c in kept)
    longest = max(chunks(c) for c in kept)
    if k_dim <= 16 * 1024:
        assert longest <= gv.MAX_CHUNKS
        assert any(c.kwargs["LANES"] == 8 for c in kept) == (k_dim <= 4096)  # 8 lanes: 256-column chunks
    else:
        assert longest == min(chunks(c) for c in configs[:-1])
    if combine:
        assert {c.kwargs["BLOCK_M"] for c in kept} == {1}


# --------------------------------------------------------------------------- PDL (NF4MOE_PDL, v46)

def fake_cuda_tensor():
    """What launch.use_pdl reads of a tensor, as a CUDA tensor on device 0 has it (the CPU has none)."""
    return type("CudaTensor", (), {"is_cuda": True, "device": torch.device("cuda", 0)})()


@pytest.mark.parametrize("case", ["on", "flag_off", "auto_eager", "auto_captured", "unset_captured", "interpreted",
                                  "traced", "cpu_tensor", "pre_hopper"])
def test_pdl_options_pair_the_wait_with_the_launch_option(monkeypatch, case):
    """A programmatic dependent launch (Triton's launch_pdl) always comes with the kernel's wait (the PDL
    constexpr), and only for direct launches on sm_90+: with NF4MOE_PDL=1, or by default (unset or auto) while a
    CUDA graph is being captured; never under the interpreter (no griddepcontrol there), never traced (Inductor
    launches the kernel; no launch option is passed), never for CPU tensors or older GPUs."""
    from nf4moe.kernels import configs

    monkeypatch.setattr(L, "_INTERPRET", case == "interpreted")
    monkeypatch.setattr(L, "_pdl_capable", lambda index: case != "pre_hopper")
    monkeypatch.setattr(configs, "capturing", lambda t: case.endswith("_captured"))
    if case == "unset_captured":
        monkeypatch.delenv("NF4MOE_PDL", raising=False)
    else:
        raw = {"flag_off": "0", "auto_eager": "auto", "auto_captured": "auto"}.get(case, "1")
        monkeypatch.setenv("NF4MOE_PDL", raw)
    t = torch.zeros(1) if case == "cpu_tensor" else fake_cuda_tensor()
    launcher = (lambda kernel: kernel) if case == "traced" else None
    opts = L.pdl_options(t, launcher)
    on = case in ("on", "auto_captured", "unset_captured")
    if case == "traced":
        assert opts == {"PDL": False}
    else:
        assert opts == {"PDL": on, "launch_pdl": on}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU suite's process state")
def test_pdl_is_off_in_this_process_unless_a_gpu_runs_it():
    """The CPU suite runs the interpreter: whatever NF4MOE_PDL says, no kernel is compiled with the wait."""
    assert L.pdl_options(torch.zeros(1), None) == {"PDL": False, "launch_pdl": False}


# --------------------------------------------------------------------------- graph_bench (NF4MOE_TUNE_GRAPH)

@pytest.mark.parametrize("raw,want", [("0", False), ("1", True), ("yes", None), (None, "default")])
@pytest.mark.parametrize("flag,default", [("NF4MOE_TUNE_GRAPH", True), ("NF4MOE_GEMV_TILES", False),
                                          ("NF4MOE_XA_IN_ROUTING", True)])
def test_env_flags(flag, default, raw, want, monkeypatch):
    """Each switch reads 0 / 1 (unset: its default) and rejects anything else, naming itself."""
    from nf4moe.kernels import configs, grouped_gemv
    from nf4moe.moe_layers import triton_backend

    read = {"NF4MOE_TUNE_GRAPH": configs.tune_in_graphs, "NF4MOE_GEMV_TILES": grouped_gemv.gemv_tiles,
            "NF4MOE_XA_IN_ROUTING": triton_backend.xa_in_routing}[flag]
    if raw is None:
        monkeypatch.delenv(flag, raising=False)
    else:
        monkeypatch.setenv(flag, raw)
    if want is None:
        with pytest.raises(ValueError, match=f"{flag} must be 0 or 1"):
            read()
    else:
        assert read() is (default if want == "default" else want)


@pytest.mark.parametrize("raw,eager,captured", [("0", False, False), ("1", True, True), ("auto", False, True),
                                                 (None, False, True), ("yes", None, None)])
@pytest.mark.parametrize("flag", ["NF4MOE_PDL", "NF4MOE_GEMV_XA_EARLY"])
def test_graph_flags(flag, raw, eager, captured, monkeypatch):
    """The switches measured faster in CUDA-graph replays only (configs.graph_flag): unset or auto, on while a
    graph is being captured and off for eager launches; 0 / 1 off / on for both; anything else is refused,
    naming the switch."""
    from nf4moe.kernels import configs, grouped_gemv

    monkeypatch.setattr(L, "_INTERPRET", False)  # use_pdl reads its flag past the interpreter test
    monkeypatch.setattr(L, "_pdl_capable", lambda index: True)
    cuda_tensor = fake_cuda_tensor()
    read = {"NF4MOE_PDL": lambda: L.use_pdl(cuda_tensor, None),
            "NF4MOE_GEMV_XA_EARLY": lambda: grouped_gemv.gemv_xa_early(cuda_tensor)}[flag]
    if raw is None:
        monkeypatch.delenv(flag, raising=False)
    else:
        monkeypatch.setenv(flag, raw)
    for is_captured, want in ((False, eager), (True, captured)):
        monkeypatch.setattr(configs, "capturing", lambda t: is_captured)
        if want is None:
            with pytest.raises(ValueError, match=f"{flag} must be 0, 1 or auto"):
                read()
        else:
            assert read() is want


def test_layer_call_reads_switches_and_capture_state_once(monkeypatch):
    """Inside configs.layer_call a switch and the capture state are read once (a layer call's launches all ask);
    a later call, and any read outside one, sees the environment as it is then; nested calls share the outer
    call's reads."""
    from nf4moe.kernels import configs

    queries = []
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: queries.append(1) or True)
    cuda_tensor = fake_cuda_tensor()
    monkeypatch.setenv("NF4MOE_PDL", "0")
    with configs.layer_call():
        assert configs.graph_flag("NF4MOE_PDL", cuda_tensor) is False
        monkeypatch.setenv("NF4MOE_PDL", "auto")  # not seen until the call ends
        assert configs.env("NF4MOE_PDL", "auto") == "0"
        with configs.layer_call():
            assert configs.graph_flag("NF4MOE_PDL", cuda_tensor) is False
        assert configs.env("NF4MOE_UNSET_SWITCH", "dflt") == "dflt"
        assert [configs.capturing(cuda_tensor) for _ in range(3)] == [True] * 3
        assert len(queries) == 1
    assert configs.env("NF4MOE_PDL", "x") == "auto"  # outside a call: the environment now
    with configs.layer_call():
        assert configs.graph_flag("NF4MOE_PDL", cuda_tensor) is True
        assert configs.graph_flag("NF4MOE_PDL", cuda_tensor) is True
    assert len(queries) == 2
    assert configs.capturing(torch.zeros(1)) is False  # CPU tensors: never, and no query
    assert len(queries) == 2


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("t", [1, 12])  # the decode GEMV path and the GEMM path (X·Aᵀ launches, combine)
def test_layer_calls_read_each_switch_once(monkeypatch, t):
    """An eager layer call of the Triton backend reads each environment switch at most once (they were read per
    launch: 21 reads for ~6 launches, ~1 us each of a host-bound call)."""
    import collections

    import nf4moe

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    mod = nf4moe.QuantGroupedExperts.from_weights(torch.randn(4, 128, 64, generator=g), torch.randn(4, 64, 64, generator=g),
                                                  lora_rank=4, lora_alpha=8, backend="triton").to(dev)
    x = torch.randn(t, 64, generator=g).to(dev)
    idx = torch.randint(0, 4, (t, 2), generator=g).to(dev)
    w = torch.rand(t, 2, generator=g).to(dev)
    monkeypatch.setenv("NF4MOE_GEMV_ROWS", "8")
    with torch.no_grad():
        mod(x, idx, w)  # first call: autotuning, compiles
        reads = collections.Counter()
        real_get = type(os.environ).get

        def counting_get(self, key, default=None):
            if key.startswith("NF4MOE_"):
                reads[key] += 1
            return real_get(self, key, default)

        monkeypatch.setattr(type(os.environ), "get", counting_get)
        mod(x, idx, w)
    assert reads["NF4MOE_GEMV_ROWS"] == 1
    assert max(reads.values()) == 1, reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="graph_bench captures CUDA graphs")
def test_graph_bench_times_copies_by_their_size():
    """Copies of 8 and 64 MiB: each time within 2 TB/s .. 20 TB/s of read + write bytes (an H100 / H200 copies
    at 3-4.3 TB/s), the larger one longer, quantiles ordered."""
    from nf4moe.kernels.configs import graph_bench

    times = []
    for mib in (8, 64):
        src = torch.randn(mib << 18, device="cuda")  # mib MiB of fp32
        dst = torch.empty_like(src)
        med, lo, hi = graph_bench(lambda: dst.copy_(src), quantiles=(0.5, 0.2, 0.8))
        assert lo <= med <= hi
        byts = 2 * src.numel() * 4
        assert byts / 20e12 * 1e3 < med < byts / 2e12 * 1e3, (mib, med)
        assert torch.equal(dst, src)  # the captured copies ran
        times.append(med)
    assert times[1] > 4 * times[0]
