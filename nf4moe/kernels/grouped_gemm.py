"""Fused NF4 grouped GEMM for MoE experts: dequantize in the tile loop, LoRA in the same pass.

One kernel serves both projections (constexpr flags pick the mode):

- up   (GATED):   rows gathered from hidden_states by token = pair // K; gate and up tiles of
  ``gate_up_proj[e]`` in the same program; epilogue writes act(gate) * up for each pair in sorted order.
- down (SCATTER): rows of the sorted intermediate; epilogue multiplies by the pair's routing weight and
  writes row ``pair`` of the (T*K, H) slot buffer (combined per token by ``combine``).

The product is computed transposed (swap-AB): acc (BLOCK_N, BLOCK_M) = W_tile (BLOCK_N, BLOCK_K) @
X_tileᵀ (BLOCK_K, BLOCK_M).  The dequantized weight is the left operand, so it can stay in registers,
and BLOCK_M (rows of one expert) may be as small as 16 for decode.

Grid: (cdiv(N, BLOCK_N) * SPLIT_K, cdiv(P, BLOCK_M) + min(E, P)).  Program (n, m) finds its expert and row
tile from ``expert_offsets`` (tiles are padded per expert to BLOCK_M); programs past the last tile exit.
With the opt-in split-K (``NF4MOE_SPLIT_K``, decode sizes) each tile's K range is split over SPLIT_K
programs whose fp32 partials the last to arrive sums in split order (common.split_k_reduce).
No host synchronisation is needed to size the grid.

A K step (BLOCK_K) either divides the NF4 blocksize (one absmax per tile row) or spans several whole
blocks (one absmax per block, nf4_decode); the autotuner picks K=128 on most Qwen3-30B-A3B buckets.
Tiles of up to 32 rows take each K step's columns in wgmma k order (nf4_decode.mma_k_order: the weight
bytes arrive as words and decode straight into operand pairs; the activations are read in the same
order).  LoRA X·Aᵀ is accumulated in the K loop up to 64 routed rows and precomputed per row above
(lora_xa.py, split over K at small P).  The launcher sends inference calls up to ``NF4MOE_GEMV_ROWS``
routed rows to the decode GEMV (grouped_gemv.py; default 64 rows), and eager launches from 8192 routed rows
on Hopper to the Gluon GEMM (grouped_gemm_wgmma.py: decode into shared memory, asynchronous wgmma; 1.14-1.22x
at T >= 1024 on an H200); eager launches reuse the autotuner's choice (configs.launch_tuned) and the compiled
kernel (launch.launch).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_mode

from .operands import NF4Operand, r_pad
from .configs import INTERPRET, cdiv, env, gemm_configs, launch_tuned, pow2, prune_configs, row_bucket
from .combine import launch_combine
from .grouped_gemv import gemv_takes, launch_nf4_moe_gemv
from .lora_xa import launch_lora_xa
from .nf4_decode import dequant_operand, mma_k_order
from .common import act_fwd, dot_operand, expert_row_tile, nested_offset, pdl_enter, split_k_reduce
from .launch import pdl_options

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}


@triton.autotune(
    configs=gemm_configs(),
    key=["N", "K_DIM", "ROW_BUCKET", "GATED", "HAS_LORA", "BS", "KPERM", "K_HINT", "XA_PRE", "SPLIT_K"],
    prune_configs_by={"early_config_prune": prune_configs},
)
@triton.jit
def nf4_moe_gemm_kernel(
    x_ptr,            # up: hidden_states (T, K_DIM); down: intermediate (P, K_DIM) in sorted order; fp16/bf16/fp32
    stride_xm, stride_xk,
    w_ptr,            # (E, N_TOTAL, K_DIM // 2) uint8 packed NF4
    am_ptr,           # (E, N_TOTAL, K_DIM // BS) fp32 absmax, or uint8 codes when NESTED
    am2_ptr,          # (ceil(blocks / BS2),) fp32 nested absmax (unused unless NESTED)
    code2_ptr,        # (256,) fp32 nested code (unused unless NESTED)
    off_ptr,          # () fp32 nested offset (unused unless NESTED)
    la_ptr,           # (E, R, K_DIM) LoRA A (unused unless HAS_LORA)
    lb_ptr,           # (E, N_TOTAL, R) LoRA B (unused unless HAS_LORA)
    scaling,          # float: lora_alpha / r
    xa_ptr,           # (XA_SPLIT, P, R_PAD) fp32 precomputed X·Aᵀ partials in sorted order (XA_PRE only)
    XA_SPLIT,
    gu_ptr,           # (P, 2N) pre-activation gate|up in sorted order, for the backward (WRITE_GU only)
    out_ptr,          # up: (P, N) sorted order; down: (P, N) indexed by pair id
    stride_om,
    pair_ptr,         # (P,) int32 pair ids sorted by expert
    eoff_ptr,         # (E + 1,) int32 expert offsets into pair_ptr
    topw_ptr,         # (P,) routing weight per pair (down only)
    ws_ptr,           # (SPLIT_K, P, WS_W) fp32 split-K partials: acc | acc_up | X·Aᵀ per N tile (SPLIT_K > 1 only)
    cnt_ptr,          # (>= row tiles * cdiv(N, BLOCK_N),) int32 arrival counters, zero between calls (SPLIT_K > 1)
    WS_W,             # row width of ws: 2N + cdiv(N, 16) * R_PAD
    N, K_DIM, N_TOTAL, E, R, P, ROW_BUCKET,
    TOP_K: tl.constexpr, E_POW2: tl.constexpr, R_PAD: tl.constexpr,
    GATED: tl.constexpr, ACT: tl.constexpr, GATHER: tl.constexpr, SCATTER: tl.constexpr,
    HAS_LORA: tl.constexpr, NESTED: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr,
    INTERPRET: tl.constexpr, LUT: tl.constexpr, XA_PRE: tl.constexpr, WRITE_GU: tl.constexpr,
    WRITE_OUT: tl.constexpr, KPERM: tl.constexpr, K_HINT: tl.constexpr, SPLIT_K: tl.constexpr,
    PDL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(N, BLOCK_N) * SPLIT_K, cdiv(P, BLOCK_M) + min(E, P))."""
    pdl_enter(PDL)
    pid_n = tl.program_id(0) // SPLIT_K
    split = tl.program_id(0) % SPLIT_K
    pid_m = tl.program_id(1)

    e, row_lo, row_hi = expert_row_tile(eoff_ptr, pid_m, E, E_POW2, BLOCK_M)
    if e >= E:
        return
    offs_m = row_lo + tl.arange(0, BLOCK_M)
    m_mask = offs_m < row_hi
    if GATHER or SCATTER:
        pair = tl.load(pair_ptr + offs_m, mask=m_mask, other=0)
    if GATHER:
        x_rows = (pair // TOP_K).to(tl.int64)
    else:
        x_rows = offs_m.to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    e64 = e.to(tl.int64)
    w_rows = e64 * N_TOTAL + offs_n
    dt = x_ptr.dtype.element_ty
    offset = nested_offset(off_ptr, NESTED)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_xa = tl.zeros((R_PAD, BLOCK_M), dtype=tl.float32)
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    if K_HINT:  # no zero-trip path around the K loop: ptxas then keeps the wgmmas asynchronous (see use_k_hint)
        tl.assume(K_DIM >= BLOCK_K)
    # KPERM: K step columns in wgmma k order (nf4_decode.mma_k_order): whole-word weight byte loads and no
    # operand repacking, but activations read in 2-element runs: at 128 rows per tile that cost more than it
    # saved (H100, Qwen3 T=1024: 0.78 against 0.63 ms), so tiles of up to 32 rows only
    MMA_ORDER: tl.constexpr = KPERM and BLOCK_M <= 32
    k_len = K_DIM // SPLIT_K  # the pruner keeps configs with BLOCK_K dividing it
    for k0 in range(split * k_len, split * k_len + k_len, BLOCK_K):
        if MMA_ORDER:
            offs_k = k0 + mma_k_order(BLOCK_K)
        else:
            offs_k = k0 + tl.arange(0, BLOCK_K)
        # compiled 16-bit activations: PTX table decode (nf4_decode._lut_pairs_asm); else the fp32
        # select tree
        wg = dequant_operand(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, w_rows, n_mask, k0, K_DIM, BS, BS2, NESTED,
                             BLOCK_K, dt, LUT, INTERPRET, MMA_ORDER)
        xt = tl.load(x_ptr + x_rows[None, :] * stride_xm + offs_k[:, None] * stride_xk, mask=m_mask[None, :], other=0.0)
        if INTERPRET:  # the interpreter's bf16 dot is wrong: fp32 operands there only
            xt = xt.to(tl.float32)
        acc = tl.dot(wg, xt, acc)
        if GATED:
            wu = dequant_operand(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, w_rows + N, n_mask, k0, K_DIM, BS, BS2,
                                 NESTED, BLOCK_K, dt, LUT, INTERPRET, MMA_ORDER)
            acc_up = tl.dot(wu, xt, acc_up)
        if HAS_LORA and not XA_PRE:
            a = tl.load(la_ptr + (e64 * R + offs_r[:, None]) * K_DIM + offs_k[None, :], mask=r_mask[:, None], other=0.0)
            a = dot_operand(a, dt, INTERPRET)
            acc_xa = tl.dot(a, xt, acc_xa)

    if SPLIT_K > 1:  # the last split of this tile to arrive sums all partials in split order, then the epilogue
        acc, acc_up, acc_xa, last = split_k_reduce(
            acc, acc_up, acc_xa, ws_ptr, cnt_ptr, split, pid_m * tl.cdiv(N, BLOCK_N) + pid_n, 2 * N + pid_n * R_PAD,
            offs_m, m_mask, offs_n, n_mask, offs_r, N, P, WS_W, GATED, HAS_LORA and not XA_PRE, SPLIT_K)
        if not last:
            return

    if HAS_LORA:
        if XA_PRE:  # X·Aᵀ precomputed once per row (lora_xa.py), not per N tile; partials summed in order
            for s in range(XA_SPLIT):
                acc_xa += tl.load(xa_ptr + (s * P + offs_m[None, :].to(tl.int64)) * R_PAD + offs_r[:, None],
                                  mask=m_mask[None, :], other=0.0)
        xa = dot_operand(acc_xa.to(dt), dt, INTERPRET)  # rounded to dt once, as a dt operand would be
        b = tl.load(lb_ptr + w_rows[:, None] * R + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        b = dot_operand(b, dt, INTERPRET)
        acc += scaling * tl.dot(b, xa)
        if GATED:
            bu = tl.load(lb_ptr + (w_rows[:, None] + N) * R + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :],
                         other=0.0)
            bu = dot_operand(bu, dt, INTERPRET)
            acc_up += scaling * tl.dot(bu, xa)

    if WRITE_GU:  # training: the backward's SwiGLU derivative needs the pre-activations
        gu_ptrs = gu_ptr + offs_m[None, :].to(tl.int64) * (2 * N) + offs_n[:, None]
        gu_mask = n_mask[:, None] & m_mask[None, :]
        tl.store(gu_ptrs, acc.to(gu_ptr.dtype.element_ty), mask=gu_mask)
        tl.store(gu_ptrs + N, acc_up.to(gu_ptr.dtype.element_ty), mask=gu_mask)
    if not WRITE_OUT:
        return
    if GATED:
        acc = act_fwd(acc, ACT) * acc_up
    if SCATTER:
        wt = tl.load(topw_ptr + pair, mask=m_mask, other=0.0).to(tl.float32)
        acc = acc * wt[None, :]
        out_rows = pair.to(tl.int64)
    else:
        out_rows = offs_m.to(tl.int64)
    out_ptrs = out_ptr + out_rows[None, :] * stride_om + offs_n[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def use_kperm() -> bool:
    """Weight tiles decoded in MMA k order (``NF4MOE_KPERM=0``: natural order, for comparison)."""
    return env("NF4MOE_KPERM", "1") == "1"


def use_k_hint() -> bool:
    """``NF4MOE_WGMMA_PIPE=1`` tells the compiler the K loop runs at least once (the pruner guarantees it).
    Without the hint LLVM keeps a path that skips the loop and zero-fills the accumulators, and ptxas (seen
    with ptxas 13.4 for sm_90a, on SASS compiled on the CPU) then serializes every wgmma of most configs
    (``C7515: wgmma.mma_async instructions are serialized``: each HGMMA waited on at once, so the decode
    never overlaps the tensor cores).  With it no config is serialized, some spill a little.  Measured on an
    H100 (bench/NOTES.md v16): no faster (GEMMs T=8192 -1%, DeepSeek-V3 +3%): the wgmmas were not the wait
    (v17), so it stays opt-in."""
    return env("NF4MOE_WGMMA_PIPE", "0") == "1"


def wgmma_min_rows() -> int:
    """Routed rows from which the Gluon GEMM (grouped_gemm_wgmma.py) runs instead of this kernel, where it
    applies (``NF4MOE_WGMMA_ROWS``, default 8192; 0 turns it off).  Measured on an H200 (bench/NOTES.md v23):
    GEMMs 1.16x faster at 8192 routed rows (Qwen3-30B-A3B T=1024), 1.14x at 65536 (T=8192), DeepSeek-V3
    T=8192 1.22x; fewer rows were not measured, so they keep this kernel."""
    raw = env("NF4MOE_WGMMA_ROWS", "8192")
    if not raw.strip().isdigit():
        raise ValueError(f"NF4MOE_WGMMA_ROWS must be a row count >= 0 (0: off), got {raw!r}")
    return int(raw)


# Mean routed rows per expert below which the Gluon GEMM's 128-row tiles would be mostly padding and the Triton
# GEMM's autotuned smaller tiles win: measured on an H200 (bench/NOTES.md v25) at 32 rows per expert, DeepSeek-V3
# T=1024 8.31 ms (Gluon) against 7.48 (Triton, session 5); at 64 (Qwen3-30B-A3B T=1024) the Gluon GEMM is 1.16x
# faster.
WGMMA_ROWS_PER_EXPERT = 64


def use_wgmma(x: torch.Tensor, w: NF4Operand, rows: int, launcher) -> bool:
    """The Gluon GEMM takes eager launches on Hopper (the direct path, or the registered op's body run eagerly,
    e.g. under autograd) with 16-bit activations through the PTX table decode, unit-stride 16-byte-aligned
    activation rows, K a multiple of 64 and a blocksize that 64 divides, from ``wgmma_min_rows()`` routed
    rows on and ``WGMMA_ROWS_PER_EXPERT`` per expert on average (unless ``NF4MOE_WGMMA_ROWS=1`` forces it).
    Traced launches (torch.compile, fake tensors, dispatch modes) and everything else take this kernel."""
    min_rows = wgmma_min_rows()
    if not min_rows or rows < min_rows or not x.is_cuda or not use_lut(x.dtype):
        return False
    if min_rows > 1 and rows < WGMMA_ROWS_PER_EXPERT * w.packed.shape[0]:
        return False
    if launcher is not None and (torch.compiler.is_compiling() or type(x) is not torch.Tensor
                                 or _current_mode() is not None):
        return False
    if not hopper(x.device.index) or not gluon_available():
        return False
    return (x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
            and w.packed.shape[2] % 32 == 0 and w.blocksize % 64 == 0)


@functools.cache
def hopper(device_index: int) -> bool:
    """Whether CUDA device ``device_index`` is sm_90 (cached: the capability query costs host time on every
    eager call otherwise)."""
    return torch.cuda.get_device_capability(device_index) == (9, 0)


@functools.cache
def gluon_available() -> bool:
    """Triton ships Gluon's Hopper API (3.6 and later)."""
    import importlib.util

    return importlib.util.find_spec("triton.experimental.gluon.language.nvidia.hopper") is not None


def lora_precompute(rows: int) -> bool:
    """LoRA X·Aᵀ by its own kernel (lora_xa.py) before the GEMM, or inside the GEMM's K loop.  Precomputed
    above 64 routed rows (once per row instead of once per N tile: -12% GEMM time at T=128, NOTES.md v5);
    in the loop at decode sizes, where the GEMM time was the same (T=1: 56 against 57 us) and the extra
    launch costs host time.  ``NF4MOE_XA_PRE=1`` / ``0`` forces one form."""
    mode = env("NF4MOE_XA_PRE", "auto")
    return rows > 64 if mode == "auto" else mode == "1"


def split_k(rows: int, k_dim: int, training: bool, launcher) -> int:
    """K splits of the GEMM: ``NF4MOE_SPLIT_K`` (default 1: none) for inference calls of up to 64 routed rows,
    eager or under CUDA graphs (not traced: the arrival counters are state kept across launches), reduced
    until the K step of 32 (the fallback config's) divides K / splits.  At T=1 the up projection runs 96
    programs of 16 K steps on 132 SMs (Qwen3-30B-A3B); splitting K gives 2-4x the programs with a fixed-order
    reduction.  Measured on an H200 (bench/NOTES.md v22): slower (T=1 GEMMs 44.7 us unsplit, 52.9 / 49.6 us
    with 2 / 4 splits), so it stays opt-in."""
    raw = env("NF4MOE_SPLIT_K", "1")
    s = int(raw) if raw.strip().isdigit() else 0
    if s < 1 or s & (s - 1):
        raise ValueError(f"NF4MOE_SPLIT_K must be a power of two >= 1 (1: no split), got {raw!r}")
    if training or launcher is not None or not 0 < rows <= 64:
        return 1
    while s > 1 and k_dim % (32 * s):
        s //= 2
    return s


_COUNTERS: dict = {}  # (device, stream) -> int32 arrival counters for split-K (zero between launches)


def split_k_counters(device: torch.device, size: int, traced: bool = False) -> torch.Tensor:
    """Zeroed int32 arrival counters, at least ``size``.  Kept per device and stream (launches on one stream
    run one after another and each leaves them zero; two streams must not share them); while a CUDA graph
    is being captured, a fresh zeroed buffer owned by that graph.  ``traced`` (a launch through wrap_triton,
    under torch.compile): a fresh zeroed buffer too, part of the traced graph; a cached one would hold the
    first trace's fake tensor, which Inductor's lowering, under another fake mode, refuses ("Mixing fake
    modes", an H100 run in session 21)."""
    on_gpu = device.type == "cuda"
    if traced or (on_gpu and torch.cuda.is_current_stream_capturing()):
        return torch.zeros(size, device=device, dtype=torch.int32)
    stream = torch.cuda.current_stream(device).cuda_stream if on_gpu else None
    buf = _COUNTERS.get((device, stream))
    if buf is None or buf.numel() < size:
        buf = _COUNTERS[(device, stream)] = torch.zeros(max(size, 4096), device=device, dtype=torch.int32)
    return buf


def use_lut(dtype: torch.dtype) -> bool:
    """PTX table decode for compiled code with 16-bit activations; ``NF4MOE_LUT=0`` selects the fp32
    select tree instead (bit-exact weights, slower)."""
    return (not INTERPRET and dtype in (torch.bfloat16, torch.float16)
            and env("NF4MOE_LUT", "1") == "1")


def projection_meta(x: torch.Tensor, w: NF4Operand, *, top_k: int, r_pad: int, gated: bool, act: str,
                    has_lora: bool) -> dict:
    """The constexprs the GEMM and the GEMV kernels share for one projection."""
    return dict(
        TOP_K=top_k, E_POW2=pow2(w.packed.shape[0]), R_PAD=r_pad,
        GATED=gated, ACT=ACT_CODES[act], GATHER=gated, SCATTER=not gated,
        HAS_LORA=has_lora, NESTED=w.nested, BS=w.blocksize, BS2=w.blocksize2, LUT=use_lut(x.dtype),
    )


def launch_key(kind: str, n: int, bucket: int, x: torch.Tensor, w: NF4Operand, out: torch.Tensor,
               lora_b: torch.Tensor | None, meta: dict) -> tuple:
    """configs.launch_tuned's key: every value the kernel's autotuner keys on or prunes by, and more.  Not the
    switches that graph captures turn on by default (configs.graph_flag: the PDL switch of launch.pdl_options, the
    GEMV's XA_EARLY): a launch with them reuses the config tuned without them, the same tiles and so the same
    bits; a capture, where no autotuning can run, finds the config its eager calls tuned; and an A/B timing
    compares the switch, not two autotuner choices."""
    return (kind, n, 2 * w.packed.shape[2], bucket, x.dtype, out.dtype, w.absmax.dtype,
            lora_b.dtype if lora_b is not None else None,
            *(v for k, v in meta.items() if k not in _UNKEYED))


_UNKEYED = frozenset(("PDL", "launch_pdl", "XA_EARLY"))  # launch_key leaves these out


def grid(n: int, rows: int, num_experts: int):
    """GEMM and GEMV grid (the GEMV has no SPLIT_K; its programs take TILES N tiles each).  Row tiles are padded
    per expert (common.expert_row_tile), hence min(E, P) more of them; one-row tiles need no padding (tile i is
    sorted row i), and at decode sizes those surplus programs, which only exit, were half of the GEMV's grid."""
    return lambda meta: (cdiv(n, meta["BLOCK_N"] * meta.get("TILES", 1)) * meta.get("SPLIT_K", 1),
                         cdiv(rows, meta["BLOCK_M"]) + (min(num_experts, rows) if meta["BLOCK_M"] > 1 else 0))


def _combined(out: torch.Tensor, combine, num_experts: int, launcher) -> torch.Tensor:
    """``out``, or with ``combine`` = (comb, top_k_index) its slot rows summed per token by the combine kernel."""
    return out if combine is None else launch_combine(out, combine[1], combine[0], num_experts, launcher)


def launch_nf4_moe_gemm(
    x: torch.Tensor,
    w: NF4Operand,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scaling: float,
    sorted_pair_ids: torch.Tensor,
    expert_offsets: torch.Tensor,
    top_k_weights: torch.Tensor | None,
    out: torch.Tensor,
    *,
    n: int,
    top_k: int,
    gated: bool,
    act: str = "silu",
    xa_pre: bool | None = None,
    gu: torch.Tensor | None = None,
    xa_out: torch.Tensor | None = None,
    write_out: bool = True,
    combine: tuple[torch.Tensor, torch.Tensor] | None = None,
    tiles: dict | None = None,
    xa_pairs: torch.Tensor | None = None,
    launcher=None,
) -> torch.Tensor:
    """Launch the kernel; ``launcher`` wraps it (``torch.library.wrap_triton``) when traced.  Returns ``out``,
    or with ``combine`` its (T, N) buffer.

    Training extras (up projection only): ``gu`` (P, 2N) receives the pre-activation gate|up rows,
    ``xa_out`` (P, R_PAD) fp32 the LoRA X·Aᵀ the epilogue used; ``write_out=False`` skips ``out``
    (recompute mode needs only the pre-activations).
    ``combine`` = (comb (T, N), top_k_index (T, K) contiguous), down projection only: each token's slot rows
    of ``out`` summed into ``comb`` in slot order (combine.py): inside the decode GEMV where it runs (eager
    calls, launch_nf4_moe_gemv), else by the combine kernel after the projection.
    ``tiles``: a dict shared by the projections of one layer call (same ``expert_offsets``): the Gluon GEMM's
    row-tile tables (tile_table.py) are built by the first and reused by the second, one launch fewer per call.
    ``xa_pairs``: the up projection's LoRA X·Aᵀ by pair id from the routing launch (routing.launch_routing_xa),
    taken by the decode GEMV (the inference path up to gemv_max_rows rows) and not used otherwise.
    """
    packed, absmax = w.packed, w.absmax
    num_experts, n_total, half_k = packed.shape
    k_dim = 2 * half_k
    rows = sorted_pair_ids.numel()
    has_lora = lora_a is not None and lora_a.shape[1] > 0
    r = lora_a.shape[1] if has_lora else 0
    dummy = absmax  # placeholder pointer for unused arguments
    rp = r_pad(r)
    xa = None
    training = gu is not None or xa_out is not None or not write_out
    if combine is not None and (gated or training):
        raise ValueError("launch_nf4_moe_gemm: combine is for the down projection's inference pass")
    if not training and gemv_takes(rows):
        fused = launch_nf4_moe_gemv(x, w, lora_a if has_lora else None, lora_b, scaling, sorted_pair_ids,
                                    expert_offsets, top_k_weights, out, n=n, top_k=top_k, gated=gated, act=act,
                                    combine=combine, xa_pairs=xa_pairs, launcher=launcher)
        return combine[0] if fused else _combined(out, combine, num_experts, launcher)
    wgmma = use_wgmma(x, w, rows, launcher)
    if xa_pre is None or wgmma:  # the Gluon GEMM always takes X·Aᵀ precomputed
        xa_pre = wgmma or lora_precompute(rows)
    if has_lora and (xa_pre or xa_out is not None):
        xa = launch_lora_xa(x, lora_a, sorted_pair_ids, expert_offsets, top_k=top_k, gather=gated, r_pad=rp,
                            out=xa_out, launcher=launcher)
    if wgmma:
        from .grouped_gemm_wgmma import TILES, launch_nf4_moe_gemm_wgmma, split_remainders, tile_shape
        from .tile_table import launch_tile_table

        block_m, tile_n = tile_shape(rows, num_experts)
        small = TILES["128x256"] if block_m == 256 and split_remainders() else None
        tkey = (block_m, small[0] if small else 0)
        tables = tiles.get(tkey) if tiles is not None else None
        if tables is None:
            tables = launch_tile_table(expert_offsets, rows, block_m, small=tkey[1])
            if tiles is not None:
                tiles[tkey] = tables
        xa3 = xa if xa is None or xa.dim() == 3 else xa.unsqueeze(0)
        launches = [(tables[0], block_m, tile_n)] + ([(tables[1], *small)] if small else [])
        for table, bm, tn in launches:  # full tiles; then the remainders in tiles of their own
            launch_nf4_moe_gemm_wgmma(
                x, w, lora_b, scaling, xa3, sorted_pair_ids, table, top_k_weights, out, n=n, top_k=top_k,
                gated=gated, act_code=ACT_CODES[act], r=r, r_pad=rp, block_m=bm, tile_n=tn, gu=gu,
                write_out=write_out)
        return _combined(out, combine, num_experts, launcher)
    bucket = row_bucket(rows)
    splits = split_k(rows, k_dim, training, launcher)
    ws = cnt = dummy
    ws_w = 2 * n + cdiv(n, 16) * rp  # gate | up | one X·Aᵀ slot per N tile (BLOCK_N >= 16)
    if splits > 1:
        ws = torch.empty(splits, rows, ws_w, device=x.device, dtype=torch.float32)
        cnt = split_k_counters(x.device, (cdiv(rows, 16) + min(num_experts, rows)) * cdiv(n, 16),
                              launcher is not None)
    meta = dict(projection_meta(x, w, top_k=top_k, r_pad=rp, gated=gated, act=act, has_lora=has_lora),
                INTERPRET=INTERPRET, XA_PRE=xa is not None, WRITE_GU=gu is not None, WRITE_OUT=write_out,
                KPERM=use_kperm(), K_HINT=use_k_hint(), SPLIT_K=splits, **pdl_options(x, launcher))
    key = launch_key("gemm", n, bucket, x, w, out, lora_b if has_lora else None, meta)
    launch_tuned(
        nf4_moe_gemm_kernel, grid(n, rows, num_experts), key, launcher,
        x, x.stride(0), x.stride(1),
        *w.pointer_args(),
        lora_a.contiguous() if has_lora else dummy, lora_b if has_lora else dummy, float(scaling),
        xa if xa is not None else dummy, xa.shape[0] if xa is not None and xa.dim() == 3 else 1,
        gu if gu is not None else dummy,
        out, out.stride(0),
        sorted_pair_ids, expert_offsets,
        top_k_weights if top_k_weights is not None else dummy,
        ws, cnt, ws_w,
        n, k_dim, n_total, num_experts, r, rows, bucket,
        **meta,
    )
    return _combined(out, combine, num_experts, launcher)

