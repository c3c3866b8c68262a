"""The MMA k-order weight tile (nf4_decode.dequant_rows_mma) against the dequantized weight, for every K
step / NF4 blocksize pair the GEMM can use: column c of a K step must hold W[:, k0 + mma_k_order(BK)[c]],
each K step's order must be a permutation of its columns, and lane group q's columns one contiguous run.
Runs the fp32 decode (the PTX table decode is checked by test_lut_decode.py's emulator and on the GPU).
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from nf4moe.kernels.common import nested_offset
from nf4moe.kernels.host import interpreting
from nf4moe.kernels.nf4_decode import dequant_rows_mma, mma_k_order
from nf4moe.moe_layers.nf4_weight import NF4Weight
from triton_cases import DEV

pytestmark = pytest.mark.skipif(DEV == "cpu" and not interpreting(), reason="needs a GPU or TRITON_INTERPRET=1")


@triton.jit
def _tiles_kernel(w_ptr, am_ptr, am2_ptr, code2_ptr, off_ptr, out_ptr, cols_ptr, K_DIM,
                  R: tl.constexpr, BK: tl.constexpr, BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr,
                  INTERPRET: tl.constexpr):
    rows = tl.arange(0, R)
    offset = nested_offset(off_ptr, NESTED)
    k0 = tl.program_id(0) * BK
    w = dequant_rows_mma(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, rows, rows < R, k0, K_DIM, BS, BS2, NESTED, BK,
                         tl.float32, False, INTERPRET)
    tl.store(out_ptr + rows[:, None] * K_DIM + k0 + tl.arange(0, BK)[None, :], w.to(tl.float32))
    tl.store(cols_ptr + k0 + tl.arange(0, BK), k0 + mma_k_order(BK))


@pytest.mark.parametrize("bk,bs", [(32, 32), (64, 32), (128, 32), (32, 64), (64, 64), (128, 64), (64, 128),
                                   (128, 128)])
@pytest.mark.parametrize("nested", [True, False])
def test_mma_order_tile_is_the_permuted_weight(bk, bs, nested):
    k_dim, rows = 256, 16
    g = torch.Generator().manual_seed(bk + bs)
    w = NF4Weight(1, rows, k_dim, blocksize=bs, compress_statistics=nested)
    w.quantize(torch.randn(1, rows, k_dim, generator=g))
    w = w.to(DEV)
    want = w.dequantize(torch.float32)[0]
    out = torch.full((rows, k_dim), float("nan"), device=DEV)
    cols = torch.full((k_dim,), -1, dtype=torch.int32, device=DEV)
    ph = w.absmax
    _tiles_kernel[(k_dim // bk,)](
        w.packed, w.absmax, w.absmax2 if nested else ph, w.code2 if nested else ph, w.offset if nested else ph,
        out, cols, k_dim, R=rows, BK=bk, BS=bs, BS2=w.blocksize2, NESTED=nested, INTERPRET=interpreting())
    cols = cols.long().cpu()
    for k0 in range(0, k_dim, bk):  # a permutation of each K step's own columns
        assert sorted(cols[k0:k0 + bk].tolist()) == list(range(k0, k0 + bk))
        lane_runs = cols[k0:k0 + bk].view(bk // 16, 2, 4, 2).permute(2, 0, 1, 3).reshape(4, bk // 4)
        assert torch.equal(lane_runs, k0 + torch.arange(bk).view(4, bk // 4))  # lane group q: one contiguous run
    torch.testing.assert_close(out.cpu(), want.cpu()[:, cols], rtol=0, atol=0)
