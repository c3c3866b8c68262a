"""The launch plan: which kernels one layer call runs, chosen once, by one pure function of what the call is.

Every call of the Triton expert layer builds one ``LaunchPlan`` (``make_plan``) from a ``PlanInputs``: the shapes
(T, K, E, H, I, LoRA rank, NF4 blocksize), the activation dtype, the device (CUDA capability, the interpreter,
Gluon), whether the hidden states suit the Gluon GEMM's copies, training or inference (and recompute mode),
CUDA-graph capture and tracing (torch.compile, fake tensors, dispatch modes).  The plan names the routing form,
the kernel of each projection, where each projection's LoRA X·Aᵀ comes from, the combine form, the Gluon GEMM's
tile and the launch options; ``dispatch.py`` runs it and nothing below it chooses again.  The plan crosses the
registered op's boundary as its ``key`` string (``LaunchPlan.from_key``).

Overrides come from ``plan_overrides(...)`` (a context manager, also ``nf4moe.plan_overrides``), never from the
environment.  Forcing a kernel that cannot run on the call's inputs raises ``ValueError`` naming the override;
thresholds and the Gluon tile apply to the calls they concern.

Each default below is a measurement; "NOTES vNN" throughout the package is entry vNN of lab/NOTES-history.md
(the variants measured slower are gone from the code: lab/VARIANTS.md and git history).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.compiler

from .routing import TRITON_MAX_PAIRS, triton_fits

KERNELS = ("gemv", "gemm", "wgmma")  # decode GEMV (grouped_gemv.py), Triton MMA GEMM (grouped_gemm.py), Gluon GEMM
BWD_KERNELS = ("gemm", "wgmma")  # the backward's transposed GEMMs: Triton (grouped_gemm_bwd.py), Gluon (..._wgmma_bwd.py)
ROUTINGS = ("torch", "kernel", "kernel_xa")  # kernel_xa: the routing launch also computes the up X·Aᵀ by pair id
XA_FORMS = ("none", "routing", "kernel", "loop")  # routing launch, lora_xa.py launch, the GEMM's K loop
COMBINES = ("gemv", "kernel")  # fused into the down GEMV, or combine.py's kernel
TILES = {"128x256": (128, 256), "256x128": (256, 128)}  # Gluon GEMM (rows, weight rows) per program

# Inference calls of up to this many routed rows run the decode GEMV.  H200, Qwen3-30B-A3B under CUDA graphs
# (NOTES v41): 0.0738 / 0.1265 ms against 0.1232 / 0.2120 with the MMA GEMM at 32 / 64 rows; 0.2316 against
# 0.2074 at 128 (T=16).
GEMV_MAX_ROWS = 64
# The Gluon GEMM from this many routed rows (and WGMMA_ROWS_PER_EXPERT on average per expert).  H200 (v23):
# GEMMs 1.16x faster at 8192 rows (Qwen3 T=1024), 1.14x at 65536, DeepSeek-V3 T=8192 1.22x; at 32 rows per
# expert (DeepSeek-V3 T=1024, v25) 8.31 ms against the Triton GEMM's 7.48.
WGMMA_MIN_ROWS = 8192
WGMMA_ROWS_PER_EXPERT = 64
# Its 256x128 tile from this many rows per expert on average, 128x256 below.  H200 GEMM times, 256x128 against
# 128x256 (v25): Qwen3 T=8192 2.088 / 2.195 ms, GLM-4.5-Air 6.681 / 7.182, DeepSeek-V3 19.52 / 19.90; 1.7-1.9x
# slower at <= 64 rows per expert.  An expert's last <= 128 rows then run as a 128x256 tile (v28).
WIDE_TILE_ROWS_PER_EXPERT = 256
# The backward's Gluon GEMMs (training calls; sm_90, 16-bit, eager) by default from this many routed rows and
# BWD_WGMMA_ROWS_PER_EXPERT per expert; None: only when asked for (``plan_overrides(bwd="wgmma")`` or
# ``bwd_wgmma_min_rows=``).  The kernel was written in a session without a GPU: it compiles for sm_90 on the CPU
# (tests/test_gpu_compile.py) but has not yet run, so it is not a default until tests/test_wgmma_backward.py passes
# on an H100 and it measures faster (bench/NOTES.md, issue 31).
BWD_WGMMA_MIN_ROWS: int | None = None
BWD_WGMMA_ROWS_PER_EXPERT = 32
# The Triton GEMM takes X·Aᵀ from its K loop up to this many routed rows, precomputed once per row above (-12%
# GEMM time at T=128, v5; the same time at T=1 without the extra launch).
XA_LOOP_MAX_ROWS = 64


@dataclass(frozen=True)
class PlanOverrides:
    """Choices that replace the plan's defaults (None: the default).  ``up`` / ``down``: one of ``KERNELS``;
    ``routing``: ``"kernel"`` or ``"torch"``; ``xa``: ``"loop"`` or ``"kernel"`` for the Triton GEMM's X·Aᵀ;
    ``xa_in_routing``: the decode path's up X·Aᵀ in the routing launch; ``combine``: one of ``COMBINES``;
    ``wgmma_tile``: ``"128x256"`` or ``"256x128"``; ``gemv_max_rows`` / ``wgmma_min_rows``: the thresholds above;
    ``pdl``: programmatic dependent launches (sm_90+, direct launches); ``gemv_xa_early``: the GEMV sums its X·Aᵀ
    partials while its first K chunk is in flight; ``bwd``: one of ``BWD_KERNELS`` for the backward's two
    transposed GEMMs (training calls); ``bwd_wgmma_min_rows``: its threshold above."""

    up: str | None = None
    down: str | None = None
    routing: str | None = None
    xa: str | None = None
    xa_in_routing: bool | None = None
    combine: str | None = None
    wgmma_tile: str | None = None
    gemv_max_rows: int | None = None
    wgmma_min_rows: int | None = None
    pdl: bool | None = None
    gemv_xa_early: bool | None = None
    bwd: str | None = None
    bwd_wgmma_min_rows: int | None = None

    def __post_init__(self):
        allowed = {"up": KERNELS, "down": KERNELS, "routing": ("kernel", "torch"), "xa": ("loop", "kernel"),
                   "combine": COMBINES, "wgmma_tile": tuple(TILES), "bwd": BWD_KERNELS}
        for name, values in allowed.items():
            v = getattr(self, name)
            if v is not None and v not in values:
                raise ValueError(f"plan_overrides: {name} must be one of {values}, got {v!r}")
        for name in ("xa_in_routing", "pdl", "gemv_xa_early"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise ValueError(f"plan_overrides: {name} must be True or False, got {v!r}")
        for name, low in (("gemv_max_rows", 0), ("wgmma_min_rows", 1), ("bwd_wgmma_min_rows", 1)):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"plan_overrides: {name} must be an int >= {low}, got {v!r}")


NO_OVERRIDES = PlanOverrides()
_OVERRIDES: contextvars.ContextVar[PlanOverrides] = contextvars.ContextVar("nf4moe_plan_overrides",
                                                                            default=NO_OVERRIDES)
_OVERRIDE_NAMES = frozenset(f.name for f in fields(PlanOverrides))


@contextlib.contextmanager
def plan_overrides(**choices):
    """``with plan_overrides(up="gemm", pdl=True): ...``: layer calls inside use these choices (nested blocks add
    to the outer one's).  Names and values are checked here; see ``PlanOverrides``."""
    unknown = sorted(set(choices) - _OVERRIDE_NAMES)
    if unknown:
        raise ValueError(f"plan_overrides: unknown choice(s) {unknown}; known: {sorted(_OVERRIDE_NAMES)}")
    token = _OVERRIDES.set(replace(_OVERRIDES.get(), **choices))
    try:
        yield _OVERRIDES.get()
    finally:
        _OVERRIDES.reset(token)


@torch.compiler.assume_constant_result
def current_overrides() -> PlanOverrides:
    """The overrides in force here (``plan_overrides``).  Under torch.compile the value at trace time is compiled
    into the graph (Dynamo cannot trace a ContextVar read): later overrides need a new trace."""
    return _OVERRIDES.get()


class PlanInputs(NamedTuple):
    """What a layer call is, as far as the choice of kernels goes (a NamedTuple: built on every eager call)."""

    tokens: int
    top_k: int
    num_experts: int
    hidden: int
    intermediate: int
    rank: int  # LoRA rank (0: no LoRA)
    blocksize: int
    dtype: torch.dtype  # of the hidden states
    cuda: bool  # CUDA tensors (else CPU tensors, launchable only under the interpreter)
    capability: tuple | None  # (major, minor) of the CUDA device
    interpret: bool  # Triton's interpreter runs the kernels
    gluon: bool  # Triton ships Gluon's Hopper API
    index_ok: bool  # top_k_index is int32 / int64 (the routing kernels' ids)
    x_aligned: bool  # hidden-state rows unit-stride and 16-byte aligned (the Gluon GEMM's cp.async)
    training: bool  # a gradient is needed
    recompute: bool  # training memory mode: rebuild the up pre-activation in the backward
    capturing: bool  # a CUDA graph is being captured
    traced: bool  # torch.compile, fake / subclass tensors or a dispatch mode: launches through wrap_triton


@dataclass(frozen=True)
class LaunchPlan:
    """The kernels of one layer call (``make_plan``)."""

    routing: str  # ROUTINGS
    up: str  # KERNELS
    down: str  # KERNELS
    up_xa: str  # XA_FORMS: the up projection's LoRA X·Aᵀ
    down_xa: str  # XA_FORMS ("routing" never)
    combine: str  # COMBINES
    wgmma_tile: tuple | None  # (rows, weight rows) of the Gluon GEMM; with (256, 128) remainders in (128, 256)
    pdl: bool  # programmatic dependent launches of the inference kernels
    gemv_xa_early: bool
    capturing: bool  # the call is being captured in a CUDA graph (the GEMV never autotunes there)
    save_preact: bool  # training: the forward stores gate|up pre-activations (and X·A_upᵀ) for the backward
    check_ids_in_kernel: bool  # negative ids rejected by the routing kernel's device assert
    bwd: str  # BWD_KERNELS, or "none" for calls without a backward

    def __post_init__(self):
        # ``key``: the plan as a string (the registered op's ``plan`` argument; ``from_key`` reads it back), made
        # once here, a plain attribute (torch.compile traces the layer call that reads it)
        out = []
        for f in fields(self):
            v = getattr(self, f.name)
            out.append(f"{f.name}={'x'.join(map(str, v)) if isinstance(v, tuple) else '-' if v is None else v}")
        object.__setattr__(self, "key", ",".join(out))

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def from_key(key: str) -> "LaunchPlan":
        kv = dict(item.split("=", 1) for item in key.split(","))
        vals = {}
        for f in fields(LaunchPlan):
            raw = kv[f.name]
            if f.name == "wgmma_tile":
                vals[f.name] = None if raw == "-" else tuple(int(v) for v in raw.split("x"))
            elif raw in ("True", "False"):
                vals[f.name] = raw == "True"
            else:
                vals[f.name] = raw
        return LaunchPlan(**vals)

    @property
    def kernels(self) -> tuple[str, str]:
        return self.up, self.down


def _wgmma_fits(inp: PlanInputs, k_dim: int, aligned: bool) -> str | None:
    """Why the Gluon GEMM cannot take a projection with K = ``k_dim`` (None: it can).  Eager launches only, with
    16-bit activations through the PTX table decode, on sm_90 with Gluon, unit-stride 16-byte-aligned activation
    rows, K a multiple of 64 and a blocksize that 64 divides."""
    if not inp.cuda or inp.interpret:
        return "it needs a CUDA device and compiled kernels"
    if inp.capability != (9, 0) or not inp.gluon:
        return "it needs an sm_90 GPU and Triton's Gluon (3.6+)"
    if inp.dtype not in (torch.bfloat16, torch.float16):
        return f"it takes 16-bit activations, not {inp.dtype}"
    if inp.traced:
        return "torch.compile traces the Triton GEMM"
    if not aligned:
        return "its activation rows must be unit-stride and 16-byte aligned"
    if k_dim % 64 or inp.blocksize % 64:
        return f"it needs K ({k_dim}) and the blocksize ({inp.blocksize}) multiples of 64"
    return None


def _bwd_wgmma_fits(inp: PlanInputs) -> str | None:
    """Why the backward's Gluon GEMMs cannot take this call (None: they can): as ``_wgmma_fits``, with the
    reductions over H (down) and 2I (up) in steps of 64 and the columns (I, H) in NF4 blocks of a multiple of 32."""
    why = _wgmma_fits(inp, 64, True)
    if why is not None:
        return why
    if inp.hidden % 64 or inp.intermediate % 32 or inp.blocksize % 32:
        return (f"it needs H ({inp.hidden}) a multiple of 64, I ({inp.intermediate}) and the blocksize "
                f"({inp.blocksize}) multiples of 32")
    return None


def _bwd(inp: PlanInputs, rows: int, ov: PlanOverrides) -> str:
    """The backward's transposed GEMMs (training calls): forced by ``ov.bwd`` (checked), else by the threshold."""
    if not inp.training:
        return "none"
    why = _bwd_wgmma_fits(inp)
    if ov.bwd is not None:
        if ov.bwd == "wgmma" and why:
            raise ValueError(f"plan_overrides: bwd='wgmma' cannot run here: {why}")
        return ov.bwd
    low = BWD_WGMMA_MIN_ROWS if ov.bwd_wgmma_min_rows is None else ov.bwd_wgmma_min_rows
    if why is None and low is not None and rows >= low and rows >= BWD_WGMMA_ROWS_PER_EXPERT * inp.num_experts:
        return "wgmma"
    return "gemm"


def _kernel(name: str, forced: str | None, inp: PlanInputs, rows: int, k_dim: int, aligned: bool,
            ov: PlanOverrides, *, stores: bool) -> str:
    """The kernel of one projection: forced by ``forced`` (checked), else by the thresholds.  ``stores``: the
    projection stores the training forward's pre-activations (the up projection, unless in recompute mode), which
    only the GEMMs do."""
    why_not_wgmma = _wgmma_fits(inp, k_dim, aligned)
    if forced is not None:
        if forced == "gemv" and stores:
            raise ValueError(f"plan_overrides: {name}='gemv' cannot store the training forward's pre-activations")
        if forced == "wgmma" and why_not_wgmma:
            raise ValueError(f"plan_overrides: {name}='wgmma' cannot run here: {why_not_wgmma}")
        return forced
    gemv_max = GEMV_MAX_ROWS if ov.gemv_max_rows is None else ov.gemv_max_rows
    if not stores and 0 < rows <= gemv_max:
        return "gemv"
    wgmma_min = WGMMA_MIN_ROWS if ov.wgmma_min_rows is None else ov.wgmma_min_rows
    if why_not_wgmma is None and rows >= wgmma_min and rows >= WGMMA_ROWS_PER_EXPERT * inp.num_experts:
        return "wgmma"
    return "gemm"


def _xa(kernel: str, inp: PlanInputs, rows: int, ov: PlanOverrides, *, up: bool) -> str:
    """Where a projection's LoRA X·Aᵀ comes from (the routing launch is settled by the caller)."""
    if inp.rank == 0:
        return "none"
    if kernel != "gemm":  # the GEMV and the Gluon GEMM read it precomputed
        return "kernel"
    if up and inp.training and not inp.recompute:  # the forward saves X·A_upᵀ for the backward: lora_xa writes it
        if ov.xa == "loop":
            raise ValueError("plan_overrides: xa='loop' cannot run in training (the backward needs X·A_upᵀ saved)")
        return "kernel"
    if ov.xa is not None:
        return ov.xa
    return "kernel" if rows > XA_LOOP_MAX_ROWS else "loop"


@functools.lru_cache(maxsize=4096)
def make_plan(inp: PlanInputs, ov: PlanOverrides = NO_OVERRIDES) -> LaunchPlan:
    """The launch plan of a call described by ``inp`` under overrides ``ov`` (pure; cached)."""
    if not (inp.cuda or inp.interpret):
        raise ValueError("the Triton backend runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1")
    rows = inp.tokens * inp.top_k
    kernel_routing = inp.index_ok and triton_fits(rows, inp.num_experts)
    if ov.routing == "kernel" and not kernel_routing:
        raise ValueError(f"plan_overrides: routing='kernel' cannot take {rows} pairs of {inp.num_experts} experts "
                         "(routing.triton_fits) or this index dtype")
    routing = ov.routing or ("kernel" if kernel_routing else "torch")
    direct = not inp.traced and not inp.training  # launched by our own cache, not through wrap_triton

    stores = inp.training and not inp.recompute
    up = _kernel("up", ov.up, inp, rows, inp.hidden, inp.x_aligned, ov, stores=stores)
    down = _kernel("down", ov.down, inp, rows, inp.intermediate, True, ov, stores=False)  # h: our aligned buffer
    up_xa = _xa(up, inp, rows, ov, up=True)
    down_xa = _xa(down, inp, rows, ov, up=False)
    if up == "gemv" and up_xa == "kernel" and routing == "kernel" and rows <= TRITON_MAX_PAIRS and direct:
        # the routing launch computes the up X·Aᵀ by pair id: one launch fewer.  H200, Qwen3 T=1 under a CUDA
        # graph (v39): 0.0316 ms against 0.0339
        if ov.xa_in_routing is not False:
            up_xa, routing = "routing", "kernel_xa"
    elif ov.xa_in_routing:
        raise ValueError("plan_overrides: xa_in_routing=True needs the decode GEMV's up projection with LoRA, the "
                         "routing kernel's one-program sort and a direct (eager, untraced, inference) call")

    # The down GEMV sums each token's slot rows itself in eager calls (one launch and dispatch fewer, v32), not
    # in captures, where the plain GEMV and the combine kernel measured faster (H200: Qwen3 T=1 5 us, DeepSeek-V3
    # T=2 12 us per call, v33).
    combine = "gemv" if down == "gemv" and not inp.capturing else "kernel"
    if ov.combine is not None:
        if ov.combine == "gemv" and down != "gemv":
            raise ValueError(f"plan_overrides: combine='gemv' needs the down GEMV (down is {down!r})")
        combine = ov.combine

    tile = None
    if "wgmma" in (up, down):
        if ov.wgmma_tile is not None:
            tile = TILES[ov.wgmma_tile]
        else:
            wide = rows >= WIDE_TILE_ROWS_PER_EXPERT * inp.num_experts
            tile = TILES["256x128"] if wide else TILES["128x256"]

    # Programmatic dependent launches and the GEMV's early X·Aᵀ sums: measured faster in CUDA-graph replays only
    # (H100, Qwen3: T=1 0.0320 -> 0.0312 ms, T=16 0.2029 -> 0.1994, T=128 0.3094 -> 0.3060; v45, v46); eager
    # calls, host-bound at these sizes, gained nothing and varied more.
    pdl_ok = direct and inp.cuda and not inp.interpret and inp.capability is not None and inp.capability[0] >= 9
    if ov.pdl and not pdl_ok:
        raise ValueError("plan_overrides: pdl=True needs an sm_90+ GPU and a direct (eager, untraced, inference) call")
    pdl = pdl_ok and (inp.capturing if ov.pdl is None else ov.pdl)
    early = inp.rank > 0 and "gemv" in (up, down) and (inp.capturing if ov.gemv_xa_early is None else ov.gemv_xa_early)
    return LaunchPlan(
        routing=routing, up=up, down=down, up_xa=up_xa, down_xa=down_xa, combine=combine, wgmma_tile=tile,
        pdl=pdl, gemv_xa_early=early, capturing=inp.capturing, save_preact=inp.training and not inp.recompute,
        check_ids_in_kernel=routing != "torch" and inp.cuda and not inp.traced, bwd=_bwd(inp, rows, ov),
    )
