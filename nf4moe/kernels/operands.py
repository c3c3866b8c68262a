"""The NF4 weight of one projection as every launcher takes it (metadata as a dataclass, not a tuple)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from .configs import pow2


def r_pad(r: int) -> int:
    """LoRA rank padded for tl.dot (every dot dim >= 16, a power of two)."""
    return max(16, pow2(max(r, 1)))


@dataclass
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
