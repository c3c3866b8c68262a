"""Routing metadata on the device, without a host synchronisation.

Pairs p = t*K + k are sorted by expert id with one stable sort of clamped ids: ids < 0 sort first (so
``expert_offsets[0]`` counts them: a caller can assert it is 0 asynchronously), sentinels >= E last, and
``expert_offsets[e]`` is the number of pairs whose clamped id is below e.  Every shape depends only on T,
K and E, so the call can be captured in a CUDA graph and traced by torch.compile.

Three paths give bit-identical results:

- up to ``TRITON_MAX_PAIRS`` pairs, one Triton program (``routing_kernel``) does it all in one launch.  At
  small T the layer is host-bound and the torch path below costs about seven op dispatches (reshape,
  clamp, cast, sort, arange, searchsorted, cast), more host time than the whole GPU work of routing.
- up to ``CHUNKED_MAX_PAIRS``, a counting sort over chunks of ``CHUNK`` pairs in two launches: per chunk a
  histogram of expert ids (``routing_count_kernel``), then per chunk the prefix over earlier chunks and a
  bitonic sort of the chunk's keys, which gives each pair its stable position (``routing_scatter_kernel``).
  Two launches instead of the torch path's seven dispatches plus the radix sort's own (prefill sizes,
  T = 128 ... 16384 for top-8, where an eager call is still host-bound on slow hosts).
- above it, torch's stable sort + searchsorted.

The Triton path sorts unique int32 keys ``(clamped_id + 1) * P_POW2 + p`` (unique, so the bitonic
``tl.sort``, which is not stable, gives the stable order) and counts ids per expert with
``tl.histogram`` + ``cumsum``.  Memory: the one-program kernel needs no buffer beyond the two outputs (the keys
live in registers); the chunked sort two (chunks, bins) int32 scratch tensors (2 * 256 * 256 * 4 bytes at most
for 128 experts).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import dot_operand, pdl_enter
from .host import INTERPRET, cdiv, pow2, xa_block_k, xa_split
from .launch import launch, pdl_options

# One program sorts at most this many pairs (keys in registers).  Why 1024, measured on an H100 (Qwen3-30B-A3B
# layer): the one-program bitonic sort took 2.1 us at P=8 and 8 us at P=1024 (torch's radix sort alone 18 us
# there), but 189 us at P=8192, where torch's radix sort over the whole GPU takes ~30 us; above it the chunked
# sort keeps each program's sort at 1024 keys.
TRITON_MAX_PAIRS = 1024
# The chunked counting sort: pairs per chunk (one program each) and the most pairs it takes (every program
# reads all chunks' histograms, so its work grows with the square of the chunk count).
CHUNK = 1024
CHUNKED_MAX_PAIRS = 256 * CHUNK
_MAX_BINS = 4096
_MAX_PREFIX_READS = 1 << 24  # int32 histogram entries all programs read together (64 MiB, mostly from L2)
# Smallest sorted width: one compiled variant covers every P up to it, and a 128-key sort is free.
_MIN_P_POW2 = 128
_INTERPRET = INTERPRET
NEGATIVE_IDS = "top_k_index has negative expert ids; ids must be >= 0 (ids >= E are sentinels)"
_NEGATIVE_IDS_MSG = tl.constexpr(NEGATIVE_IDS)  # the kernels' copy (a jit function reads constexpr globals only)


@triton.jit
def _buckets(idx_ptr, offs, P, E, CHECK: tl.constexpr = False):
    """Bucket of each pair: 0 for a negative id, id + 1, E + 1 for a sentinel and for padding past P (whose
    pair index >= P then sorts it after every real sentinel).  CHECK: a device-side assert on negative ids
    (compiled only with the ``debug`` option, which launch_routing sets with it)."""
    valid = offs < P
    ids = tl.load(idx_ptr + offs, mask=valid, other=0)
    if CHECK:
        tl.device_assert(ids >= 0, _NEGATIVE_IDS_MSG)
    # Clamp in the input dtype: narrowing a huge int64 sentinel first would wrap it into range.
    bucket = (tl.minimum(tl.maximum(ids, -1), E) + 1).to(tl.int32)
    return tl.where(valid, bucket, E + 1)


@triton.jit
def routing_kernel(
    idx_ptr,    # (P,) expert ids, int32 or int64, contiguous (the flattened (T, K) top_k_index)
    pairs_ptr,  # (P,) int32 out: pair ids sorted by clamped expert id, stable
    eoff_ptr,   # (E + 1,) int32 out: eoff[e] = number of pairs with clamped id < e
    P, E,
    P_POW2: tl.constexpr, NUM_BINS: tl.constexpr, CHECK: tl.constexpr, PDL: tl.constexpr,
):
    """Grid: (1,).  One program: P <= P_POW2 keys in registers, NUM_BINS = next_pow2(E + 2) > E + 1."""
    pdl_enter(PDL)
    _sort_pairs(idx_ptr, pairs_ptr, eoff_ptr, P, E, P_POW2, NUM_BINS, CHECK)


@triton.jit
def routing_xa_kernel(
    idx_ptr, pairs_ptr, eoff_ptr,  # as routing_kernel's
    x_ptr,      # (T, K_DIM) hidden_states, fp16/bf16/fp32
    stride_xm, stride_xk,
    a_ptr,      # (E, R, K_DIM) LoRA A of the up projection, contiguous
    xa_ptr,     # (SPLIT, P, R_PAD) fp32 out: partial X·Aᵀ over K slices, indexed by pair id (dropped pairs: unwritten)
    P, E, R, K_DIM, K_SLICE, SPLIT,
    P_POW2: tl.constexpr, NUM_BINS: tl.constexpr, CHECK: tl.constexpr, TOP_K: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_K: tl.constexpr, INTERPRET: tl.constexpr, PDL: tl.constexpr,
):
    """Grid: (1 + P * SPLIT,).  Program 0 sorts (routing_kernel); program 1 + p * SPLIT + s sums
    x[p // TOP_K, k] * A[e_p, :, k] over K slice s (A rounded to x's dtype as lora_xa's tl.dot operands are,
    fp32 under the interpreter as there; fp32 sums).  No program waits for another: by pair id, X·Aᵀ needs no sorted order."""
    pdl_enter(PDL)
    pid = tl.program_id(0)
    if pid == 0:
        _sort_pairs(idx_ptr, pairs_ptr, eoff_ptr, P, E, P_POW2, NUM_BINS, CHECK)
    else:
        p = (pid - 1) // SPLIT
        s = (pid - 1) % SPLIT
        e = tl.load(idx_ptr + p)
        if (e >= 0) & (e < E):
            offs_r = tl.arange(0, R_PAD)
            r_mask = offs_r < R
            dt = x_ptr.dtype.element_ty
            x_row = x_ptr + (p // TOP_K).to(tl.int64) * stride_xm
            a_rows = a_ptr + (e.to(tl.int64) * R + offs_r[:, None]) * K_DIM
            acc = tl.zeros((R_PAD,), dtype=tl.float32)
            for k0 in range(s * K_SLICE, (s + 1) * K_SLICE, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                xv = tl.load(x_row + offs_k * stride_xk).to(tl.float32)
                av = tl.load(a_rows + offs_k[None, :], mask=r_mask[:, None], other=0.0)
                av = dot_operand(av, dt, INTERPRET).to(tl.float32)
                acc += tl.sum(av * xv[None, :], axis=1)
            tl.store(xa_ptr + (s * P + p).to(tl.int64) * R_PAD + offs_r, acc)


@triton.jit
def _sort_pairs(idx_ptr, pairs_ptr, eoff_ptr, P, E, P_POW2: tl.constexpr, NUM_BINS: tl.constexpr,
                CHECK: tl.constexpr):
    """routing_kernel's one program: the stable sort of the pairs by clamped id and the expert offsets."""
    offs = tl.arange(0, P_POW2)
    bucket = _buckets(idx_ptr, offs, P, E, CHECK)
    # Unique keys, so the (unstable) bitonic sort gives pairs of one expert in pair order.
    keys = tl.sort(bucket * P_POW2 + offs)
    tl.store(pairs_ptr + offs, keys & (P_POW2 - 1), mask=offs < P)
    # Every bucket is in [0, NUM_BINS): no mask needed (older Triton has no histogram mask, and the warp
    # ballot histogram would alias an out-of-range value onto a bin).
    below = tl.cumsum(tl.histogram(bucket, NUM_BINS), 0)  # below[b] = pairs with bucket <= b
    bins = tl.arange(0, NUM_BINS)
    tl.store(eoff_ptr + bins, below, mask=bins <= E)


@triton.jit
def routing_count_kernel(
    idx_ptr,    # (P,) expert ids, int32 or int64, contiguous
    cnt_ptr,    # (C, NUM_BINS) int32 out: per chunk, pairs per bucket (padding counted as sentinels)
    P, E,
    CH: tl.constexpr, NUM_BINS: tl.constexpr, CHECK: tl.constexpr,
):
    """Grid: (C,) = (cdiv(P, CH),).  Histogram of one chunk's buckets."""
    c = tl.program_id(0)
    bucket = _buckets(idx_ptr, c * CH + tl.arange(0, CH), P, E, CHECK)
    tl.store(cnt_ptr + c * NUM_BINS + tl.arange(0, NUM_BINS), tl.histogram(bucket, NUM_BINS))


@triton.jit
def routing_scatter_kernel(
    idx_ptr,    # (P,) expert ids, int32 or int64, contiguous
    cnt_ptr,    # (C, NUM_BINS) int32: routing_count_kernel's histograms
    base_ptr,   # (C, NUM_BINS) int32 scratch: per chunk and bucket, output position minus sorted index
    pairs_ptr,  # (P,) int32 out: pair ids sorted by clamped expert id, stable
    eoff_ptr,   # (E + 1,) int32 out: eoff[e] = number of pairs with clamped id < e
    P, E, C,
    CH: tl.constexpr, NUM_BINS: tl.constexpr, CB: tl.constexpr,
):
    """Grid: (C,).  Chunk c's pairs go to start[b] (pairs of smaller buckets) + earlier chunks' pairs of b +
    their rank among the chunk's pairs of b, which the chunk's sorted unique keys give in pair order."""
    c = tl.program_id(0)
    bins = tl.arange(0, NUM_BINS)
    total = tl.zeros((NUM_BINS,), dtype=tl.int32)
    before = tl.zeros((NUM_BINS,), dtype=tl.int32)
    for c0 in range(0, C, CB):
        rows = c0 + tl.arange(0, CB)
        h = tl.load(cnt_ptr + rows[:, None] * NUM_BINS + bins[None, :], mask=rows[:, None] < C, other=0)
        total += tl.sum(h, 0)
        before += tl.sum(tl.where(rows[:, None] < c, h, 0), 0)
    mine = tl.load(cnt_ptr + c * NUM_BINS + bins)
    below = tl.cumsum(total, 0)  # pairs with bucket <= b, over all chunks
    base = below - total + before - (tl.cumsum(mine, 0) - mine)
    tl.store(base_ptr + c * NUM_BINS + bins, base)
    if c == 0:
        tl.store(eoff_ptr + bins, below, mask=bins <= E)
    tl.debug_barrier()  # base is read back below by other threads of this program
    offs = tl.arange(0, CH)
    bucket = _buckets(idx_ptr, c * CH + offs, P, E)
    keys = tl.sort(bucket * CH + offs)
    local = keys % CH
    pos = tl.load(base_ptr + c * NUM_BINS + keys // CH) + offs
    tl.store(pairs_ptr + pos, c * CH + local, mask=c * CH + local < P)


def _check_options(check: bool) -> dict:
    """Compile options for CHECK: ``debug`` compiles device_assert in; the integer-overflow checks that debug
    would add too stay off (every key and count fits in int32 by triton_fits)."""
    return dict(debug=check, sanitize_overflow=False)


def _launch_chunked(top_k_index, num_experts, sorted_pair_ids, expert_offsets, launcher, check) -> None:
    p = top_k_index.numel()
    chunks = cdiv(p, CHUNK)
    bins = pow2(num_experts + 2)
    # two tensors, not views of one: the first kernel writes counts, the second reads it and writes base
    counts = torch.empty(chunks, bins, device=top_k_index.device, dtype=torch.int32)
    base = torch.empty(chunks, bins, device=top_k_index.device, dtype=torch.int32)
    ids = top_k_index.contiguous()
    launch(routing_count_kernel, (chunks,), launcher, ids, counts, p, num_experts, CH=CHUNK, NUM_BINS=bins,
           CHECK=check, num_warps=4, **_check_options(check))
    launch(routing_scatter_kernel, (chunks,), launcher, ids, counts, base, sorted_pair_ids, expert_offsets,
           p, num_experts, chunks, CH=CHUNK, NUM_BINS=bins, CB=max(1, min(pow2(chunks), 8192 // bins)),
           num_warps=4)


def triton_fits(num_pairs: int, num_experts: int) -> bool:
    """Whether the Triton kernels take this size: the one-program kernel up to TRITON_MAX_PAIRS pairs (int32
    keys (E + 2) * P_POW2 must fit); the chunked counting sort up to CHUNKED_MAX_PAIRS pairs with at most
    _MAX_BINS buckets (its histograms live in registers) and a bounded prefix read (every program reads all
    chunks' histograms: chunks**2 * bins <= _MAX_PREFIX_READS, so many experts lower the pair limit)."""
    if num_pairs <= 0:
        return False
    if num_pairs <= TRITON_MAX_PAIRS:
        return (num_experts + 2) * max(_MIN_P_POW2, pow2(num_pairs)) <= 2**31
    chunks, bins = cdiv(num_pairs, CHUNK), pow2(num_experts + 2)
    return num_pairs <= CHUNKED_MAX_PAIRS and bins <= _MAX_BINS and chunks * chunks * bins <= _MAX_PREFIX_READS


def _check_index_dtype(top_k_index: torch.Tensor) -> None:
    if top_k_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"top_k_index must be int32 or int64, got {top_k_index.dtype}")


def _one_program(p: int, num_experts: int, check: bool) -> dict:
    """The constexprs and options of the one-program sort (routing_kernel, routing_xa_kernel's program 0)."""
    p_pow2 = max(_MIN_P_POW2, pow2(p))
    # 16 keys per thread at the threshold (8192 / (16 warps * 32 lanes)): no register spills.
    return dict(P_POW2=p_pow2, NUM_BINS=pow2(num_experts + 2), CHECK=check, num_warps=min(16, max(4, p_pow2 // 512)),
                **_check_options(check))


def launch_routing(top_k_index: torch.Tensor, num_experts: int, sorted_pair_ids: torch.Tensor | None = None,
                   expert_offsets: torch.Tensor | None = None, launcher=None, check: bool = False,
                   pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill ``sorted_pair_ids`` (P,) and ``expert_offsets`` (E+1,) int32 (allocated when None); one launch up
    to TRITON_MAX_PAIRS pairs, two above (the chunked counting sort).  ``check``: the (first) kernel asserts
    on the device that no id is negative (CUDA and direct launches only: see ops.route)."""
    if check and (launcher is not None or not top_k_index.is_cuda):
        raise ValueError("launch_routing: check=True needs a CUDA top_k_index and a direct launch (launcher=None)")
    _check_index_dtype(top_k_index)
    p = top_k_index.numel()
    if not triton_fits(p, num_experts):
        raise ValueError(f"routing kernels take 1..{CHUNKED_MAX_PAIRS} pairs, int32 keys and above "
                         f"{TRITON_MAX_PAIRS} pairs at most {_MAX_BINS - 2} experts and a bounded prefix read "
                         f"(routing.triton_fits); got P={p}, E={num_experts}")
    dev = top_k_index.device
    if sorted_pair_ids is None:
        sorted_pair_ids = torch.empty(p, device=dev, dtype=torch.int32)
    if expert_offsets is None:
        expert_offsets = torch.empty(num_experts + 1, device=dev, dtype=torch.int32)
    if p > TRITON_MAX_PAIRS:
        _launch_chunked(top_k_index, num_experts, sorted_pair_ids, expert_offsets, launcher, check)
        return sorted_pair_ids, expert_offsets
    launch(routing_kernel, (1,), launcher, top_k_index.contiguous(), sorted_pair_ids, expert_offsets, p, num_experts,
           **_one_program(p, num_experts, check), **pdl_options(pdl, launcher))
    return sorted_pair_ids, expert_offsets


def launch_routing_xa(top_k_index: torch.Tensor, num_experts: int, x: torch.Tensor, lora_a: torch.Tensor, r_pad: int,
                      check: bool = False, pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """launch_routing's one-program sort and, in the same launch, the up projection's LoRA X·Aᵀ of every pair:
    (sorted_pair_ids, expert_offsets, xa (split, P, r_pad) fp32 partials indexed by pair id).  Direct launches
    only (the decode path of an eager inference call), P <= TRITON_MAX_PAIRS."""
    _check_index_dtype(top_k_index)
    p = top_k_index.numel()
    if not 0 < p <= TRITON_MAX_PAIRS or not triton_fits(p, num_experts):
        raise ValueError(f"launch_routing_xa takes 1..{TRITON_MAX_PAIRS} pairs (routing.triton_fits); got P={p}")
    if check and not top_k_index.is_cuda:
        raise ValueError("launch_routing_xa: check=True needs a CUDA top_k_index")
    num_e, r, k_dim = lora_a.shape
    if num_e != num_experts or x.shape[1] != k_dim or r > r_pad:
        raise ValueError(f"launch_routing_xa: lora_a {tuple(lora_a.shape)} does not fit {num_experts} experts, "
                         f"x {tuple(x.shape)} and r_pad {r_pad}")
    dev = top_k_index.device
    pairs = torch.empty(p, device=dev, dtype=torch.int32)
    offsets = torch.empty(num_experts + 1, device=dev, dtype=torch.int32)
    block_k = xa_block_k(k_dim)
    split = xa_split(k_dim, p, block_k)
    xa = x.new_empty(split, p, r_pad, dtype=torch.float32)
    launch(
        routing_xa_kernel, (1 + p * split,), None, top_k_index.contiguous(), pairs, offsets,
        x, x.stride(0), x.stride(1), lora_a.contiguous(), xa, p, num_experts, r, k_dim, k_dim // split, split,
        TOP_K=top_k_index.shape[1], R_PAD=r_pad, BLOCK_K=block_k, INTERPRET=_INTERPRET,
        **_one_program(p, num_experts, check), **pdl_options(pdl, None),
    )
    return pairs, offsets, xa


def torch_routing(top_k_index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (sorted_pair_ids, expert_offsets) by torch's stable sort + searchsorted: for sizes the kernels
    do not take (``triton_fits``) and for CPU tensors outside the interpreter."""
    flat = top_k_index.reshape(-1)
    if flat.dtype == torch.int64:  # clamp first: a huge int64 sentinel must not wrap when narrowed
        key = flat.clamp(-1, num_experts).to(torch.int32)
    else:
        key = flat.to(torch.int32).clamp(-1, num_experts)
    sorted_key, order = torch.sort(key, stable=True)
    bounds = torch.arange(num_experts + 1, device=flat.device, dtype=torch.int32)
    offsets = torch.searchsorted(sorted_key, bounds, out_int32=True)
    return order.to(torch.int32), offsets


def check_routing_ids(expert_offsets: torch.Tensor) -> None:
    """Negative ids sort before expert 0: expert_offsets[0] counts them.  CPU: raise now; CUDA: an
    asynchronous device assert (no host sync, so CUDA graphs and compile still work)."""
    if expert_offsets.device.type == "cpu" and not torch.compiler.is_compiling():
        if int(expert_offsets[0]) != 0:
            raise ValueError(NEGATIVE_IDS)
    else:
        torch._assert_async(expert_offsets[0] == 0, NEGATIVE_IDS)
