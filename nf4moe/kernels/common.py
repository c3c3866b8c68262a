"""Device helpers shared by the grouped kernels (forward GEMM and GEMV, LoRA X·Aᵀ, transposed NF4 GEMM, LoRA
grads, routing, combine).

Only @triton.jit helpers live here (no kernel, no launcher): the gate activations with their
derivatives, the per-expert row-tile schedule that every grouped kernel uses, and the programmatic
dependent launch entry (``pdl_enter``) of the inference path's kernels, and the slot sum of the combine.
"""
import triton
import triton.language as tl


@triton.jit
def pdl_enter(PDL: tl.constexpr):
    """With PDL (a programmatic dependent launch, launch.pdl_options): wait until the kernels this one depends
    on have finished and their writes are visible, then let the next kernel launch.  Called first thing, before
    any global memory access: a kernel launched this way may start while its predecessor in the stream still
    runs, so nothing may be read (the predecessor's outputs) or written (what it still reads) before the wait.
    Every kernel launched with PDL waits here, so the wait is transitive: when it returns, every earlier kernel
    in the stream has finished (a kernel that skipped it could finish before its own predecessor).  What the
    launch saves is the next kernel's launch and start-up, overlapped with this one's run and tail."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def act_fwd(g, ACT: tl.constexpr):
    """act(g) for ACT 0 silu, 1 gelu (erf), 2 gelu (tanh), 3 relu; fp32 in and out."""
    if ACT == 0:
        return g * tl.sigmoid(g)
    elif ACT == 1:
        return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * tl.sigmoid(2.0 * inner)
    else:
        return tl.maximum(g, 0.0)


@triton.jit
def act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32; the SwiGLU backward needs both at the same point."""
    if ACT == 0:
        sg = tl.sigmoid(g)
        a = g * sg
        da = sg * (1.0 + g * (1.0 - sg))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
        a = g * cdf
        da = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    elif ACT == 2:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        sg = tl.sigmoid(2.0 * inner)  # = 0.5 * (1 + tanh(inner))
        a = g * sg
        d_inner = 0.7978845608028654 * (1.0 + 0.134145 * g * g)
        da = sg + g * 2.0 * sg * (1.0 - sg) * d_inner
    else:
        a = tl.maximum(g, 0.0)
        da = tl.where(g > 0.0, 1.0, 0.0)
    return a, da


@triton.jit
def expert_row_tile(eoff_ptr, pid_m, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, SMALL: tl.constexpr = 0):
    """(expert, first sorted row, end of the expert's rows) of row tile ``pid_m``; expert == E past the end.

    Tiles are padded per expert to BLOCK_M, so a grid of cdiv(P, BLOCK_M) + min(E, P) row tiles always
    covers every expert without a host synchronisation; surplus programs see expert == E and exit.
    SMALL > 0: an expert's last rows, when at most SMALL of them are left after its full tiles, get no tile
    here (tile_table.py gives them a tile of SMALL rows in a table of their own).
    """
    e_ids = tl.arange(0, E_POW2)
    lo = tl.load(eoff_ptr + e_ids, mask=e_ids < E, other=0)
    hi = tl.load(eoff_ptr + e_ids + 1, mask=e_ids < E, other=0)
    if SMALL > 0:
        tiles = (hi - lo) // BLOCK_M + ((hi - lo) % BLOCK_M > SMALL).to(tl.int32)
    else:
        tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    e = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
    tile_start = tl.sum(tl.where(e_ids == e, tiles_end - tiles, 0), 0)
    e_c = tl.minimum(e, E - 1)
    row_lo = tl.load(eoff_ptr + e_c)
    row_hi = tl.load(eoff_ptr + e_c + 1)
    start = row_lo + (pid_m - tile_start) * BLOCK_M
    return e, start, row_hi


@triton.jit
def nested_offset(off_ptr, NESTED: tl.constexpr):
    """The double-quant offset added to every decoded absmax (0 without nesting)."""
    if NESTED:
        return tl.load(off_ptr)
    else:
        return 0.0


@triton.jit
def dot_operand(x, dt, INTERPRET: tl.constexpr):
    """x cast for tl.dot: fp32 under the Triton interpreter (its bf16 dot is wrong), else ``dt``."""
    if INTERPRET:
        return x.to(tl.float32)
    else:
        return x.to(dt)


@triton.jit
def slot_sum(y_ptr, stride_ym, idx_ptr, t, offs, mask, E, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
             CACHE: tl.constexpr):
    """fp32 sum over token ``t``'s slots in slot order of its slot rows y[t * TOP_K + k, offs], skipping slots
    whose expert id is outside [0, E); shared by combine_kernel and the down GEMV's fused combine, so both
    add the same values in the same order.  CACHE: the rows' load cache modifier (no default: Triton 3.6
    passes a jit function's default string unwrapped, which fails to compile)."""
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        eid = tl.load(idx_ptr + t * TOP_K + k)
        if (eid >= 0) & (eid < E):
            acc += tl.load(y_ptr + (t * TOP_K + k) * stride_ym + offs, mask=mask, other=0.0,
                           cache_modifier=CACHE).to(tl.float32)
    return acc
