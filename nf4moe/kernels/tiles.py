"""Device helper shared by the grouped kernels: map a row-tile program id to its expert and rows.

Only @triton.jit helpers live here.  Tiles are padded per expert to BLOCK_M; the map is rebuilt in
every program from the (E+1) expert offsets (a cumsum over E lanes), so BLOCK_M stays free for the
autotuner and no schedule has to be built on the host.
"""
import triton
import triton.language as tl


@triton.jit
def expert_row_tile(eoff_ptr, pid_m, E, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr):
    """(expert, first row, end row) of row tile ``pid_m``; expert == E means past the last tile."""
    e_ids = tl.arange(0, E_POW2)
    lo = tl.load(eoff_ptr + e_ids, mask=e_ids < E, other=0)
    hi = tl.load(eoff_ptr + e_ids + 1, mask=e_ids < E, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    tiles_end = tl.cumsum(tiles, 0)
    e = tl.sum((tiles_end <= pid_m).to(tl.int32), 0)
    tile_start = tl.sum(tl.where(e_ids == e, tiles_end - tiles, 0), 0)
    e_safe = tl.minimum(e, E - 1)
    row0 = tl.load(eoff_ptr + e_safe) + (pid_m - tile_start) * BLOCK_M
    row_end = tl.load(eoff_ptr + e_safe + 1)
    return e, row0, row_end
