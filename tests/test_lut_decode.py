"""The PTX table decode (nf4_decode._lut_pairs_asm, for the GEMMs and the decode GEMV) runs only in
compiled GPU code; here its instruction sequence is executed by a small emulator of the PTX
instructions it uses (prmt.b32 byte permute with PTX's selector semantics, fma.rn on packed 16-bit pairs)
against the NF4 table, so a wrong selector or table word fails on the CPU too.  The GPU suite checks the
compiled kernels against the reference.
"""
from __future__ import annotations

import random

import pytest
import torch

from nf4moe.kernels.nf4_decode import _lut_pairs_asm
from nf4moe.reference.nf4 import NF4_CODE

M32 = 0xFFFFFFFF


def prmt(a: int, b: int, c: int) -> int:
    """PTX prmt.b32 (default mode): output byte k = byte (c's nibble k & 7) of {b, a}; bit 3 of the
    nibble replicates that byte's sign bit."""
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for k in range(4):
        n = (c >> (4 * k)) & 0xF
        v = src[n & 7]
        if n & 8:
            v = 0xFF if v & 0x80 else 0
        out |= v << (8 * k)
    return out


def to16(dtype, v: float) -> int:
    return torch.tensor([v], dtype=torch.float32).to(dtype).view(torch.int16).item() & 0xFFFF


def from16(dtype, bits: int) -> float:
    return torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(dtype).float().item()


def fma16x2(dtype, a: int, b: int, c: int) -> int:
    out = 0
    for i in range(2):
        x, y, z = (from16(dtype, (v >> (16 * i)) & 0xFFFF) for v in (a, b, c))
        out |= to16(dtype, torch.tensor(x * y + z, dtype=torch.float64).item()) << (16 * i)
    return out


def run(asm: str, regs: dict, dtype) -> dict:
    env = dict(regs)

    def val(tok: str) -> int:
        tok = tok.strip()
        return env[tok] if tok in env else int(tok, 0) & M32

    for stmt in asm.replace("{", "").replace("}", "").split(";"):
        stmt = stmt.strip()
        if not stmt or stmt.startswith(".reg"):
            continue
        op, rest = stmt.split(None, 1)
        args = [a.strip() for a in rest.split(",")]
        d, src = args[0], [val(a) for a in args[1:]]
        if op == "mov.b32":
            env[d] = src[0]
        elif op == "and.b32":
            env[d] = src[0] & src[1]
        elif op == "or.b32":
            env[d] = src[0] | src[1]
        elif op == "shr.u32":
            env[d] = src[0] >> src[1]
        elif op == "shl.b32":
            env[d] = (src[0] << src[1]) & M32
        elif op == "not.b32":
            env[d] = ~src[0] & M32
        elif op == "prmt.b32":
            env[d] = prmt(*src)
        elif op.startswith("fma.rn."):
            env[d] = fma16x2(dtype, *src)
        else:
            raise AssertionError(f"emulator lacks {op}")
    return env


@pytest.mark.parametrize("table_operands", [False, True])
@pytest.mark.parametrize("dtype,fma", [(torch.bfloat16, "fma.rn.bf16x2"), (torch.float16, "fma.rn.f16x2")])
def test_lut_pairs_asm_gives_each_bytes_even_odd_pair(dtype, fma, table_operands):
    """The MMA-order variant: register j holds byte j's (high nibble, low nibble) values times its scale; with
    ``table_operands`` (the Gluon GEMM's decode, whose table words stay in registers) they come in as operands
    $9 + 4i, as immediates otherwise (the Triton GEMMs)."""
    from nf4moe.kernels.nf4_decode import _BF16_TABLE, _F16_TABLE

    asm = _lut_pairs_asm(dtype, fma, table_operands)
    assert "\n" not in asm
    table = {}
    if table_operands:
        assert "0x" not in asm.split("mov.b32 z")[0], asm  # no immediate table words
        words = (_BF16_TABLE if dtype == torch.bfloat16 else _F16_TABLE).value
        table = {f"${9 + 4 * i}": w & M32 for i, w in enumerate(words)}
    rng = random.Random(1)
    cases = [[b, (b + 1) % 256, (b + 7) % 256, (255 - b)] for b in range(256)]
    cases += [[rng.randrange(256) for _ in range(4)] for _ in range(100)]
    for bs in cases:
        s16 = [to16(dtype, rng.uniform(1e-3, 4.0)) for _ in range(4)]
        regs = {"$4": sum(b << (8 * i) for i, b in enumerate(bs)), **table}
        regs.update({f"${5 + j}": s16[j] | s16[j] << 16 for j in range(4)})
        env = run(asm, regs, dtype)
        for j, b in enumerate(bs):
            s = from16(dtype, s16[j])
            for got, code in ((env[f"${j}"] & 0xFFFF, b >> 4), (env[f"${j}"] >> 16, b & 15)):
                want = torch.tensor(NF4_CODE[code]).to(dtype).double() * s
                assert from16(dtype, got) == torch.tensor(want.item()).to(dtype).float().item(), (bs, j, code)


def test_unscaled_pairs_with_table_operands_give_fp16_nf4_values():
    """The decode GEMV's variant (fma=None, table words as operands $5 + 4i / $21 + 4i): register j holds byte
    j's (high nibble, low nibble) NF4 values in fp16, unscaled, for every byte value."""
    from nf4moe.kernels.nf4_decode import _F16_TABLE

    dtype = torch.float16
    asm = _lut_pairs_asm(dtype, None, table_operands=True)
    assert "fma" not in asm and "0x" not in asm.split("mov.b32 z")[0], asm  # no immediate table words
    table = {f"${5 + 4 * i}": w & M32 for i, w in enumerate(_F16_TABLE.value)}  # low-byte words, then high
    for b in range(0, 256, 4):
        bs = [b, b + 1, b + 2, b + 3]
        env = run(asm, dict(table, **{"$4": sum(v << (8 * i) for i, v in enumerate(bs))}), dtype)
        for j, v in enumerate(bs):
            for got, code in ((env[f"${j}"] & 0xFFFF, v >> 4), (env[f"${j}"] >> 16, v & 15)):
                assert got == to16(dtype, NF4_CODE[code]), (v, j, code)
