"""Host-side facts and integer helpers shared by the launchers; imports nothing of ours.

``INTERPRET`` is fixed at import, as Triton's own choice of the interpreter is: hot launch paths read the
constant instead of the environment (an environment read costs ~1 us of an eager call's host time).
"""
from __future__ import annotations

import functools
import os

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}  # the kernels' ACT constexpr (common.act_fwd)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (read now, for code that runs once per process)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    """Host-side ceil(a / b).  triton.cdiv and triton.next_power_of_2 are Triton constexpr functions whose
    Python calls unwrap every argument: ~3 us each, a measurable part of an eager layer call's host time."""
    return -(-a // b)


def pow2(n: int) -> int:
    """Host-side next power of two >= n, as triton.next_power_of_2 (0 for n = 0)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def r_pad(r: int) -> int:
    """LoRA rank padded for tl.dot (every dot dim >= 16, a power of two)."""
    return max(16, pow2(max(r, 1)))


XA_MAX_SPLIT = 16  # K slices of an X·Aᵀ launch at most (xa_split); the decode GEMV's XA_EARLY unrolls this many


@functools.lru_cache(maxsize=1024)
def xa_split(k_dim: int, rows: int, block_k: int) -> int:
    """K slices of the X·Aᵀ precompute: at small P one slice per program is a long serial K loop (at
    T=1 on Qwen3-30B-A3B 32 steps took ~10 us for 8 rows), so split K up to 16 ways; the consumers sum
    the partials in a fixed order.  One slice for large P, where the row tiles fill the GPU."""
    if rows > 4096:
        return 1
    best = 1
    for s in range(1, XA_MAX_SPLIT + 1):
        if k_dim % (s * block_k) == 0 and k_dim // s >= 128:
            best = s
    return best


def xa_block_k(k_dim: int) -> int:
    """The K step of the X·Aᵀ kernels (lora_xa_kernel, routing.routing_xa_kernel)."""
    return 64 if k_dim % 64 == 0 else 32


def rows_16b_aligned(t) -> bool:
    """Whether the rows of 2D ``t`` are unit-stride and start 16-byte aligned (the Gluon GEMMs' cp.async)."""
    return t.stride(-1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
