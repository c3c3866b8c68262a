"""The split-LoRA peers of a QLoRA training step: how MoE fine-tuning libraries on transformers v5 train today.

Each projection is ``grouped_mm(x, Wᵀ) + s · grouped_mm(grouped_mm(x, Aᵀ), Bᵀ)`` (``torch.nn.functional.grouped_mm``
over the (token, slot) rows sorted by expert), with the SwiGLU between the projections, the routing weight on
the down projection and an index_add back to the tokens: autograd does the backward.  The weights come from:

- ``"bf16"``: bf16 expert parameters (frozen);
- ``"nf4"``: the layer's NF4 bytes dequantized to bf16 by bitsandbytes on every call, and dequantized again in the
  backward (nothing but the inputs is saved: the memory-lean default of 4-bit MoE fine-tuning);
- ``"nf4_keep"``: the same dequantize per call, the bf16 weights kept for the backward (the speed-over-memory
  switch: autograd saves them).

Every peer copies the nf4moe layer's LoRA values, so their gradients can be checked against nf4moe's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ACTS = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh"), "relu": F.relu}
WEIGHTS = ("bf16", "nf4", "nf4_keep")


def bnb_dequantizer(w):
    """A function returning the (E, out, in) bf16 tensor of NF4Weight ``w``, dequantized by bitsandbytes.

    bitsandbytes' kernels index with 32-bit ints, so tensors over 2**31 elements (DeepSeek-V3's gate_up_proj) are
    held as per-chunk QuantStates and dequantized chunk by chunk into one bf16 tensor."""
    import bitsandbytes.functional as bnbf

    e, o, i = w.shape
    dev = w.packed.device
    step = max(1, (1 << 30) // (o * i))
    parts = []
    scales = w.scales()
    for s in range(0, e, step):
        t = min(e, s + step)
        qs = bnbf.QuantState(absmax=scales[s:t].reshape(-1).contiguous(), shape=torch.Size((t - s, o, i)),
                             code=bnbf.get_4bit_type("nf4", device=dev), blocksize=w.blocksize, quant_type="nf4",
                             dtype=torch.bfloat16)
        deq = bnbf.dequantize_4bit(w.packed[s:t].reshape(-1, 1), qs)
        # the state fine-tuners hold: bitsandbytes' own quantization of the slice (the same bytes), nested or not
        parts.append((s, t, *bnbf.quantize_4bit(deq, blocksize=w.blocksize, compress_statistics=w.compress_statistics,
                                               quant_type="nf4")))

    def dequantize() -> torch.Tensor:
        if len(parts) == 1:
            return bnbf.dequantize_4bit(parts[0][2], parts[0][3])
        out = torch.empty(e, o, i, dtype=torch.bfloat16, device=dev)
        for s, t, q, st in parts:  # into the slice: out= (bitsandbytes 0.50 has it on CUDA only)
            bnbf.dequantize_4bit(q, st, out=out[s:t])
        return out

    return dequantize


class _RedequantLinear(torch.autograd.Function):
    """grouped_mm(x, W(x)ᵀ) whose backward dequantizes W again instead of saving it."""

    @staticmethod
    def forward(ctx, x, offs, dequantize):
        ctx.save_for_backward(offs)
        ctx.dequantize = dequantize
        return F.grouped_mm(x, dequantize().transpose(-2, -1), offs=offs)

    @staticmethod
    def backward(ctx, dy):
        (offs,) = ctx.saved_tensors
        return F.grouped_mm(dy.contiguous(), ctx.dequantize(), offs=offs), None, None


class SplitLoraExperts(nn.Module):
    """An experts module (``forward(hidden_states, top_k_index, top_k_weights)``) of the split-LoRA method, with the
    LoRA values of nf4moe layer ``ours`` and base weights by ``weights`` (module docstring); ``bf16`` holds the
    (gate_up_proj (E, 2I, H), down_proj (E, H, I)) bf16 tensors for ``weights="bf16"``."""

    def __init__(self, ours, weights: str, bf16: tuple | None = None):
        super().__init__()
        if weights not in WEIGHTS:
            raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        if weights == "bf16" and bf16 is None:
            raise ValueError("weights='bf16' needs the bf16 (gate_up_proj, down_proj) tensors")
        self.weights, self.num_experts, self.act, self.scaling = weights, ours.num_experts, ours.act, ours.scaling
        self.lora_A = nn.ParameterDict({p: nn.Parameter(ours.lora_A[p].detach().clone()) for p in ours.lora_A})
        self.lora_B = nn.ParameterDict({p: nn.Parameter(ours.lora_B[p].detach().clone()) for p in ours.lora_B})
        if weights == "bf16":
            self.base = {"gate_up_proj": (lambda t=bf16[0]: t), "down_proj": (lambda t=bf16[1]: t)}
        else:
            self.base = {"gate_up_proj": bnb_dequantizer(ours.gate_up_nf4), "down_proj": bnb_dequantizer(ours.down_nf4)}

    def _linear(self, proj: str, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        if self.weights == "nf4":
            y = _RedequantLinear.apply(x, offs, self.base[proj])
        else:
            y = F.grouped_mm(x, self.base[proj]().transpose(-2, -1), offs=offs)
        if proj in self.lora_A:  # the split LoRA term: two grouped_mm more
            za = F.grouped_mm(x, self.lora_A[proj].transpose(-2, -1), offs=offs)
            y = y + self.scaling * F.grouped_mm(za, self.lora_B[proj].transpose(-2, -1), offs=offs)
        return y

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        t, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token = order // k
        offs = torch.cumsum(torch.bincount(flat, minlength=self.num_experts), 0, dtype=torch.int32)
        xs = hidden_states[token]
        g, u = self._linear("gate_up_proj", xs, offs).chunk(2, dim=-1)
        h = ACTS[self.act](g) * u
        y = self._linear("down_proj", h, offs) * top_k_weights.reshape(-1)[order, None].to(h.dtype)
        return torch.zeros(t, y.shape[1], dtype=y.dtype, device=y.device).index_add(0, token, y)


def step_grads(mod, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, gout: torch.Tensor) -> dict:
    """One forward + backward of ``mod`` on fresh leaves: {out, dx, dw, d<LoRA factor>} (the parameters' grads
    are cleared again)."""
    x = x.detach().requires_grad_(True)
    w = w.detach().requires_grad_(True)
    out = mod(x, idx, w)
    out.backward(gout)
    got = {"out": out.detach(), "dx": x.grad, "dw": w.grad}
    for kind in ("lora_A", "lora_B"):
        for proj, p in getattr(mod, kind).items():
            got[f"d{kind}[{proj}]"] = p.grad
            p.grad = None
    return got


def rel_errors(got: dict, ref: dict) -> dict:
    """‖got − ref‖ / ‖ref‖ per entry, in fp32."""
    return {k: float((got[k].float() - ref[k].float()).norm() / ref[k].float().norm().clamp_min(1e-30)) for k in ref}
