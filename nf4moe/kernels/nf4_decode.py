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
def _load(ptr, mask):
    """``tl.load`` of ``ptr``, masked (0 elsewhere) unless ``mask`` is None."""
    if mask is None:
        return tl.load(ptr)
    else:
        return tl.load(ptr, mask=mask, other=0)


@triton.jit
def block_scale(am_ptr, am2_ptr, code2_ptr, offset, blk, mask, NESTED: tl.constexpr, BS2: tl.constexpr):
    """fp32 absmax of NF4 blocks ``blk``; decodes double-quant codes (code2[q] * absmax2 + offset).
    ``mask=None``: every block is real (no predication)."""
    if NESTED:
        q = _load(am_ptr + blk, mask).to(tl.int32)
        return _load(code2_ptr + q, mask) * _load(am2_ptr + blk // BS2, mask) + offset
    else:
        return _load(am_ptr + blk, mask)


@triton.jit
def row_bytes(K_DIM, BS: tl.constexpr):
    """Bytes per packed row, K_DIM // 2, with its alignment told to the compiler.

    K_DIM is a multiple of the blocksize (the layer checks it), so for BS % 32 == 0 every row starts on a
    16-byte boundary; the launch's own hint (K_DIM divisible by 16) gives only 8, which halves the width of
    the weight bytes' copies (cp.async 8 instead of 16 bytes; v44).  Written as (K_DIM // 32) * 16 rather
    than tl.multiple_of(K_DIM // 2, 16): the product carries the same divisibility, and it also compiles
    when K_DIM is a constexpr, as torch 2.11's wrap_triton mutation analysis makes every scalar argument
    (tl.multiple_of of a constexpr fails there, and torch.compile then takes every input as mutated:
    the backward through a compiled layer failed on an H100).
    """
    if BS % 32 == 0:
        return (K_DIM // 32) * 16
    else:
        return K_DIM // 2


@triton.jit
def _tile_bytes_and_scales(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, rows, row_mask, k0, K_DIM,
                           BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, BK: tl.constexpr):
    """Packed bytes of W[rows, k0:k0+BK] as (R, NB, HB) (NB NF4 blocks of HB bytes each, or one chunk of
    BK/2 bytes when BK <= BS) and their fp32 absmax (R, NB, 1)."""
    CH: tl.constexpr = BK if BK < BS else BS
    NB: tl.constexpr = BK // CH
    HB: tl.constexpr = CH // 2
    j = tl.arange(0, NB)[None, :, None] * HB + tl.arange(0, HB)[None, None, :]
    packed = tl.load(w_ptr + rows[:, None, None] * row_bytes(K_DIM, BS) + k0 // 2 + j, mask=row_mask[:, None, None],
                     other=0)
    blk = rows[:, None] * (K_DIM // BS) + (k0 + tl.arange(0, NB)[None, :] * CH) // BS
    s = block_scale(am_ptr, am2_ptr, code2_ptr, offset, blk, row_mask[:, None], NESTED, BS2)
    return packed, s[:, :, None]


@triton.jit
def dequant_rows(
    w_ptr, am_ptr, am2_ptr, code2_ptr, offset,
    rows, row_mask, k0, K_DIM,
    BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, BK: tl.constexpr,
):
    """fp32 tile W[rows, k0:k0+BK] of a packed NF4 matrix with K_DIM columns per row.

    ``rows`` are global row indices into the (E*out, in) view.  BK divides the blocksize BS (one absmax
    per tile row) or is a multiple of it (one absmax per block of the row).  The even column sits in the
    high nibble (bitsandbytes order).
    """
    if BK <= BS:
        kb = k0 // 2 + tl.arange(0, BK // 2)
        packed = tl.load(w_ptr + rows[:, None] * row_bytes(K_DIM, BS) + kb[None, :], mask=row_mask[:, None], other=0)
        packed = packed.to(tl.int32)
        s = block_scale(am_ptr, am2_ptr, code2_ptr, offset, rows * (K_DIM // BS) + k0 // BS, row_mask, NESTED, BS2)
        hi = nf4_value(packed >> 4) * s[:, None]
        lo = nf4_value(packed & 15) * s[:, None]
        return tl.reshape(tl.join(hi, lo), (hi.shape[0], BK))
    else:
        packed, s = _tile_bytes_and_scales(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, rows, row_mask, k0, K_DIM,
                                           BS, BS2, NESTED, BK)
        packed = packed.to(tl.int32)
        hi = nf4_value(packed >> 4) * s
        lo = nf4_value(packed & 15) * s
        return tl.reshape(tl.join(hi, lo), (hi.shape[0], BK))


def _lut_words(dtype) -> tuple[list[int], list[int]]:
    """The 16 NF4 values rounded to ``dtype`` (bf16/fp16), split into low and high bytes, 4 per word."""
    import torch

    bits = [b & 0xFFFF for b in torch.tensor(NF4_CODE, dtype=dtype).view(torch.int16).tolist()]

    def words(bs):
        return [sum(bs[4 * w + k] << (8 * k) for k in range(4)) for w in range(4)]

    return words([b & 0xFF for b in bits]), words([b >> 8 for b in bits])


def _lut_pairs_asm(dtype, fma: str | None, table_operands: bool = False) -> str:
    """PTX decoding 4 packed bytes to 4 registers, register j holding byte j's two weights as a
    (even column, odd column) f16x2/bf16x2 pair times its absmax pair: the order a 16-bit MMA operand
    keeps k pairs in, so no repacking follows.  The raw bytes are the byte-permute selectors (a selector
    uses its low 16 bits, i.e. the 4 nibbles of 2 bytes, low nibble first), so no nibble shuffling
    precedes the lookups either: ~3.4 instructions per weight.  $0-$3: out, $4: the 4 bytes, $5-$8:
    the (absmax, absmax) pair of each byte.

    ``fma=None``: the pairs unscaled (the decode GEMV applies the absmax in fp32).  With ``table_operands``
    the 8 table words come in as the operands after the others ($5, $9, ..., $33 unscaled, $9, ..., $37 with
    the absmax pairs: the first register of each 32-bit argument packed 4 to a call) instead of immediates:
    ptxas then keeps them in registers, where it re-moves immediate table words from uniform registers before
    every lookup (GEMV: ~5 instructions per byte; the Gluon GEMM's 128x256 up tile: 68 of 455 K-loop instructions).
    """
    lo, hi = _lut_words(dtype)
    if table_operands:
        t0 = 5 if fma is None else 9
        consts = "".join(f"mov.b32 tl{i}, ${t0 + 4 * i};\n mov.b32 th{i}, ${t0 + 16 + 4 * i};\n" for i in range(4))
    else:
        consts = "".join(f"mov.b32 tl{i}, {lo[i]:#010x};\n mov.b32 th{i}, {hi[i]:#010x};\n" for i in range(4))

    def two_bytes(sel: str, outs: tuple[str, str], scales: tuple[str, str]) -> str:
        # m: byte i = 0xFF where code i >= 8 (its bit 3 moved to a byte's sign bit, then sign-replicated)
        body = (
            f"and.b32 s7, {sel}, 0x7777;\n shl.b32 x, {sel}, 4;\n prmt.b32 m, {sel}, x, 0x9D8C;\n"
            "prmt.b32 a, tl0, tl1, s7;\n prmt.b32 b, tl2, tl3, s7;\n"
            "and.b32 b, b, m;\n not.b32 m, m;\n and.b32 a, a, m;\n or.b32 lo, a, b;\n not.b32 m, m;\n"
            "prmt.b32 a, th0, th1, s7;\n prmt.b32 b, th2, th3, s7;\n"
            "and.b32 b, b, m;\n not.b32 m, m;\n and.b32 a, a, m;\n or.b32 hi, a, b;\n"
            # lo/hi bytes: [odd0, even0, odd1, even1]; out = [lo(even), hi(even), lo(odd), hi(odd)]
            f"prmt.b32 {outs[0]}, lo, hi, 0x4051;\n prmt.b32 {outs[1]}, lo, hi, 0x6273;\n"
        )
        if fma is None:
            return body
        return body + "".join(f"{fma} {o}, {o}, {s}, z;\n" for o, s in zip(outs, scales))

    asm = (
        "{\n .reg .b32 tl0, tl1, tl2, tl3, th0, th1, th2, th3, a, b, s7, x, m, lo, hi, w2, z;\n"
        + consts
        + "mov.b32 z, 0x80008000;\n shr.u32 w2, $4, 16;\n"
        + two_bytes("$4", ("$0", "$1"), ("$5", "$6"))
        + two_bytes("w2", ("$2", "$3"), ("$7", "$8"))
        + "}"
    )
    return " ".join(asm.split())


_BF16_PAIRS_ASM: tl.constexpr = tl.constexpr(_lut_pairs_asm(__import__("torch").bfloat16, "fma.rn.bf16x2"))
_FP16_PAIRS_ASM: tl.constexpr = tl.constexpr(_lut_pairs_asm(__import__("torch").float16, "fma.rn.f16x2"))
_BF16_PAIRS_REG_ASM: tl.constexpr = tl.constexpr(_lut_pairs_asm(__import__("torch").bfloat16, "fma.rn.bf16x2", True))
_FP16_PAIRS_REG_ASM: tl.constexpr = tl.constexpr(_lut_pairs_asm(__import__("torch").float16, "fma.rn.f16x2", True))


def _signed_words(dtype) -> tuple[int, ...]:
    """The table words of ``_lut_words`` (low bytes, then high bytes) as signed int32 values."""
    lo, hi = _lut_words(dtype)
    return tuple(w - (1 << 32) if w >= 1 << 31 else w for w in lo + hi)


_GEMV_PAIRS_ASM: tl.constexpr = tl.constexpr(_lut_pairs_asm(__import__("torch").float16, None, table_operands=True))
_F16_TABLE: tl.constexpr = tl.constexpr(_signed_words(__import__("torch").float16))
_BF16_TABLE: tl.constexpr = tl.constexpr(_signed_words(__import__("torch").bfloat16))


@triton.jit
def lut_values_f32(packed, opaque_zero):
    """fp32 (even, odd) NF4 values (unscaled, from the fp16 table: exact to 2^-12) of uint8 ``packed``.

    The PTX of ``_lut_pairs_asm`` without the absmax multiply, its table words passed in as registers:
    ``opaque_zero`` is a runtime 0 the compiler cannot fold (a kernel argument shifted out), so the words
    stay in registers for the whole kernel rather than being moved in again before every lookup."""
    z = tl.zeros(packed.shape, dtype=tl.int32) + opaque_zero
    pairs = tl.inline_asm_elementwise(
        _GEMV_PAIRS_ASM, "=r,=r,=r,=r,r" + ",r,r,r,r" * 8,
        [packed, z | _F16_TABLE[0], z | _F16_TABLE[1], z | _F16_TABLE[2], z | _F16_TABLE[3], z | _F16_TABLE[4],
         z | _F16_TABLE[5], z | _F16_TABLE[6], z | _F16_TABLE[7]],
        dtype=tl.int32, is_pure=True, pack=4)
    even, odd = _pair_halves(pairs, tl.float16)
    return even.to(tl.float32), odd.to(tl.float32)


@triton.jit
def dequant_rows_lut(
    w_ptr, am_ptr, am2_ptr, code2_ptr, offset,
    rows, row_mask, k0, K_DIM,
    BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, BK: tl.constexpr, DT: tl.constexpr,
):
    """``dequant_rows`` for compiled GPU code with 16-bit activations: the table lookup and the absmax
    multiply run in PTX byte permutes and packed f16x2/bf16x2 FMAs (``_lut_pairs_asm``: each byte's two
    weights land in one register, consecutive columns here, so the join below costs nothing; ~18% fewer
    K-loop instructions than the earlier nibble-compacting table decode, NOTES v15).  The NF4 value is
    rounded to DT before the multiply, so results differ from bitsandbytes' fp32 product by <= 1 ulp of
    DT per weight (the reference comparison bounds this).  ``w_ptr`` is the uint8 packed tensor.
    """
    if BK <= BS:
        kb = k0 // 2 + tl.arange(0, BK // 2)
        packed = tl.load(w_ptr + rows[:, None] * row_bytes(K_DIM, BS) + kb[None, :], mask=row_mask[:, None], other=0)
        s = block_scale(am_ptr, am2_ptr, code2_ptr, offset, rows * (K_DIM // BS) + k0 // BS, row_mask, NESTED, BS2)
        even, odd = _lut_decode_pairs(packed, s[:, None], DT)
    else:  # several NF4 blocks per row in one K step
        packed, s = _tile_bytes_and_scales(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, rows, row_mask, k0, K_DIM,
                                           BS, BS2, NESTED, BK)
        even, odd = _lut_decode_pairs(packed, s, DT)
    return tl.reshape(tl.join(even, odd), (packed.shape[0], BK))


@triton.jit
def dequant_operand(
    w_ptr, am_ptr, am2_ptr, code2_ptr, offset,
    rows, row_mask, k0, K_DIM,
    BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, BK: tl.constexpr,
    DT: tl.constexpr, LUT: tl.constexpr, INTERPRET: tl.constexpr, MMA_ORDER: tl.constexpr,
):
    """The (R, BK) weight tile ready for tl.dot: the PTX table decode in DT when LUT, else the fp32
    select tree cast to DT (kept fp32 under the interpreter, whose bf16 dot is wrong).  MMA_ORDER: the
    K step's columns in wgmma k order (``dequant_rows_mma``; the caller reads activations in the same order)."""
    if MMA_ORDER:
        return dequant_rows_mma(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, rows, row_mask, k0, K_DIM, BS, BS2,
                                NESTED, BK, DT, LUT, INTERPRET)
    elif LUT:
        return dequant_rows_lut(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, rows, row_mask, k0, K_DIM, BS, BS2,
                                NESTED, BK, DT)
    else:
        w = dequant_rows(w_ptr, am_ptr, am2_ptr, code2_ptr, offset, rows, row_mask, k0, K_DIM, BS, BS2, NESTED, BK)
        if INTERPRET:
            return w
        else:
            return w.to(DT)


@triton.jit
def scale_pair(s, DT: tl.constexpr):
    """int32 word holding ``s`` rounded to DT twice: the (absmax, absmax) operand of ``lut_scaled_pairs``."""
    s16 = s.to(DT).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    return s16 | (s16 << 16)


@triton.jit
def lut_scaled_pairs(packed, s2, DT: tl.constexpr, z):
    """int32 (even, odd) DT pair of each uint8 byte of ``packed`` times its absmax pair ``s2`` (int32, packed's
    shape): the PTX of ``_lut_pairs_asm``.  Also called from the Gluon GEMM (grouped_gemm_wgmma.py).

    ``z``: None, the table words as PTX immediates; or int32 zeros of packed's shape and layout made from a
    runtime 0 the compiler cannot fold (as ``lut_values_f32``'s), the 8 words then passed in as registers that
    stay live through the kernel: 8 registers for ~1 move instruction fewer per decoded byte (ptxas re-moves
    immediate words from uniform registers before each lookup).  Only the Gluon GEMM passes ``z``: in a Triton
    kernel the extra operands made Triton lay the decode out differently, and the tile then went through
    shared memory to the wgmma (SASS compiled on the CPU, NOTES v42)."""
    if z is not None:
        if DT == tl.bfloat16:
            return tl.inline_asm_elementwise(
                _BF16_PAIRS_REG_ASM, "=r,=r,=r,=r,r,r,r,r,r" + ",r,r,r,r" * 8,
                [packed, s2, z | _BF16_TABLE[0], z | _BF16_TABLE[1], z | _BF16_TABLE[2], z | _BF16_TABLE[3],
                 z | _BF16_TABLE[4], z | _BF16_TABLE[5], z | _BF16_TABLE[6], z | _BF16_TABLE[7]],
                dtype=tl.int32, is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(
                _FP16_PAIRS_REG_ASM, "=r,=r,=r,=r,r,r,r,r,r" + ",r,r,r,r" * 8,
                [packed, s2, z | _F16_TABLE[0], z | _F16_TABLE[1], z | _F16_TABLE[2], z | _F16_TABLE[3],
                 z | _F16_TABLE[4], z | _F16_TABLE[5], z | _F16_TABLE[6], z | _F16_TABLE[7]],
                dtype=tl.int32, is_pure=True, pack=4)
    if DT == tl.bfloat16:
        return tl.inline_asm_elementwise(_BF16_PAIRS_ASM, "=r,=r,=r,=r,r,r,r,r,r", [packed, s2], dtype=tl.int32,
                                         is_pure=True, pack=4)
    else:
        return tl.inline_asm_elementwise(_FP16_PAIRS_ASM, "=r,=r,=r,=r,r,r,r,r,r", [packed, s2], dtype=tl.int32,
                                         is_pure=True, pack=4)


@triton.jit
def _lut_decode_pairs(packed, s, DT: tl.constexpr):
    """(even, odd) DT values of uint8 ``packed`` times ``s`` (broadcast to packed's shape): the PTX of
    ``_lut_pairs_asm``, whose int32 results are each byte's (even, odd) pair, split here by bit casts
    (the halves of one register, so the split costs no instruction in the MMA operand)."""
    return _pair_halves(lut_scaled_pairs(packed, tl.broadcast_to(scale_pair(s, DT), packed.shape), DT, None), DT)


@triton.jit
def _pair_halves(pairs, DT: tl.constexpr):
    """The (low, high) 16-bit halves of int32 ``pairs`` as DT values, by bit casts."""
    return (pairs & 0xFFFF).to(tl.int16).to(DT, bitcast=True), (pairs >> 16).to(tl.int16).to(DT, bitcast=True)


@triton.jit
def mma_k_order(BK: tl.constexpr):
    """Physical column (within a K step of BK) of each MMA k position, for ``dequant_rows_mma``.

    A Hopper wgmma register A operand gives lane q (= lane % 4) of each row the k positions 16b + 8h +
    2q + t (b < BK/16, h, t < 2) of a K step.  Assigning those positions the physical columns
    q*BK/4 + 4b + 2h + t hands every lane one contiguous run of BK/8 packed bytes per row, so the bytes
    arrive as whole words (one vector load) instead of one byte at a time.  The activations are read in the
    same order (this table), and the dot product, a sum over k, is unchanged.
    """
    c = tl.arange(0, BK)
    return (c // 2 % 4) * (BK // 4) + (c // 16) * 4 + (c // 8 % 2) * 2 + c % 2


@triton.jit
def dequant_rows_mma(
    w_ptr, am_ptr, am2_ptr, code2_ptr, offset,
    rows, row_mask, k0, K_DIM,
    BS: tl.constexpr, BS2: tl.constexpr, NESTED: tl.constexpr, BK: tl.constexpr,
    DT: tl.constexpr, LUT: tl.constexpr, INTERPRET: tl.constexpr,
):
    """The (R, BK) weight tile W[rows, k0 + mma_k_order(BK)]: columns in MMA k order (see mma_k_order).

    Loads the bytes as (R, 4, BK/8), one contiguous run per lane group q; each run lies in one NF4 block
    (BK/4 columns, BK <= 4 * BS), so it needs one absmax.  Decode: the PTX table when LUT, else the fp32
    select tree (kept fp32 under the interpreter, whose bf16 dot is wrong).
    """
    tl.static_assert(BK % 16 == 0 and BK <= 4 * BS, "MMA k order needs BK % 16 == 0 and BK / 4 <= the NF4 blocksize")
    J: tl.constexpr = BK // 8
    j = tl.arange(0, 4)[None, :, None] * J + tl.arange(0, J)[None, None, :]
    packed = tl.load(w_ptr + rows[:, None, None] * row_bytes(K_DIM, BS) + k0 // 2 + j, mask=row_mask[:, None, None],
                     other=0)
    NB: tl.constexpr = BK // BS if BK > BS else 1  # NF4 blocks in the K step; lane group q reads block q // (4 / NB)
    blk = rows[:, None] * (K_DIM // BS) + k0 // BS + tl.arange(0, NB)[None, :]
    s = block_scale(am_ptr, am2_ptr, code2_ptr, offset, blk, row_mask[:, None], NESTED, BS2)  # (R, NB): one load each
    s = tl.reshape(tl.broadcast_to(s[:, :, None], (s.shape[0], NB, 4 // NB)), (s.shape[0], 4))[:, :, None]
    if LUT:
        even, odd = _lut_decode_pairs(packed, s, DT)
    else:
        q = packed.to(tl.int32)
        even = nf4_value(q >> 4) * s
        odd = nf4_value(q & 15) * s
        if not INTERPRET:
            even = even.to(DT)
            odd = odd.to(DT)
    w = tl.reshape(tl.join(even, odd), (packed.shape[0], 4, BK // 16, 2, 2))  # (row, q, b, h, t)
    return tl.reshape(tl.permute(w, (0, 2, 3, 1, 4)), (packed.shape[0], BK))  # column 16b + 8h + 2q + t
