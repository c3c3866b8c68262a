"""Autotune configurations for the NF4 grouped GEMM, generated per weight shape and token bucket.

Configs are keyed on the weight dims (N, K) and a bucketed row count (not the exact token count, so a
new T does not re-tune), pruned by shared-memory size, and cached by Triton's autotuner after the first
call.  ``NF4MOE_CONFIG="BLOCK_M=16,BLOCK_N=64,BLOCK_K=64,num_warps=4,num_stages=3"`` pins one config.
Under the Triton interpreter a single small config is used (the interpreter cannot benchmark).
"""
from __future__ import annotations

import os
import threading

import torch
import triton

_SMEM_BYTES = 227 * 1024  # Hopper's per-block limit; configs that would exceed it are pruned


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b).  triton.cdiv and triton.next_power_of_2 are Triton constexpr functions whose
    Python calls unwrap every argument: ~3 us each, a measurable part of an eager layer call's host time."""
    return -(-a // b)


def pow2(n: int) -> int:
    """Host-side next power of two >= n, as triton.next_power_of_2 (0 for n = 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton decides at import whether its kernels run in the interpreter; hot launch paths read this constant
# instead of the environment (an environment read costs ~1 us of an eager call's host time).
INTERPRET = interpreting()


class _Call(threading.local):
    memo: dict | None = None  # inside a layer call (``layer_call``): switch name -> raw value; capture state, device


_CALL = _Call()
_UNREAD = object()


class layer_call:
    """``with layer_call():`` around one layer call: inside it every environment switch (``env``), the capture
    state (``capturing``) and the current device (``current_device``) are read once, however many launches ask.
    An eager call at small T is host-bound (bench/NOTES.md v47): before this its ~6 launches made 21 environment
    reads on a CPU machine (~1 us each) and, on a GPU, 6-7 capture queries and 6 device queries more.  None of
    them can change within a call; nesting keeps the outer call's reads."""

    __slots__ = ("_outer",)

    def __enter__(self):
        self._outer = _CALL.memo
        if self._outer is None:
            _CALL.memo = {}
        return self

    def __exit__(self, *exc) -> bool:
        _CALL.memo = self._outer
        return False


def env(name: str, default: str) -> str:
    """``os.environ.get(name, default)``, read once per layer call (``layer_call``)."""
    memo = _CALL.memo
    if memo is None:
        return os.environ.get(name, default)
    raw = memo.get(name, _UNREAD)
    if raw is _UNREAD:
        raw = memo[name] = os.environ.get(name)
    return default if raw is None else raw


def env_flag(name: str, default: bool = False) -> bool:
    """A switch from the environment: ``0`` or ``1`` (unset: ``default``); anything else is an error."""
    raw = env(name, "1" if default else "0")
    if raw not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {raw!r}")
    return raw == "1"


def _per_call(key, query):
    """``query()``, asked once per layer call (``layer_call``) under ``key``; every time outside one."""
    memo = _CALL.memo
    if memo is None:
        return query()
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = query()
    return hit


def capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream of ``t``'s device (never for CPU tensors);
    asked once per layer call (``layer_call``)."""
    return t.is_cuda and _per_call(capturing, torch.cuda.is_current_stream_capturing)


def current_device() -> int:
    """``torch.cuda.current_device()``, asked once per layer call (``layer_call``; each launch keys on it)."""
    return _per_call(current_device, torch.cuda.current_device)


def graph_flag(name: str, t: torch.Tensor) -> bool:
    """A switch whose default is on for launches captured into a CUDA graph and off for eager ones: unset or
    ``auto``, ``capturing(t)``; ``1`` on and ``0`` off for both; anything else is an error.  For changes
    measured faster in graph replays that eager launches, host-bound at the sizes they affect, cannot gain
    from (NF4MOE_PDL, NF4MOE_GEMV_XA_EARLY: bench/NOTES.md, session 19)."""
    raw = env(name, "auto")
    if raw == "auto":
        return capturing(t)
    if raw not in ("0", "1"):
        raise ValueError(f"{name} must be 0, 1 or auto, got {raw!r}")
    return raw == "1"


def tune_in_graphs() -> bool:
    """``NF4MOE_TUNE_GRAPH`` (default 1, read at import): the decode GEMV's autotuner times its candidates with
    ``graph_bench`` instead of Triton's do_bench (0: do_bench).  NOTES v38, measured in session 15 on an H200:
    Qwen3 T=1 under a CUDA graph 0.0339 / 0.0316 ms with it against 0.0452 without (do_bench chose a down GEMV
    config 1.5x slower)."""
    return env_flag("NF4MOE_TUNE_GRAPH", default=True)


def graph_bench(kernel_call, quantiles=None, *, launches: int = 32, rounds: int = 7):
    """Time of one ``kernel_call`` (ms) with a cold L2, measured without the host in the loop; the Autotuner's
    ``do_bench`` interface (``quantiles`` given: the time at each, in their order; else the median).

    Why (session 14, H200): Triton's do_bench records an event pair per launch after an L2-flush memset; for
    the decode GEMV (12-20 us) the host's work per launch (the memset, two events and the Autotuner's Python
    launch, ~60 us) is close to the GPU's (~90 us), so a slow stretch on the host shows up as GPU time: one
    candidate timed 17.0 us in one run and 39.8 us in the next, and the chosen configs differed.  Here two
    CUDA graphs are captured once, ``launches`` x (flush, kernel) and ``launches`` x (flush), and replayed
    alternately ``rounds`` times; each round gives (t_both - t_flush) / launches.  The flush writes twice the
    L2 (as the weights of a real layer call are not in L2: other layers ran in between).
    """
    import torch

    dev = torch.cuda.current_device()
    l2 = getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 0) or (64 << 20)
    # per call, as Triton's do_bench (not held: the layer's users need the memory; the allocator caches it)
    flush = torch.empty(2 * l2, dtype=torch.int8, device=f"cuda:{dev}")
    kernel_call()  # compiles outside the capture, and warms the launch path
    torch.cuda.synchronize()
    both, only = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(both):
        for _ in range(launches):
            flush.zero_()
            kernel_call()
    with torch.cuda.graph(only):
        for _ in range(launches):
            flush.zero_()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def replay(g) -> float:
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    replay(both), replay(only)  # first replays upload the graphs
    times = sorted(max(replay(both) - replay(only), 0.0) / launches for _ in range(rounds))
    del both, only

    def pick(q: float) -> float:
        return times[min(len(times) - 1, int(q * len(times)))]

    if quantiles is None:
        return pick(0.5)
    return [pick(q) for q in quantiles]


def row_bucket(rows: int) -> int:
    """Bucket the number of (token, slot) rows so tuning is per regime, not per exact T."""
    for bound in (64, 256, 1024, 4096, 16384):
        if rows <= bound:
            return bound
    return 1 << 20


def _pinned() -> list[triton.Config] | None:
    spec = os.environ.get("NF4MOE_CONFIG")
    if not spec:
        return None
    kv = dict(item.split("=") for item in spec.split(","))
    meta = {k: int(v) for k, v in kv.items() if k.startswith("BLOCK")}
    return [triton.Config(meta, num_warps=int(kv.get("num_warps", 4)), num_stages=int(kv.get("num_stages", 3)))]


def gemm_configs() -> list[triton.Config]:
    """All candidates; the pruner below keeps those that fit the shape, the NF4 blocksize and the bucket."""
    # A single candidate would skip the pruner (and its K-step checks): pinned and interpreter lists
    # carry fallbacks, and the pruner keeps exactly one there (so the interpreter never benchmarks).
    pinned = _pinned()
    if pinned:
        return pinned + [_fallback()]
    if interpreting():  # 64-wide: half the interpreted programs of 32 (the GPU tests pin 32-wide tiles)
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=1), _fallback()]
    out = []
    # decode: few rows per expert, bandwidth-bound: many programs over N
    for bn, w, st in ((16, 4, 4), (32, 4, 3), (32, 4, 5), (64, 4, 4), (64, 4, 6)):
        out.append(triton.Config({"BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=st))
    # mid / prefill
    for bm, bn, w, st in ((32, 64, 4, 4), (64, 64, 4, 3), (64, 128, 8, 4), (128, 128, 8, 3), (128, 64, 4, 3),
                          (256, 128, 8, 3)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64}, num_warps=w, num_stages=st))
    # K steps spanning two NF4 blocks (of 64): twice the bytes in flight per program, half the loop trips
    for bm, bn, w, st in ((16, 32, 4, 4), (16, 64, 4, 3), (32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3),
                          (128, 128, 8, 3), (128, 64, 8, 3), (256, 64, 8, 3)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128}, num_warps=w, num_stages=st))
    # (8 warps on 128 weight rows, 16 resident warps per SM instead of 8, measured 1.7x slower at Qwen3's up
    # projection: NOTES v40)
    # decode with a register cap: 4 programs per SM instead of 2-3 (no spills at 128 registers, ptxas for sm_90)
    for bm, bn, st in ((16, 32, 4), (16, 64, 3), (16, 64, 4), (32, 64, 3)):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128}, num_warps=4, num_stages=st,
                                 maxnreg=128))
    # prefill: 256 rows per weight tile halve the decode per FLOP of 128-row tiles (natural K order there)
    out.append(triton.Config({"BLOCK_M": 256, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3))
    return out + [_fallback()]


def _fallback() -> triton.Config:
    """Valid for every shape: a K step of 32 divides any NF4 blocksize (>= 32) and so any K (and K / SPLIT_K:
    grouped_gemm.split_k only splits where it does)."""
    return triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4,
                         num_stages=1 if interpreting() else 3)


def prune_configs(configs, named_args, **kwargs):
    """Keep configs suited to the row bucket and shape: the K step must divide K / SPLIT_K (each split's K
    range) and either divide the NF4 blocksize (one absmax per tile row) or be a multiple of it (one per
    block); drop those over the shared-memory limit."""
    def arg(name):
        return named_args[name] if name in named_args else kwargs[name]

    k_dim, bs, bucket, n = arg("K_DIM"), arg("BS"), arg("ROW_BUCKET"), arg("N")
    has_lora, xa_pre, r_pad = arg("HAS_LORA"), arg("XA_PRE"), arg("R_PAD")
    splits = named_args.get("SPLIT_K", kwargs.get("SPLIT_K", 1))  # each split loops over K / splits
    valid = [c for c in configs if (bs % c.kwargs["BLOCK_K"] == 0 or c.kwargs["BLOCK_K"] % bs == 0)
             and k_dim % (c.kwargs["BLOCK_K"] * splits) == 0]
    if _pinned() or interpreting():
        return valid[:1]
    kept = []
    for c in valid:
        bm, bn, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        if bucket <= 64 and bm != 16:
            continue
        if bucket == 256 and bm > 32:  # ~2 rows per expert of 128
            continue
        if bucket == 1024 and bm > 64:
            continue
        if bucket == 4096 and not 32 <= bm <= 128:
            continue
        if bucket > 4096 and bm < 64:
            continue
        if bn > max(32, pow2(n)):
            continue
        smem = c.num_stages * (bm * bk * 2 + 2 * bn * bk // 2)  # X tile + gate/up packed tiles
        if has_lora and not xa_pre:  # LoRA A tile in the K loop
            smem += c.num_stages * r_pad * bk * 2
        if smem > _SMEM_BYTES:
            continue
        kept.append(c)
    return kept or valid[-1:]


_TUNED: dict = {}  # launch key -> the keyword arguments (meta-parameters, options) of the config chosen for it
# The autotuner reports its choice in one attribute (best_config) shared by all its keys and set before it
# compiles and launches (which can release the GIL): first launches hold this lock until it is read.
_TUNE_LOCK = threading.Lock()


def tuned(key: tuple) -> bool:
    """Whether ``launch_tuned`` has chosen a config for ``key``."""
    return _TUNED.get(key) is not None


def launch_tuned(kernel, grid, key: tuple, launcher, *args, **kwargs) -> None:
    """Launch the autotuned ``kernel``.  Once its autotuner has chosen a config for ``key``, later eager
    launches call the JIT function with that config directly: the autotuner's per-call key building (a
    pass over every argument with str() of each dtype) was about a quarter of the Triton launch time in
    the host-bound small-T layer (cProfile on an H100).  ``key`` must hold everything the autotuner keys on
    or prunes by (finer is harmless: a new key just goes through the autotuner once more, which answers
    from its own cache).  Traced launches (``launcher`` = wrap_triton) always go through the autotuner,
    which Inductor understands.
    """
    if launcher is not None:
        launcher(kernel)[grid](*args, **kwargs)
        return
    cfg = _TUNED.get(key)
    if cfg is None:
        with _TUNE_LOCK:
            kernel[grid](*args, **kwargs)
            _TUNED[key] = kernel.best_config.all_kwargs()
        return
    from .launch import launch  # launch imports this module

    launch(kernel.fn, grid, None, *args, **kwargs, **cfg)
