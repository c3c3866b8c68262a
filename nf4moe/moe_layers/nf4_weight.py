"""NF4Weight: a stack of E expert matrices (E, out, in) held as bitsandbytes NF4.

Storage (all registered buffers, so ``.to()``, ``state_dict()`` and ``load_state_dict()`` carry them):

- ``packed``  (E, out, in // 2) uint8: two 4-bit codes per byte, the even element in the high nibble,
  exactly the bytes of ``bitsandbytes.functional.quantize_4bit`` on the (E, out, in) tensor.
- ``absmax``  (E, out, in // blocksize): fp32 scales, or uint8 codes when double-quantized
  (``compress_statistics=True``), in which case ``absmax2`` (ceil(n_blocks / 256),) fp32,
  ``code2`` (256,) fp32 and ``offset`` () fp32 decode them:
  ``scale[b] = code2[absmax[b]] * absmax2[b // 256] + offset``.

Memory: 0.5 byte per weight plus 4 / blocksize (fp32 absmax) or ~1 / blocksize (nested) bytes.
Quantization goes through bitsandbytes a few experts at a time: extra memory while quantizing is one
chunk of experts in the source dtype, never an fp32 copy of the whole tensor.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..reference.nf4 import dequantize_absmax, dequantize_nf4

_BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_QUANT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Experts quantized per bitsandbytes call: bounds the transient memory of quantize().
_CHUNK_ELEMENTS = 1 << 25


def _experts_listing(hit: list[tuple[int, str]], num_experts: int, most: int = 8) -> str:
    """'2 of 8 experts: expert 3 (...), expert 5 (...)', the first ``most`` of ``hit`` (expert, detail)."""
    shown = ", ".join(f"expert {ex} ({detail})" for ex, detail in hit[:most])
    more = f", and {len(hit) - most} more" if len(hit) > most else ""
    return f"{len(hit)} of {num_experts} experts: {shown}{more}"


def _non_finite_weight_message(w: torch.Tensor, name: str, step: int) -> str:
    """The error for a weight (E, out, in) with NaN / Inf: counts per expert, a chunk of experts at a time."""
    hit, nans, infs = [], 0, 0
    for s in range(0, w.shape[0], step):
        chunk = w[s : s + step]
        n_nan = torch.isnan(chunk).sum(dim=(1, 2)).tolist()
        n_inf = torch.isinf(chunk).sum(dim=(1, 2)).tolist()
        for j, (a, b) in enumerate(zip(n_nan, n_inf)):
            if a or b:
                hit.append((s + j, f"{a + b} values: {a} NaN, {b} Inf"))
                nans, infs = nans + a, infs + b
    return (f"{name} {tuple(w.shape)} has {nans + infs} non-finite values ({nans} NaN, {infs} Inf) in "
            f"{_experts_listing(hit, w.shape[0])}. NF4 cannot represent them, and with double quantization "
            "(compress_statistics=True) one of them turns every expert's output NaN. Fix the weights, or pass "
            "allow_non_finite=True to quantize them anyway")


def _bnb_functional():
    import bitsandbytes.functional as bnbf  # heavy import, only needed to (de)quantize via bnb

    return bnbf


class NF4Weight(nn.Module):
    """E matrices of shape (out, in) in NF4.  Build with :meth:`quantize` or :meth:`from_bnb`."""

    def __init__(
        self,
        num_experts: int,
        out_features: int,
        in_features: int,
        *,
        blocksize: int = 64,
        compress_statistics: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        blocksize2: int = 256,
    ):
        super().__init__()
        for name, v in (("num_experts", num_experts), ("out_features", out_features), ("in_features", in_features)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if blocksize not in _BNB_BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {_BNB_BLOCKSIZES} (bitsandbytes), got {blocksize!r}")
        if in_features % blocksize:
            raise ValueError(
                f"in_features ({in_features}) must be a multiple of blocksize ({blocksize}): each NF4 "
                "block must lie inside one row so the kernels can tile rows"
            )
        if dtype not in _QUANT_DTYPES:
            raise TypeError(f"dtype must be one of {_QUANT_DTYPES}, got {dtype}")
        self.num_experts = num_experts
        self.out_features = out_features
        self.in_features = in_features
        self.blocksize = blocksize
        self.blocksize2 = blocksize2
        self.compress_statistics = bool(compress_statistics)
        self.dtype = dtype  # dtype the weights had before quantization (QuantState.dtype)
        e, o, i = num_experts, out_features, in_features
        self.register_buffer("packed", torch.zeros(e, o, i // 2, dtype=torch.uint8, device=device))
        n_blocks = e * o * (i // blocksize)
        if self.compress_statistics:
            self.register_buffer("absmax", torch.zeros(e, o, i // blocksize, dtype=torch.uint8, device=device))
            self.register_buffer("absmax2", torch.zeros(math.ceil(n_blocks / blocksize2), dtype=torch.float32, device=device))
            self.register_buffer("code2", torch.zeros(256, dtype=torch.float32, device=device))
            self.register_buffer("offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(e, o, i // blocksize, dtype=torch.float32, device=device))
            self.absmax2 = self.code2 = self.offset = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def quantize(
        cls,
        w: torch.Tensor,
        blocksize: int = 64,
        compress_statistics: bool = True,
        *,
        quant_type: str = "nf4",
        name: str = "w",
        allow_non_finite: bool = False,
    ) -> "NF4Weight":
        """Quantize w (E, out, in) with ``bitsandbytes.functional.quantize_4bit(quant_type="nf4")``.

        ``w`` may also be 4-D (E, parts, rows, in), read as (E, parts * rows, in): a view that reorders rows
        (interleaved gate/up put in [gate; up] order) is then copied a chunk of experts at a time, never whole.

        Result is byte-identical to quantizing the whole tensor in one bitsandbytes call (one nested
        offset for the whole tensor), but only a few experts are quantized at a time.

        A NaN or Inf in ``w`` raises ValueError naming ``name`` (the weight, in messages), each expert
        holding one and the counts: NF4 cannot hold it, and with double quantization it poisons the
        nested statistics that every expert shares.  ``allow_non_finite=True`` quantizes regardless.
        The check costs one ``isfinite().all()`` per chunk and one host sync per call.
        """
        if quant_type != "nf4":
            raise ValueError(f"quant_type must be 'nf4' (nf4moe kernels decode NF4 only), got {quant_type!r}")
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
        if w.dim() not in (3, 4):
            raise ValueError(f"w must be 3-D (E, out, in) or 4-D (E, parts, rows, in), got shape {tuple(w.shape)}")
        if w.dtype not in _QUANT_DTYPES:
            raise TypeError(f"w must be one of {_QUANT_DTYPES}, got {w.dtype}")
        e, i = w.shape[0], w.shape[-1]
        o = w.shape[1] * w.shape[2] if w.dim() == 4 else w.shape[1]
        self = cls(e, o, i, blocksize=blocksize, compress_statistics=compress_statistics, dtype=w.dtype, device=w.device)
        bnbf = _bnb_functional()
        step = max(1, _CHUNK_ELEMENTS // (o * i))
        absmax = torch.empty(e, o, i // blocksize, dtype=torch.float32, device=w.device)
        finite = None  # stays on the device until the one sync after the loop
        with torch.no_grad():
            for s in range(0, e, step):
                chunk = w[s : s + step].detach().contiguous().view(-1, o, i)
                if not allow_non_finite:
                    ok = torch.isfinite(chunk).all()
                    finite = ok if finite is None else finite & ok
                q, st = bnbf.quantize_4bit(chunk, blocksize=blocksize, compress_statistics=False, quant_type="nf4")
                self.packed[s : s + step].copy_(q.view(-1, o, i // 2))
                absmax[s : s + step].copy_(st.absmax.view(-1, o, i // blocksize))
                del chunk, q, st
            if finite is not None and not bool(finite):
                raise ValueError(_non_finite_weight_message(w.reshape(e, o, i), name, step))
            if compress_statistics:
                # The same nesting bitsandbytes applies in quantize_4bit, over the whole tensor's absmax.
                offset = absmax.mean()
                qabs, st2 = bnbf.quantize_blockwise(absmax.reshape(-1) - offset, blocksize=self.blocksize2)
                self.absmax.copy_(qabs.view_as(self.absmax))
                self.absmax2.copy_(st2.absmax)
                self.code2.copy_(st2.code)
                self.offset.copy_(offset)
            else:
                self.absmax.copy_(absmax)
        return self

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state, *, name: str = "quant_state",
                 allow_non_finite: bool = False) -> "NF4Weight":
        """Wrap bitsandbytes NF4 bytes (a ``Params4bit`` or its data) and QuantState without re-quantizing.

        A NaN or Inf in the statistics (``absmax``, or the nested ``absmax2`` / ``code2`` / ``offset``)
        raises ValueError naming ``name``, the field, the count and the experts whose block scales it
        reaches, unless ``allow_non_finite=True``.
        """
        qs = quant_state
        if getattr(qs, "quant_type", None) != "nf4":
            raise ValueError(f"quant_state.quant_type must be 'nf4', got {getattr(qs, 'quant_type', None)!r}")
        shape = tuple(qs.shape)
        if len(shape) != 3:
            raise ValueError(f"quant_state.shape must be 3-D (E, out, in), got {shape}")
        if packed.dtype != torch.uint8:
            raise TypeError(f"packed must be uint8 (quant_storage=torch.uint8), got {packed.dtype}")
        e, o, i = shape
        if packed.numel() * 2 != e * o * i:
            raise ValueError(f"packed has {packed.numel()} bytes, shape {shape} needs {e * o * i // 2}")
        nested = qs.state2 is not None
        self = cls(e, o, i, blocksize=qs.blocksize, compress_statistics=nested, dtype=qs.dtype, device=packed.device,
                   blocksize2=qs.state2.blocksize if nested else 256)
        with torch.no_grad():
            self.packed.copy_(packed.reshape(e, o, i // 2))
            self.absmax.copy_(qs.absmax.reshape(self.absmax.shape))
            if nested:
                self.absmax2.copy_(qs.state2.absmax)
                self.code2.copy_(qs.state2.code)
                self.offset.copy_(torch.as_tensor(qs.offset, dtype=torch.float32))
        if not allow_non_finite:
            self._check_finite_statistics(name)
        return self

    def _check_finite_statistics(self, name: str) -> None:
        """Refuse non-finite statistics (one host sync; the details are computed only on failure)."""
        stats = {"absmax2": self.absmax2, "code2": self.code2, "offset": self.offset} if self.compress_statistics \
            else {"absmax": self.absmax}
        if bool(torch.stack([torch.isfinite(t).all() for t in stats.values()]).all()):
            return
        fields = ", ".join(f"{k} {int((~torch.isfinite(t)).sum())} of {t.numel()}" for k, t in stats.items()
                           if not bool(torch.isfinite(t).all()))
        per_expert = (~torch.isfinite(self.scales())).sum(dim=(1, 2)).tolist()
        hit = [(ex, f"{n} blocks") for ex, n in enumerate(per_expert) if n]
        reach = (f"they make the block scales of {_experts_listing(hit, self.num_experts)} non-finite" if hit
                 else "no block's scale uses them, but the state is corrupt")
        raise ValueError(
            f"{name}: bitsandbytes NF4 statistics hold non-finite values ({fields}); {reach}. Re-quantize from "
            "finite weights, or pass allow_non_finite=True to load them anyway")

    def to_bnb(self):
        """(packed (n/2, 1) uint8, QuantState) as ``quantize_4bit`` returns them; shares no storage."""
        bnbf = _bnb_functional()
        dev = self.packed.device
        state2 = None
        offset = None
        if self.compress_statistics:
            state2 = bnbf.QuantState(absmax=self.absmax2.clone(), code=self.code2.clone(),
                                     blocksize=self.blocksize2, dtype=torch.float32)
            offset = self.offset.clone()
        qs = bnbf.QuantState(
            absmax=self.absmax.reshape(-1).clone(),
            shape=torch.Size(self.shape),
            code=bnbf.get_4bit_type("nf4", device=dev),
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
            offset=offset,
            state2=state2,
        )
        return self.packed.reshape(-1, 1).clone(), qs

    def _apply(self, fn, recurse=True):
        # nn.Module.to(dtype) / .half() / .bfloat16() cast every floating buffer, which would round the
        # fp32 statistics (absmax, absmax2, code2, offset) and break bit-exactness with bitsandbytes.
        # Keep each buffer's dtype and take only the device move; a model-wide `.to(torch.bfloat16)`
        # therefore leaves the NF4 weights exactly as quantized.
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if out.dtype != t.dtype:
                out = t.to(device=out.device)
            return out

        return super()._apply(keep_dtype, recurse)

    # ------------------------------------------------------------------ use
    @property
    def operand(self):
        """The kernels' view of this weight (kernels.operands.NF4Operand): the buffers and the blocksizes."""
        from ..kernels.operands import NF4Operand  # the kernels import triton: not at `import nf4moe`

        return NF4Operand(self.packed, self.absmax, self.absmax2, self.code2, self.offset, self.blocksize,
                          self.blocksize2)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.num_experts, self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        """Bytes stored: packed codes plus (nested) statistics."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def scales(self) -> torch.Tensor:
        """fp32 absmax per block, (E, out, in // blocksize), decoding the nested form."""
        return dequantize_absmax(self.absmax, absmax2=self.absmax2, code2=self.code2, offset=self.offset,
                                 blocksize2=self.blocksize2)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole (E, out, in) tensor, bit-exact with ``bitsandbytes.functional.dequantize_4bit``."""
        return dequantize_nf4(
            self.packed, self.absmax, self.shape, self.blocksize, dtype=dtype or self.dtype,
            absmax2=self.absmax2, code2=self.code2, offset=self.offset, blocksize2=self.blocksize2,
        )

    def dequantize_expert(self, e: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert e's (out, in) matrix only: the CPU path dequantizes one expert at a time."""
        o, i = self.out_features, self.in_features
        nb = o * (i // self.blocksize)
        am = dequantize_absmax(self.absmax[e], absmax2=self.absmax2, code2=self.code2, offset=self.offset,
                               blocksize2=self.blocksize2, first_block=e * nb)
        return dequantize_nf4(self.packed[e], am, (o, i), self.blocksize, dtype=dtype or self.dtype)

    def extra_repr(self) -> str:
        return (f"E={self.num_experts}, out={self.out_features}, in={self.in_features}, blocksize={self.blocksize}, "
                f"double_quant={self.compress_statistics}, {self.nbytes / 2**20:.2f} MiB")
