"""Device functions shared by the NF4 kernels: decode 4-bit codes and dequantize a weight tile.

Only @triton.jit helpers live here (no kernel, no launcher).  The NF4 table is held as 16 compile-time
constants and looked up by a 4-level select tree on the code's bits: no per-element memory gather.
"""
import triton
import triton.language as tl

from ..reference.nf4 import NF4_CODE

_Q0: tl.constexpr = tl.constexpr(NF4_CODE[0])
_Q1: tl.constexpr = tl.constexpr(NF4_CODE[1])
_Q2: tl.constexpr = tl.constexpr(NF4_CODE[2])
_Q3: tl.constexpr = tl.constexpr(NF4_CODE[3])
_Q4: tl.constexpr = tl.constexpr(NF4_CODE[4])
_Q5: tl.constexpr = tl.constexpr(NF4_CODE[5])
_Q6: tl.constexpr = tl.constexpr(NF4_CODE[6])
_Q7: tl.constexpr = tl.constexpr(NF4_CODE[7])
_Q8: tl.constexpr = tl.constexpr(NF4_CODE[8])
_Q9: tl.constexpr = tl.constexpr(NF4_CODE[9])
_Q10: tl.constexpr = tl.constexpr(NF4_CODE[10])
_Q11: tl.constexpr = tl.constexpr(NF4_CODE[11])
_Q12: tl.constexpr = tl.constexpr(NF4_CODE[12])
_Q13: tl.constexpr = tl.constexpr(NF4_CODE[13])
_Q14: tl.constexpr = tl.constexpr(NF4_CODE[14])
_Q15: tl.constexpr = tl.constexpr(NF4_CODE[15])


@triton.jit
def nf4_value(q):
    """fp32 NF4 value of each 4-bit code in q (int32 tensor, values in [0, 16))."""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    b3 = (q & 8) != 0
    v0 = tl.where(b0, _Q1, _Q0)
    v1 = tl.where(b0, _Q3, _Q2)
    v2 = tl.where(b0, _Q5, _Q4)
    v3 = tl.where(b0, _Q7, _Q6)
    v4 = tl.where(b0, _Q9, _Q8)
    v5 = tl.where(b0, _Q11, _Q10)
    v6 = tl.where(b0, _Q13, _Q12)
    v7 = tl.where(b0, _Q15, _Q14)
    w0 = tl.where(b1, v1, v0)
    w1 = tl.where(b1, v3, v2)
    w2 = tl.where(b1, v5, v4)
    w3 = tl.where(b1, v7, v6)
    x0 = tl.where(b2, w1, w0)
    x1 = tl.where(b2, w3, w2)
    return tl.where(b3, x1, x0)


@triton.jit
def block_scale(am_ptr, am2_ptr, code2_ptr, offset, blk, mask, NESTED: tl.constexpr, BS2: tl.constexpr):
    """fp32 absmax of NF4 blocks ``blk``; decodes double-quant codes (code2[q] * absmax2 + offset)."""
    if NESTED:
        q = tl.load(am_ptr + blk, mask=mask, other=0).to(tl.int32)
        a2 = tl.load(am2_ptr + blk // BS2, mask=mask, other=0.0)
        return tl.load(code2_ptr + q, mask=mask, other=0.0) * a2 + offset
    else:
        return tl.load(am_ptr + blk, mask=mask, other=0.0)


@triton.jit
def dequant_rows(
    w_ptr, am_ptr, am2_ptr, code2_ptr, offset,
    rows, row_mask, k0, K_DIM,
    BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, BK: tl.constexpr,
):
    """fp32 tile W[rows, k0:k0+BK] of a packed NF4 matrix with K_DIM columns per row.

    ``rows`` are global row indices into the (E*out, in) view.  BK divides the blocksize BS, so each
    row of the tile has one absmax.  The even column sits in the high nibble (bitsandbytes order).
    """
    kb = k0 // 2 + tl.arange(0, BK // 2)
    packed = tl.load(w_ptr + rows[:, None] * (K_DIM // 2) + kb[None, :], mask=row_mask[:, None], other=0)
    packed = packed.to(tl.int32)
    s = block_scale(am_ptr, am2_ptr, code2_ptr, offset, rows * (K_DIM // BS) + k0 // BS, row_mask, NESTED, BS2)
    hi = nf4_value(packed >> 4) * s[:, None]
    lo = nf4_value(packed & 15) * s[:, None]
    return tl.reshape(tl.join(hi, lo), (hi.shape[0], BK))
