"""launch.py, the launchers' shared host layer, with stand-in kernels (the CPU has no compiled Triton kernels).

- ``launch``'s compiled-kernel cache: the first launch of a specialisation goes through ``kernel[grid]``
  (Triton compiles and returns the kernel); later launches with the same specialisation call the compiled
  kernel with every parameter in signature order; any change Triton specialises on (dtype, 16-byte alignment,
  an int equal to 1 or a multiple of 16 or beyond int32, a constexpr, an option) goes through Triton again.
- ``launch_tuned``: the autotuner once per key, then its config through the cache.
- ``pdl_options``: the plan's PDL choice as the kernel's wait and Triton's launch option, always together; every
  launcher of the inference path passes the plan's choice.
- ``arrival_counters``: zeroed buffers per device and stream, fresh ones when traced or captured.
The GPU suite runs the real path (every eager layer call uses it).
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

    from nf4moe.kernels.host import cdiv, pow2

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


@pytest.mark.parametrize("k_dim,combine,bucket", [(7168, False, 8), (2048, True, 8), (768, False, 64),
                                                 (65536, False, 8)])
def test_gemv_candidates_fit_and_stay_short(monkeypatch, k_dim, combine, bucket):
    """The GEMV's tuned candidates (the GPU list, pruned): lanes inside one NF4 block, one row per program with
    the fused combine, at most MAX_CHUNKS unrolled K chunks (else only the widest chunks), and never the
    4-byte-lane fallback while another config fits (at K = 7168 it took minutes to compile)."""
    from nf4moe.kernels import grouped_gemv as gv

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU candidate list (nothing is compiled here)
    monkeypatch.delenv("NF4MOE_CONFIG", raising=False)
    configs = gv.gemv_configs()
    kept = gv.prune_gemv(configs, {}, ROW_BUCKET=bucket, N=2048, BS=64, K_DIM=k_dim, COMBINE=combine)

    def chunks(c):
        return -(-k_dim // (2 * c.kwargs["LANES"] * c.kwargs["STEPS"] * c.kwargs["VEC"]))

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


# --------------------------------------------------------------------------- launch_tuned

class FakeAutotuner:
    """What launch_tuned uses of a Triton Autotuner: ``fn`` (the JIT function), ``[grid](...)`` (tune, then
    launch) and ``best_config`` (the choice of the last tuning launch)."""

    def __init__(self, block=32):
        self.fn = FakeKernel()
        self.tunings = []
        self.block = block

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.tunings.append((grid, args, kwargs))
            self.best_config = type("Cfg", (), {"all_kwargs": lambda _: {"BLOCK": self.block, "num_warps": 4}})()

        return run


@pytest.fixture
def fresh_tuned(monkeypatch):
    monkeypatch.setattr(L, "_TUNED", {})


def test_launch_tuned_asks_the_autotuner_once_per_key(direct, fresh_tuned):
    """The first launch of a key goes through the autotuner (which tunes and launches); later ones launch the
    JIT function with its config through the compiled-kernel cache (Triton once, then the compiled kernel);
    another key asks the autotuner again."""
    at = FakeAutotuner()
    x = torch.zeros(64)
    key = ("gemm", 768, 2048)
    assert not L.tuned(key)
    L.launch_tuned(at, (5,), key, None, x, 7, 0.5)
    assert len(at.tunings) == 1 and at.fn.log == [] and L.tuned(key)
    y = torch.ones(64)
    L.launch_tuned(at, (5,), key, None, x, 7, 0.5)
    L.launch_tuned(at, (5,), key, None, y, 9, 2.0)
    assert len(at.tunings) == 1
    assert [e[0] for e in at.fn.log] == ["triton", "compiled"]
    assert at.fn.log[0][3] == {"BLOCK": 32, "num_warps": 4}  # the tuned config, by keyword
    args = at.fn.log[1][2]
    assert args[0] is y and args[1:] == (9, 2.0, 32)  # every parameter, the config's constexpr last
    other = ("gemm", 768, 4096)
    L.launch_tuned(at, (5,), other, None, x, 7, 0.5)
    assert len(at.tunings) == 2 and L.tuned(other)


def test_traced_launch_tuned_always_goes_through_the_autotuner(direct, fresh_tuned):
    """With a launcher (wrap_triton) every launch is the autotuner's, which Inductor understands; nothing is
    recorded, so a later eager launch still tunes."""
    at = FakeAutotuner()
    wrapped = []
    key = ("gemv", 2048)
    for _ in range(2):
        L.launch_tuned(at, (1,), key, lambda kern: wrapped.append(kern) or kern, torch.zeros(4), 7, 0.5)
    assert wrapped == [at, at] and len(at.tunings) == 2 and at.fn.log == []
    assert not L.tuned(key)


# --------------------------------------------------------------------------- PDL (the plan's pdl, v46)

@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("traced", [False, True])
def test_pdl_options_pair_the_wait_with_the_launch_option(pdl, traced):
    """A programmatic dependent launch (Triton's launch_pdl) always comes with the kernel's wait (the PDL
    constexpr), as the plan says (plan.LaunchPlan.pdl); traced launches (a launcher: Inductor launches the
    kernel) never wait and pass no launch option."""
    opts = L.pdl_options(pdl, (lambda kernel: kernel) if traced else None)
    assert opts == ({"PDL": False} if traced else {"PDL": pdl, "launch_pdl": pdl})


_PDL_LAUNCHERS = ("routing", "grouped_gemm", "grouped_gemv", "lora_xa", "combine")


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("plan_pdl", [False, True])
@pytest.mark.parametrize("path,t,choices,launchers", [
    ("decode", 1, {}, {"routing", "grouped_gemv", "lora_xa"}),  # routing + up X·Aᵀ, GEMVs, fused combine
    ("decode_combine", 1, {"combine": "kernel"}, {"routing", "grouped_gemv", "lora_xa", "combine"}),
    ("gemm", 12, {"up": "gemm", "down": "gemm", "xa": "kernel"}, {"routing", "lora_xa", "grouped_gemm", "combine"}),
])
def test_every_inference_launch_takes_the_plans_pdl(monkeypatch, plan_pdl, path, t, choices, launchers):
    """An eager inference call hands its plan's ``pdl`` to every kernel launch with a PDL constexpr (the kernel's
    wait), direct launches all: the routing, the X·Aᵀ, the GEMV or GEMM of each projection and the combine.
    The real plan here (the interpreter: no PDL), and a plan with ``pdl`` on (the plan a capture on sm_90 gets;
    the launch options themselves stay off, the interpreter has no griddepcontrol)."""
    import dataclasses
    import importlib

    import nf4moe
    from nf4moe.moe_layers import triton_backend as tb

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    seen = []
    for name in _PDL_LAUNCHERS:
        mod = importlib.import_module(f"nf4moe.kernels.{name}")

        def spy(pdl, launcher, _name=name):
            seen.append((_name, pdl, launcher is None))
            return L.pdl_options(False, launcher)

        monkeypatch.setattr(mod, "pdl_options", spy)
    plans = []
    real_make_plan = tb.make_plan

    def make_plan(inputs, overrides):
        plan = real_make_plan(inputs, overrides)
        plans.append(plan)
        return dataclasses.replace(plan, pdl=True) if plan_pdl else plan

    monkeypatch.setattr(tb, "make_plan", make_plan)
    g = torch.Generator().manual_seed(t)
    mod = nf4moe.QuantGroupedExperts.from_weights(torch.randn(4, 128, 64, generator=g), torch.randn(4, 64, 64, generator=g),
                                                  lora_rank=4, lora_alpha=8, backend="triton").to(dev)
    x = torch.randn(t, 64, generator=g).to(dev)
    idx = torch.stack([torch.randperm(4, generator=g)[:2] for _ in range(t)]).to(dev)
    w = torch.rand(t, 2, generator=g).to(dev)
    with torch.no_grad(), nf4moe.plan_overrides(**choices):
        mod(x, idx, w)
    assert len(plans) == 1 and plans[0].pdl is False  # never on for eager calls by default
    assert plans[0].combine == ("gemv" if path == "decode" else "kernel")
    assert {name for name, _, _ in seen} == launchers, seen
    assert all(pdl is plan_pdl and direct for _, pdl, direct in seen), seen


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
                    reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("t", [1, 12])  # the decode GEMV path and the GEMM path (combine kernel)
def test_layer_calls_read_no_environment_switch(monkeypatch, t):
    """Overrides come from nf4moe.plan_overrides, not the environment: after its first call (autotuning, which
    reads NF4MOE_CONFIG when it prunes), an eager layer call reads no NF4MOE_* variable (the switches were read
    per launch once, ~1 us each of a host-bound call)."""
    import collections

    import nf4moe

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    mod = nf4moe.QuantGroupedExperts.from_weights(torch.randn(4, 128, 64, generator=g), torch.randn(4, 64, 64, generator=g),
                                                  lora_rank=4, lora_alpha=8, backend="triton").to(dev)
    x = torch.randn(t, 64, generator=g).to(dev)
    idx = torch.randint(0, 4, (t, 2), generator=g).to(dev)
    w = torch.rand(t, 2, generator=g).to(dev)
    with torch.no_grad(), nf4moe.plan_overrides(gemv_max_rows=8):
        mod(x, idx, w)  # first call: autotuning, compiles
        reads = collections.Counter()
        real_get = type(os.environ).get

        def counting_get(self, key, default=None):
            if key.startswith("NF4MOE_"):
                reads[key] += 1
            return real_get(self, key, default)

        monkeypatch.setattr(type(os.environ), "get", counting_get)
        mod(x, idx, w)
    assert not reads, reads


# --------------------------------------------------------------------------- arrival counters

def test_arrival_counters_are_kept_per_device_and_stream(monkeypatch):
    """Zeroed int32 counters of at least the size asked for (4096 at least), the same buffer for later launches
    on the device (each launch leaves them zero), a larger one when more are needed."""
    monkeypatch.setattr(L, "_COUNTERS", {})
    cpu = torch.device("cpu")
    a = L.arrival_counters(cpu, 100)
    assert a.dtype == torch.int32 and a.numel() >= 4096 and not a.count_nonzero()
    assert L.arrival_counters(cpu, 4096) is a
    b = L.arrival_counters(cpu, 5000)
    assert b.numel() >= 5000 and not b.count_nonzero() and L.arrival_counters(cpu, 10) is b


def test_traced_arrival_counters_are_fresh(monkeypatch):
    """A launch through wrap_triton (torch.compile) gets a fresh zeroed buffer, part of its own graph: a cached
    one would hold the first trace's fake tensor (``Mixing fake modes``)."""
    monkeypatch.setattr(L, "_COUNTERS", {})
    cpu = torch.device("cpu")
    cached = L.arrival_counters(cpu, 64)
    fresh = [L.arrival_counters(cpu, 64, traced=True) for _ in range(2)]
    assert fresh[0] is not fresh[1] and all(f is not cached and not f.count_nonzero() for f in fresh)
    assert fresh[0].numel() == 64 and fresh[0].dtype == torch.int32
    assert L.arrival_counters(cpu, 64) is cached


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams and graph captures")
def test_arrival_counters_of_other_streams_and_captures_are_their_own(monkeypatch):
    """Two streams never share counters (their launches may overlap); a CUDA-graph capture gets a fresh zeroed
    buffer owned by the graph (its replays leave it zero, whatever runs eagerly in between)."""
    monkeypatch.setattr(L, "_COUNTERS", {})
    dev = torch.device("cuda", torch.cuda.current_device())
    main = L.arrival_counters(dev, 64)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        other = L.arrival_counters(dev, 64)
        assert L.arrival_counters(dev, 64) is other
    assert other.data_ptr() != main.data_ptr()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = L.arrival_counters(dev, 64)
    assert captured.data_ptr() not in (main.data_ptr(), other.data_ptr())
    graph.replay()
    torch.cuda.synchronize()
    assert not captured.count_nonzero() and L.arrival_counters(dev, 64) is main


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
