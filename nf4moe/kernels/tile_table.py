"""Row-tile table of the grouped GEMMs: for each row tile of BLOCK_M sorted rows, its expert and row range.

The Triton GEMMs find their tile's expert themselves (common.expert_row_tile: a cumulative sum over the
experts' tile counts in every program).  The Gluon GEMM (grouped_gemm_wgmma.py) reads it from this table,
built once per projection by one small program, so it needs no scan of its own.  No host synchronisation:
the table has cdiv(P, BLOCK_M) + min(E, P) entries (tiles are padded per expert), surplus entries hold
expert E.  With SMALL (the 256-row Gluon tile), an expert's last rows get a SMALL-row tile in a second table
when no more than SMALL of them remain, so that remainder is not padded to a whole BLOCK_M tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import expert_row_tile
from .host import cdiv, pow2
from .launch import launch


@triton.jit
def tile_table_kernel(
    eoff_ptr,     # (E + 1,) int32 expert offsets into the sorted pairs
    table_ptr,    # (n_tiles + E if SMALL else n_tiles, 3) int32 out: expert (E: none), first sorted row, end row
    n_tiles, E,
    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, SMALL: tl.constexpr,
):
    """Grid: (cdiv(n_tiles, BLOCK_T) + (1 if SMALL else 0),); each program fills BLOCK_T entries of the main
    table, one at a time; with SMALL, the last program fills the E entries of the small-tile table after it
    (expert e's last rows when at most SMALL of them remain after its full BLOCK_M tiles, else expert E)."""
    pid = tl.program_id(0)
    if pid * BLOCK_T < n_tiles:
        for j in range(BLOCK_T):
            t = pid * BLOCK_T + j
            if t < n_tiles:
                e, lo, hi = expert_row_tile(eoff_ptr, t, E, E_POW2, BLOCK_M, SMALL)
                tl.store(table_ptr + 3 * t, e)
                tl.store(table_ptr + 3 * t + 1, lo)
                tl.store(table_ptr + 3 * t + 2, hi)
    elif SMALL > 0:
        e_ids = tl.arange(0, E_POW2)
        e_mask = e_ids < E
        lo = tl.load(eoff_ptr + e_ids, mask=e_mask, other=0)
        hi = tl.load(eoff_ptr + e_ids + 1, mask=e_mask, other=0)
        rem = (hi - lo) % BLOCK_M
        has = (rem > 0) & (rem <= SMALL)
        dst = table_ptr + 3 * (n_tiles + e_ids)
        tl.store(dst, tl.where(has, e_ids, E), mask=e_mask)
        tl.store(dst + 1, tl.where(has, hi - rem, 0), mask=e_mask)
        tl.store(dst + 2, tl.where(has, hi, 0), mask=e_mask)


def launch_tile_table(expert_offsets: torch.Tensor, rows: int, block_m: int, launcher=None,
                      small: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Tables of row tiles for ``rows`` sorted rows: the (n_tiles, 3) int32 table of ``block_m`` tiles and,
    with ``small`` > 0, an (E, 3) table of ``small``-row tiles for the experts whose rows leave at most
    ``small`` after their full ``block_m`` tiles (those rows then have no ``block_m`` tile), else None."""
    num_experts = expert_offsets.numel() - 1
    n_tiles = cdiv(rows, block_m) + min(num_experts, rows)
    table = torch.empty(n_tiles + (num_experts if small else 0), 3, device=expert_offsets.device,
                        dtype=torch.int32)
    block_t = 16
    launch(tile_table_kernel, (cdiv(n_tiles, block_t) + (1 if small else 0),), launcher, expert_offsets, table,
           n_tiles, num_experts, E_POW2=pow2(num_experts), BLOCK_M=block_m, BLOCK_T=block_t, SMALL=small)
    return (table[:n_tiles], table[n_tiles:]) if small else (table, None)
