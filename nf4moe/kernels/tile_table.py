"""Row-tile table of the grouped GEMMs: for each row tile of BLOCK_M sorted rows, its expert and row range.

The Triton GEMMs find their tile's expert themselves (common.expert_row_tile: a cumulative sum over the
experts' tile counts in every program).  The Gluon GEMM (grouped_gemm_wgmma.py) reads it from this table,
built once per projection by one small program, so it needs no scan of its own.  No host synchronisation:
the table has cdiv(P, BLOCK_M) + min(E, P) entries (tiles are padded per expert), surplus entries hold
expert E.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import expert_row_tile
from .configs import cdiv, pow2
from .launch import launch


@triton.jit
def tile_table_kernel(
    eoff_ptr,     # (E + 1,) int32 expert offsets into the sorted pairs
    table_ptr,    # (n_tiles, 3) int32 out: expert (E past the end), first sorted row, end of the expert's rows
    n_tiles, E,
    E_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Grid: (cdiv(n_tiles, BLOCK_T),); each program fills BLOCK_T entries, one at a time."""
    for j in range(BLOCK_T):
        t = tl.program_id(0) * BLOCK_T + j
        if t < n_tiles:
            e, lo, hi = expert_row_tile(eoff_ptr, t, E, E_POW2, BLOCK_M)
            tl.store(table_ptr + 3 * t, e)
            tl.store(table_ptr + 3 * t + 1, lo)
            tl.store(table_ptr + 3 * t + 2, hi)


def launch_tile_table(expert_offsets: torch.Tensor, rows: int, block_m: int, launcher=None) -> torch.Tensor:
    """(n_tiles, 3) int32 table for ``rows`` sorted rows in tiles of ``block_m``."""
    num_experts = expert_offsets.numel() - 1
    n_tiles = cdiv(rows, block_m) + min(num_experts, rows)
    table = torch.empty(n_tiles, 3, device=expert_offsets.device, dtype=torch.int32)
    block_t = 16
    launch(tile_table_kernel, (cdiv(n_tiles, block_t),), launcher, expert_offsets, table, n_tiles, num_experts,
           E_POW2=pow2(num_experts), BLOCK_M=block_m, BLOCK_T=block_t)
    return table
