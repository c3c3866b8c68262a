"""QuantGroupedExperts: the expert layer of an MoE transformer with NF4 base weights and LoRA.

Data flow per call (T tokens, K slots each, E experts, hidden H, intermediate I):
routing metadata (pairs sorted by expert) -> up projection with SwiGLU and LoRA (the only
intermediate, (T*K, I)) -> down projection with the routing weight -> deterministic combine of each
token's K slots into (T, H).

Memory: the base weights stay NF4 (0.5 byte/weight + statistics); no path dequantizes the whole
weight tensor.  The reference backend (CPU) dequantizes one expert at a time; the Triton backend
dequantizes tiles inside the matmul loop.
"""
from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..reference import ACTIVATIONS, Gate, Lora, moe_forward
from .checks import check_expert_weights, check_forward_inputs
from .nf4_weight import NF4Weight

BACKENDS = ("auto", "reference", "triton")
PROJECTIONS = ("gate_up_proj", "down_proj")
# Saved under the dense weight names of a transformers experts module (b"nf4moe" 4 times, shape (2, 4, 3)):
# every state_dict of a model holding this module carries them, so a loader that rebuilds the dense experts
# class instead (transformers without the nf4moe quantizer, a config without its quantization_config) meets a
# size mismatch under experts.gate_up_proj / experts.down_proj and raises, instead of initialising random
# experts.  Rank 3 with no dimension of size 1, so transformers' reverse conversions on save (unbind per expert,
# chunk gate/up) and its merges on load give the same shape back (transformers 5.17 squeezes size-1 dimensions).
MARKER = tuple(b"nf4moe" * 4)
MARKER_SHAPE = (2, 4, 3)


def marker_tensor(device=None) -> torch.Tensor:
    return torch.tensor(MARKER, dtype=torch.uint8, device=device).view(MARKER_SHAPE)


def _interpreting() -> bool:
    # kernels.configs.interpreting says the same, but importing it imports triton at `import nf4moe`.
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_config(act: str, backend: str, lora_rank: int) -> None:
    """Checked by every constructor, before any quantization work."""
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 0:
        raise ValueError(f"lora_rank must be an int >= 0, got {lora_rank!r}")


class QuantGroupedExperts(nn.Module):
    """Drop-in for a transformers v5 experts module: ``forward(hidden_states, top_k_index, top_k_weights)``.

    Base weights are frozen NF4 buffers (``gate_up_nf4`` (E, 2I, H), ``down_nf4`` (E, H, I)); LoRA
    factors are trainable parameters ``lora_A[proj]`` (E, r, in) and ``lora_B[proj]`` (E, out, r),
    scaled by ``lora_alpha / lora_rank``.
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        *,
        act: str = "silu",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        blocksize: int = 64,
        compress_statistics: bool = True,
        backend: str = "auto",
        dtype: torch.dtype = torch.bfloat16,
        lora_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        recompute: bool = False,
        gate: Gate | None = None,
        bias: bool = False,
    ):
        super().__init__()
        if gate is not None:
            if not isinstance(gate, Gate):
                raise TypeError(f"gate must be an nf4moe.reference.Gate, got {type(gate).__name__}")
            if act not in ("silu", gate.act):
                raise ValueError(f"act={act!r} and gate.act={gate.act!r} disagree; pass the gate alone")
            act = gate.act
        _check_config(act, backend, lora_rank)
        # Training memory mode of the Triton backward (moe_layers/autograd.py): True recomputes the up
        # projection in the backward instead of saving its (T*K, 2I) pre-activation.
        if recompute is not None and not isinstance(recompute, bool):
            raise ValueError(f"recompute must be True or False, got {recompute!r}")
        self.recompute = bool(recompute)
        for name, v in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size)):
            if v % blocksize:
                raise ValueError(f"{name} ({v}) must be a multiple of blocksize ({blocksize})")
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.act = act
        self.backend = backend
        self.blocksize = blocksize
        kw = dict(blocksize=blocksize, compress_statistics=compress_statistics, dtype=dtype, device=device)
        self.gate_up_nf4 = NF4Weight(num_experts, 2 * intermediate_size, hidden_size, **kw)
        self.down_nf4 = NF4Weight(num_experts, hidden_size, intermediate_size, **kw)
        self.gate = gate if gate is not None and not gate.plain else None  # None: act(g) * u
        self.add_lora(lora_rank, lora_alpha, dtype=lora_dtype or dtype)
        for name in PROJECTIONS:
            self.register_buffer(name, marker_tensor(device))
        # Per-expert biases, [gate; up] halves like gate_up_nf4's rows; frozen unless asked (set_trainable).
        for name, n in (("gate_up_bias", 2 * intermediate_size), ("down_bias", hidden_size)):
            self.register_parameter(name, nn.Parameter(torch.zeros(num_experts, n, dtype=lora_dtype or dtype,
                                                                   device=device), requires_grad=False)
                                    if bias else None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_weights(
        cls,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        *,
        act: str = "silu",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        blocksize: int = 64,
        compress_statistics: bool = True,
        backend: str = "auto",
        lora_dtype: torch.dtype | None = None,
        allow_non_finite: bool = False,
    ) -> "QuantGroupedExperts":
        """Quantize bf16/fp16/fp32 expert weights gate_up_proj (E, 2I, H) and down_proj (E, H, I) to NF4.

        A NaN or Inf in either weight raises ValueError naming it, the experts and the counts, unless
        ``allow_non_finite=True`` (see ``NF4Weight.quantize``)."""
        _check_config(act, backend, lora_rank)
        e, h, i = check_expert_weights(gate_up_proj, down_proj, blocksize)
        gu = NF4Weight.quantize(gate_up_proj, blocksize, compress_statistics, name="gate_up_proj",
                                allow_non_finite=allow_non_finite)
        dn = NF4Weight.quantize(down_proj, blocksize, compress_statistics, name="down_proj",
                                allow_non_finite=allow_non_finite)
        return cls.from_nf4(gu, dn, act=act, lora_rank=lora_rank, lora_alpha=lora_alpha, backend=backend,
                            lora_dtype=lora_dtype)

    @classmethod
    def from_nf4(
        cls,
        gate_up: NF4Weight,
        down: NF4Weight,
        *,
        act: str = "silu",
        lora_rank: int = 0,
        lora_alpha: float | None = None,
        backend: str = "auto",
        lora_dtype: torch.dtype | None = None,
        gate: Gate | None = None,
        gate_up_bias: torch.Tensor | None = None,
        down_bias: torch.Tensor | None = None,
    ) -> "QuantGroupedExperts":
        """Wrap already-quantized NF4 weights (e.g. from bitsandbytes) without re-quantizing.

        ``gate``: the gating of the halves (``Gate``; None: ``act(g) * u``).  Biases (E, 2I) in [gate; up]
        order and (E, H), both or neither; kept as given (dtype included), frozen."""
        _check_config(gate.act if gate is not None else act, backend, lora_rank)
        e, two_i, h = gate_up.shape
        e2, h2, i = down.shape
        if e != e2 or two_i != 2 * i or h2 != h:
            raise ValueError(f"gate_up {gate_up.shape} and down {down.shape} are not (E, 2I, H) and (E, H, I)")
        if gate_up.blocksize != down.blocksize or gate_up.compress_statistics != down.compress_statistics:
            raise ValueError("gate_up and down must share blocksize and compress_statistics")
        if (gate_up_bias is None) != (down_bias is None):
            raise ValueError("pass both gate_up_bias and down_bias, or neither")
        if gate_up_bias is not None:
            if tuple(gate_up_bias.shape) != (e, two_i) or tuple(down_bias.shape) != (e, h):
                raise ValueError(f"gate_up_bias {tuple(gate_up_bias.shape)} and down_bias {tuple(down_bias.shape)} "
                                 f"are not (E, 2I) = {(e, two_i)} and (E, H) = {(e, h)}")
        with torch.device("meta"):
            self = cls(e, h, i, act=act if gate is None else gate.act, lora_rank=0, blocksize=gate_up.blocksize,
                       compress_statistics=gate_up.compress_statistics, backend=backend, dtype=gate_up.dtype,
                       gate=gate)
        self.gate_up_nf4 = gate_up
        self.down_nf4 = down
        for name in PROJECTIONS:
            setattr(self, name, marker_tensor(gate_up.packed.device))
        if gate_up_bias is not None:
            self.gate_up_bias = nn.Parameter(gate_up_bias.detach(), requires_grad=False)
            self.down_bias = nn.Parameter(down_bias.detach(), requires_grad=False)
        self.add_lora(lora_rank, lora_alpha, dtype=lora_dtype or gate_up.dtype)
        return self

    def add_lora(self, rank: int, alpha: float | None = None, *, dtype: torch.dtype | None = None) -> None:
        """(Re)create LoRA factors of the given rank: A as PEFT initialises it, B zeros."""
        _check_config(self.act, self.backend, rank)
        dev = self.gate_up_nf4.packed.device
        dtype = dtype or self.gate_up_nf4.dtype
        self.lora_rank = rank
        self.lora_alpha = float(alpha if alpha is not None else rank)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        if rank == 0:
            return
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        for proj, (fan_in, fan_out) in {"gate_up_proj": (h, 2 * i), "down_proj": (i, h)}.items():
            self.lora_A[proj] = nn.Parameter(torch.empty(e, rank, fan_in, dtype=dtype, device=dev))
            self.lora_B[proj] = nn.Parameter(torch.zeros(e, fan_out, rank, dtype=dtype, device=dev))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's default LoRA init: A ~ kaiming_uniform(a=sqrt(5)) per expert, B = 0."""
        with torch.no_grad():
            for proj in self.lora_A:
                for a in self.lora_A[proj]:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                self.lora_B[proj].zero_()

    # ------------------------------------------------------------------ properties
    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers()) + sum(
            p.numel() * p.element_size() for p in self.parameters()
        )

    def lora(self, proj: str) -> Lora | None:
        if self.lora_rank == 0:
            return None
        return Lora(self.lora_A[proj], self.lora_B[proj])

    @property
    def kernel_ready(self) -> bool:
        """Whether the Triton kernels compute this module: ``act(g) * u`` without biases (their epilogues do not
        carry a clamped / offset gate or biases yet; the reference backend computes every form)."""
        return self.gate is None and self.gate_up_bias is None

    def resolve_backend(self, x: torch.Tensor) -> str:
        if self.backend == "triton" and not self.kernel_ready:
            raise NotImplementedError(
                f"backend='triton': the Triton kernels do not compute {self._form()} yet; use backend='reference' "
                "(or 'auto', which picks it for this module)")
        if self.backend != "auto":
            return self.backend
        if not self.kernel_ready:
            if x.is_cuda and not getattr(self, "_warned_reference", False):
                import warnings

                warnings.warn(f"QuantGroupedExperts with {self._form()} runs the reference backend (PyTorch, one "
                              "expert at a time, dequantized): correct but far slower than the kernels",
                              UserWarning, stacklevel=3)
                self._warned_reference = True
            return "reference"
        return "triton" if (x.is_cuda or _interpreting()) else "reference"

    def _form(self) -> str:
        parts = []
        if self.gate is not None:
            parts.append(f"the gate {self.gate.formula(symbolic=False)}")
        if self.gate_up_bias is not None:
            parts.append("per-expert biases")
        return " and ".join(parts) or "act(g) * u"

    # ------------------------------------------------------------------ forward
    def launch_plan(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        """The Triton backend's launch plan (kernels.plan.LaunchPlan) for a call with these inputs, under the
        ``nf4moe.plan_overrides`` in force here and the current grad mode, without launching anything."""
        if self.resolve_backend(hidden_states) != "triton":
            raise ValueError(f"launch_plan: these inputs run the {self.resolve_backend(hidden_states)!r} backend, "
                             "which has no launch plan (the Triton backend runs on CUDA tensors or under "
                             "TRITON_INTERPRET=1)")
        check_forward_inputs(hidden_states, top_k_index, top_k_weights, hidden_size=self.hidden_size,
                             device=self.gate_up_nf4.packed.device, allow_float64=False)
        from .triton_backend import launch_plan

        return launch_plan(self, hidden_states, top_k_index, top_k_weights)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        backend = self.resolve_backend(hidden_states) if isinstance(hidden_states, torch.Tensor) else self.backend
        self._check_lora_containers()
        check_forward_inputs(
            hidden_states, top_k_index, top_k_weights, hidden_size=self.hidden_size,
            device=self.gate_up_nf4.packed.device, allow_float64=backend == "reference",
        )
        if hidden_states.shape[0] == 0:
            return self._empty_output(hidden_states, top_k_weights)
        if backend == "triton":
            from .triton_backend import triton_forward

            return triton_forward(self, hidden_states, top_k_index, top_k_weights)
        compute = torch.float64 if hidden_states.dtype == torch.float64 else torch.float32
        tracing = torch.compiler.is_compiling()
        # A negative id would otherwise be dropped silently like a sentinel.  Eager: the reference path
        # synchronises with the host anyway (routing offsets), so check on every device.  Under torch.compile
        # the check is an asynchronous assert and the routing static (no host sync).
        negative = "top_k_index has negative expert ids; ids must be >= 0 (ids >= E are sentinels)"
        if tracing:
            torch._assert_async((top_k_index >= 0).all(), negative)
        elif top_k_index.numel() and int(top_k_index.min()) < 0:
            raise ValueError(negative)
        out = moe_forward(
            hidden_states, top_k_index, top_k_weights,
            lambda e: self.gate_up_nf4.dequantize_expert(e, compute),
            lambda e: self.down_nf4.dequantize_expert(e, compute),
            num_experts=self.num_experts, act=self.act,
            lora_gate_up=self.lora("gate_up_proj"), lora_down=self.lora("down_proj"),
            lora_scaling=self.scaling, compute_dtype=compute, static=tracing, gate=self.gate,
            bias_gate_up=self.gate_up_bias, bias_down=self.down_bias,
        )
        return out.to(hidden_states.dtype)

    def _check_lora_containers(self) -> None:
        """PEFT (0.21) adds the expert parameter names ``gate_up_proj``/``down_proj`` to ``all-linear``
        targets on MoE models; those names also match this module's LoRA factors, and PEFT then replaces
        ``lora_A``/``lora_B`` with its own wrappers.  Say so instead of failing deep in the forward."""
        for name in ("lora_A", "lora_B"):
            got = getattr(self, name)
            if not isinstance(got, nn.ParameterDict):
                raise TypeError(
                    f"QuantGroupedExperts.{name} is a {type(got).__name__}, not nf4moe's nn.ParameterDict of LoRA "
                    "factors: PEFT wrapped nf4moe's own LoRA parameters because its target_modules / "
                    "target_parameters matched 'gate_up_proj' or 'down_proj' (PEFT adds those expert names for "
                    "'all-linear' on MoE models). nf4moe already trains the experts' LoRA: give PEFT explicit "
                    "attention / dense module names (or exclude the experts) instead."
                )

    def _empty_output(self, hidden_states: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """(0, H) for T=0, attached to the autograd graph when a gradient is wanted (all gradients are
        zero), so a training step on an empty batch shard still sees its parameters in the graph."""
        out = hidden_states.new_zeros(0, self.hidden_size)
        inputs = [hidden_states, top_k_weights, *self.parameters()]
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            out = out + 0.0 * sum(t.sum().to(out.dtype) for t in inputs if t.requires_grad)
        return out

    def extra_repr(self) -> str:
        return (
            f"E={self.num_experts}, H={self.hidden_size}, I={self.intermediate_size}, act={self.act}, "
            f"lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha:g}, blocksize={self.blocksize}, "
            f"double_quant={self.gate_up_nf4.compress_statistics}, backend={self.backend}, "
            + (f"gate={self.gate.formula(symbolic=False)}, " if self.gate is not None else "")
            + ("bias=True, " if self.gate_up_bias is not None else "")
            + f"memory={self.nbytes / 2**20:.2f} MiB"
        )
