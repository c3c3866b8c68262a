"""NF4 dequantization, bit-exact with ``bitsandbytes.functional.dequantize_4bit``.

Layout (bitsandbytes): a tensor of n elements, flattened row-major, is cut into blocks of
``blocksize`` consecutive elements.  Element i is stored in byte i // 2, the even element in the high
nibble.  Its value is ``NF4_CODE[nibble] * absmax[i // blocksize]`` computed in fp32, then cast.
With double quantization the fp32 absmax is itself stored as uint8 codes:
``absmax[b] = code2[q[b]] * absmax2[b // blocksize2] + offset`` (one offset for the whole tensor).
"""
from __future__ import annotations

import torch

# The 16 NF4 values of bitsandbytes (``get_4bit_type("nf4")``), as the exact fp32 numbers it stores.
NF4_CODE: tuple[float, ...] = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def dequantize_absmax(
    absmax: torch.Tensor,
    *,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | float | None = None,
    blocksize2: int = 256,
    first_block: int = 0,
) -> torch.Tensor:
    """fp32 per-block absmax; decodes the nested (double-quant) form when ``absmax2`` is given.

    ``absmax`` may be a slice of a tensor's blocks starting at block ``first_block`` (one expert of a
    stack): the nested scale of block b is ``absmax2[b // blocksize2]`` in the whole tensor's numbering.
    """
    if absmax2 is None:
        return absmax.float()
    q = absmax.reshape(-1).long()
    blocks = torch.arange(first_block, first_block + q.numel(), device=q.device)
    scale = absmax2.float()[blocks // blocksize2]
    out = code2.float()[q] * scale + (offset if offset is not None else 0.0)
    return out.reshape(absmax.shape)


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...],
    blocksize: int,
    *,
    dtype: torch.dtype = torch.float32,
    absmax2: torch.Tensor | None = None,
    code2: torch.Tensor | None = None,
    offset: torch.Tensor | float | None = None,
    blocksize2: int = 256,
) -> torch.Tensor:
    """Dequantize packed NF4 bytes (any shape holding n/2 uint8) to ``shape`` in ``dtype``."""
    n = 1
    for s in shape:
        n *= s
    b = packed.reshape(-1)
    if b.numel() * 2 != n:
        raise ValueError(f"packed holds {b.numel() * 2} nibbles, shape {tuple(shape)} needs {n}")
    code = torch.tensor(NF4_CODE, dtype=torch.float32, device=b.device)
    vals = torch.stack((code[(b >> 4).long()], code[(b & 15).long()]), dim=-1).reshape(-1)
    am = dequantize_absmax(absmax, absmax2=absmax2, code2=code2, offset=offset, blocksize2=blocksize2)
    vals = vals.view(-1, blocksize) * am.reshape(-1, 1)
    return vals.reshape(shape).to(dtype)
