"""The NF4 weight of one projection as every launcher takes it: one structured argument, not five tensors.

``NF4Operand`` is the kernels' view of the format; ``moe_layers.NF4Weight`` (the nn.Module that owns the
buffers, quantizes through bitsandbytes and loads its checkpoints) hands it out as ``NF4Weight.operand``.
At the boundary of a registered op (torch.library takes tensors and scalars only) the weight travels as its
named fields (``fields()``) and is rebuilt by ``NF4Operand(*fields, blocksize, blocksize2)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .host import ACT_CODES, INTERPRET, cdiv, pow2


@dataclass(frozen=True, slots=True)
class NF4Operand:
    """Packed NF4 expert weights (E, out, in) in bitsandbytes layout.

    packed: (E, out, in // 2) uint8, even column in the high nibble.  absmax: (E, out, in // blocksize)
    fp32, or uint8 codes when nested, decoded as code2[absmax] * absmax2[block // blocksize2] + offset
    (absmax2 (ceil(blocks / blocksize2),) fp32, code2 (256,) fp32, offset () fp32; all None when not nested).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    absmax2: torch.Tensor | None
    code2: torch.Tensor | None
    offset: torch.Tensor | None
    blocksize: int
    blocksize2: int = 256

    def fields(self) -> tuple:
        """(packed, absmax, absmax2, code2, offset): the tensors a registered op takes for this weight."""
        return (self.packed, self.absmax, self.absmax2, self.code2, self.offset)

    def __post_init__(self):
        k_dim = self.packed.shape[-1] * 2
        if k_dim % self.blocksize:  # the kernels index absmax by column // blocksize and align rows by it
            raise ValueError(f"packed holds {k_dim} input columns per row, not a multiple of blocksize "
                             f"({self.blocksize})")

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None

    def pointer_args(self) -> tuple:
        """(packed, absmax, absmax2, code2, offset) for a kernel; unused nested slots get a placeholder."""
        ph = self.absmax
        if self.nested:
            return (self.packed, self.absmax, self.absmax2, self.code2, self.offset)
        return (self.packed, self.absmax, ph, ph, ph)


def use_lut(dtype: torch.dtype) -> bool:
    """PTX table decode (nf4_decode.lut_scaled_pairs) for compiled code with 16-bit activations; the fp32 select
    tree otherwise (fp32 activations, and the interpreter, which runs no inline PTX)."""
    return not INTERPRET and dtype in (torch.bfloat16, torch.float16)


def projection_meta(x: torch.Tensor, w: NF4Operand, *, top_k: int, r_pad: int, gated: bool, act: str,
                    has_lora: bool) -> dict:
    """The constexprs the GEMM and the GEMV kernels share for one projection."""
    return dict(
        TOP_K=top_k, E_POW2=pow2(w.packed.shape[0]), R_PAD=r_pad,
        GATED=gated, ACT=ACT_CODES[act], GATHER=gated, SCATTER=not gated,
        HAS_LORA=has_lora, NESTED=w.nested, BS=w.blocksize, BS2=w.blocksize2, LUT=use_lut(x.dtype),
    )


_UNKEYED = frozenset(("PDL", "launch_pdl", "XA_EARLY"))  # launch_key leaves these out


def launch_key(kind: str, n: int, bucket: int, x: torch.Tensor, w: NF4Operand, out: torch.Tensor,
               lora_b: torch.Tensor | None, meta: dict) -> tuple:
    """launch.launch_tuned's key: every value the kernel's autotuner keys on or prunes by, and more.  Not the
    choices the plan turns on for CUDA-graph captures (PDL, the GEMV's XA_EARLY): a launch with them reuses the
    config tuned without them, the same tiles and so the same bits; a capture, where no autotuning can run, finds
    the config its eager calls tuned; and an A/B timing compares the choice, not two autotuner choices."""
    return (kind, n, 2 * w.packed.shape[2], bucket, x.dtype, out.dtype, w.absmax.dtype,
            lora_b.dtype if lora_b is not None else None,
            *(v for k, v in meta.items() if k not in _UNKEYED))


def grid(n: int, rows: int, num_experts: int):
    """GEMM and GEMV grid.  Row tiles are padded per expert (common.expert_row_tile), hence min(E, P) more of
    them; one-row tiles need no padding (tile i is sorted row i), and at decode sizes those surplus programs,
    which only exit, were half of the GEMV's grid."""
    return lambda meta: (cdiv(n, meta["BLOCK_N"]),
                         cdiv(rows, meta["BLOCK_M"]) + (min(num_experts, rows) if meta["BLOCK_M"] > 1 else 0))
