"""End-to-end QLoRA training step of Qwen3-30B-A3B-shaped models (random weights, no download), one process.

    python bench/bench_e2e.py                      # both parts, H100: about 5-8 minutes
    python bench/bench_e2e.py --part reduced       # throughput + memory of three expert paths, 4 layers
    python bench/bench_e2e.py --part full --quick  # the 48-layer memory figure only, fewer steps
    python bench/bench_e2e.py --tiny --device cpu  # a toy config of the same architecture: a CPU smoke test

Model: Qwen3-30B-A3B's width (hidden 2048, 128 experts, moe_intermediate 768, top-8, 32 query / 4 KV
heads of 128, vocabulary 151936, untied head), sequence 2048, batch 1, random token ids as inputs and labels.
In every configuration the attention projections are bitsandbytes 4-bit NF4 (double quant) with PEFT
LoRA, the output head and embeddings bf16, the router bf16 and frozen; only the expert path differs.

Part ``reduced`` (``--layers``, default 4), LoRA r=16 (alpha 32) on experts and attention, torch AdamW on
the LoRA parameters, no gradient checkpointing; training tokens/s and peak memory of:

1. transformers + bitsandbytes + PEFT: experts bf16 (bitsandbytes' transformers integration quantizes
   ``nn.Linear`` only), LoRA on them through PEFT ``target_parameters``, transformers' ``grouped_mm``;
2. dequantize then grouped_mm: experts NF4 (bitsandbytes), each call dequantizes the whole weight,
   adds the LoRA delta ``B @ A`` per expert (what PEFT's ``target_parameters`` does) and runs ``grouped_mm``;
3. nf4moe: ``replace_experts`` (fused NF4 + LoRA kernels).

Part ``full`` (``--full-layers``, default 48): nf4moe only, built layer by layer straight into NF4 (the model
is created on the meta device; each decoder layer is materialised, initialised, its experts quantized by
``replace_experts`` and its attention by bitsandbytes before the next, so the bf16 model never exists),
LoRA r=8 and r=16 on experts and attention, ``bitsandbytes.optim.AdamW8bit``, gradient checkpointing
(non-reentrant): peak memory of a training step (forward, loss, backward, optimizer step; the maximum over
the warm-up and timed steps, so the optimizer states' first allocation is included) against the 24 GiB
budget, with the model's own loss (whole-sequence logits: 2048 x 151936 in bf16, their fp32 upcast and its
gradient, ~3.5 GiB) and with a chunked loss (output head + fp32 cross-entropy 256 positions at a time,
checkpointed: ~0.4 GiB).

Writes ``e2e_<part>.json`` (``"kind": "e2e"``, read by ``python -m nf4moe plot``) and ``e2e_<part>.md``
to ``--out`` (default ``$OUT`` or ``bench/results``).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

# Qwen3-30B-A3B config.json, the fields that shape compute and memory.
QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
    num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_hidden_layers=48,
    max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6, norm_topk_prob=True,
    tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[], hidden_act="silu",
    attention_bias=False, initializer_range=0.02, output_router_logits=False,
)
# --tiny: the same architecture at toy size, for a CPU smoke test of every code path.
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64, num_experts=8,
            num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=256)
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
BUDGET_GIB = 24.0
DTYPE = torch.bfloat16


@dataclass
class Row:
    part: str
    impl: str
    layers: int
    rank: int
    seq: int
    batch: int
    steps: int
    tokens_per_s: float | None
    step_ms: float | None
    peak_mem_gib: float | None
    weights_gib: float | None
    optimizer: str
    grad_ckpt: bool
    status: str = "ok"
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- model pieces
def make_config(layers: int, tiny: bool):
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(**{**QWEN3_30B_A3B, **(TINY if tiny else {}), "num_hidden_layers": layers})
    cfg._experts_implementation = "grouped_mm"  # transformers' fastest bf16 experts path, the peers' baseline
    return cfg


def dense_model(cfg, device: torch.device, seed: int) -> nn.Module:
    """The bf16 model with transformers' own random init (normal(0, 0.02)), built on ``device``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPE)
    model.config.use_cache = False
    return model


def to_bnb_4bit(linear: nn.Linear) -> nn.Module:
    """One ``nn.Linear`` -> bitsandbytes ``Linear4bit`` (NF4, double quant, bf16 compute), quantized on its device.

    The same module and parameter class bitsandbytes' transformers integration (``load_in_4bit``) uses.
    """
    import bitsandbytes as bnb

    device = linear.weight.device
    new = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                            compute_dtype=DTYPE, compress_statistics=True, quant_type="nf4", device="meta")
    new.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                   compress_statistics=True, blocksize=64)
    if linear.bias is not None:
        new.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return new.to(device)  # Params4bit quantizes when moved


def quantize_attention(model: nn.Module) -> int:
    """Swap the attention projections for bitsandbytes 4-bit, in place; returns how many."""
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.rpartition(".")[2] in ATTENTION]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, to_bnb_4bit(getattr(parent, child)))
    return len(names)


def lora_only(model: nn.Module) -> list[nn.Parameter]:
    """Freeze all but LoRA factors; LoRA in bf16 everywhere so the three paths train the same dtype."""
    params = []
    for n, p in model.named_parameters():
        is_lora = ".lora_A." in n or ".lora_B." in n
        p.requires_grad_(is_lora)
        if is_lora:
            if p.dtype != DTYPE:
                p.data = p.data.to(DTYPE)
            params.append(p)
    return params


class DequantLoraExperts(nn.Module):
    """The dequantize-whole-weight path: experts in NF4 (bitsandbytes), per call ``dequantize_4bit`` of each
    whole weight to bf16, plus the LoRA delta ``scaling * B[e] @ A[e]`` of every expert (as PEFT's
    ``target_parameters`` applies it), then the original experts forward (``grouped_mm``) on those tensors.
    """

    def __init__(self, experts: nn.Module, rank: int, alpha: float):
        import bitsandbytes.functional as bnbf

        super().__init__()
        self.shell = [experts]  # a list: not a registered submodule, its dense weights are dropped below
        self.states = {}
        # Named like QuantGroupedExperts' factors (E, r, in) / (E, out, r), so LoRA selection is the same.
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for proj in ("gate_up_proj", "down_proj"):
            w = getattr(experts, proj).detach()
            packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            self.register_buffer(f"{proj}_packed", packed)
            self.states[proj] = state
            e, out_f, in_f = w.shape
            a = torch.empty(e, rank, in_f, dtype=DTYPE, device=w.device)
            for i in range(e):
                nn.init.kaiming_uniform_(a[i], a=5**0.5)
            self.lora_A[proj] = nn.Parameter(a)
            self.lora_B[proj] = nn.Parameter(torch.zeros(e, out_f, rank, dtype=DTYPE, device=w.device))
            setattr(experts, proj, nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=False))
        self.scaling = alpha / rank

    def weight(self, proj: str) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        w = bnbf.dequantize_4bit(getattr(self, f"{proj}_packed"), self.states[proj])
        return w + self.scaling * torch.bmm(self.lora_B[proj], self.lora_A[proj])

    def forward(self, hidden_states, top_k_index, top_k_weights):
        from torch.func import functional_call

        params = {p: self.weight(p) for p in ("gate_up_proj", "down_proj")}
        return functional_call(self.shell[0], params, (hidden_states, top_k_index, top_k_weights))


def experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from nf4moe.adapters.table import is_experts_module

    return [(n, m) for n, m in model.named_modules() if is_experts_module(m)]


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def build_peer(impl: str, cfg, rank: int, device: torch.device, backend: str, seed: int) -> nn.Module:
    """One model of the reduced part, same random weights for every ``impl``."""
    import nf4moe
    from nf4moe import finetune as ft

    model = dense_model(cfg, device, seed)
    quantize_attention(model)
    alpha = 2 * rank
    if impl == "peft":
        from peft import LoraConfig, get_peft_model

        # The user's path: explicit targets (no "all-linear": PEFT's v4->v5 MoE rewrite would kick in).
        lcfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(ATTENTION),
                          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        model = get_peft_model(model, lcfg)
    elif impl == "dequant":
        for name, experts in experts_modules(model):
            set_module(model, name, DequantLoraExperts(experts, rank, alpha))
        ft.inject_linear_lora(model, ft.linear_targets(model, list(ATTENTION)), rank=rank, alpha=alpha)
    elif impl == "nf4moe":
        nf4moe.replace_experts(model, lora_rank=rank, lora_alpha=alpha, backend=backend)
        ft.inject_linear_lora(model, ft.linear_targets(model, list(ATTENTION)), rank=rank, alpha=alpha)
    else:
        raise ValueError(f"unknown impl {impl!r}")
    return model


IMPLS = {
    "peft": "transformers + bitsandbytes + PEFT (bf16 experts)",
    "dequant": "dequantize(bnb) + grouped_mm",
    "nf4moe": "nf4moe",
}


# ---------------------------------------------------------------------------------------------- full model
def _init_(module: nn.Module, gen: torch.Generator, std: float) -> None:
    """Random weights as transformers initialises Qwen3-MoE: matrices normal(0, std), norm weights one."""
    with torch.no_grad():
        for p in module.parameters(recurse=True):
            if p.dim() >= 2:
                p.normal_(0.0, std, generator=gen)
            else:
                p.fill_(1.0)


def build_full_nf4(cfg, device: torch.device, backend: str, seed: int, log=print) -> nn.Module:
    """The whole model with NF4 experts and 4-bit attention, one decoder layer materialised at a time.

    The skeleton lives on the meta device; each layer gets real bf16 storage (``to_empty``), random
    weights, then ``replace_experts`` (experts -> NF4, dense storage freed) and bitsandbytes 4-bit
    attention before the next layer exists.  Peak while building: the NF4 model so far + one bf16 layer.
    """
    import nf4moe
    from transformers import AutoModelForCausalLM

    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPE)
    model.config.use_cache = False
    std = cfg.initializer_range
    layers = model.model.layers
    t0 = time.perf_counter()
    for i, layer in enumerate(layers):
        layer.to_empty(device=device)
        _init_(layer, gen, std)
        nf4moe.replace_experts(layer, lora_rank=0, backend=backend)
        quantize_attention(layer)
        if (i + 1) % 8 == 0 or i + 1 == len(layers):
            log(f"  built layer {i + 1}/{len(layers)} in {time.perf_counter() - t0:.0f} s, "
                f"{_gib(_allocated_gib(device))} GiB allocated")
    for mod in (model.model.embed_tokens, model.lm_head):
        mod.to_empty(device=device)
        _init_(mod, gen, std)
    model.model.norm.to_empty(device=device)
    _init_(model.model.norm, gen, std)
    # Rotary tables are computed at construction, not initialised: build the module again on the device.
    with torch.device(device):
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"tensors still on the meta device after the layer-by-layer build: {left[:5]}")
    return model


def strip_linear_lora(model: nn.Module) -> None:
    """Remove PEFT LoRA layers injected by ``nf4moe.finetune.inject_linear_lora`` (back to the base modules)."""
    from peft.tuners.lora import LoraLayer

    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]:
        set_module(model, name, module.get_base_layer())


def set_full_lora(model: nn.Module, rank: int) -> list[nn.Parameter]:
    import nf4moe
    from nf4moe import finetune as ft

    strip_linear_lora(model)
    for m in model.modules():
        if isinstance(m, nf4moe.QuantGroupedExperts):
            m.add_lora(rank, 2 * rank, dtype=DTYPE)
    ft.inject_linear_lora(model, ft.linear_targets(model, list(ATTENTION)), rank=rank, alpha=2 * rank)
    return lora_only(model)


# ---------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated_gib(device: torch.device) -> float | None:
    """Bytes held by tensors now (CUDA); None on a CPU, where only the process's peak RSS is known."""
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _gib(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # CPU smoke runs: peak RSS


def chunked_lm_loss(model: nn.Module, ids: torch.Tensor, chunk: int) -> torch.Tensor:
    """Next-token cross-entropy with the output head and the fp32 log-softmax applied ``chunk`` positions at a time.

    Each chunk runs under non-reentrant checkpointing, so its (chunk, vocab) logits exist only while that
    chunk is computed (again in backward): about ``chunk * vocab * 10`` bytes instead of the whole
    sequence's bf16 logits, their fp32 copy and its gradient (~3.5 GiB at 2048 x 151936).
    """
    from torch.utils.checkpoint import checkpoint

    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    labels = ids[:, 1:]
    head = model.get_output_embeddings()

    def piece(h, y):
        logits = head(h).float()
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, hidden.shape[1], chunk):
        total = total + checkpoint(piece, hidden[:, s:s + chunk], labels[:, s:s + chunk], use_reentrant=False)
    return total / labels.numel()


def make_optimizer(params, name: str):
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-4)
    return torch.optim.AdamW(params, lr=1e-4)


def measure_training(model: nn.Module, params, *, seq: int, batch: int, vocab: int, warmup: int, steps: int,
                     optimizer: str, device: torch.device, seed: int, loss: str = "model", chunk: int = 256) -> dict:
    """Warm-up + timed training steps; peak memory over all of them (optimizer state allocation included).

    ``loss``: "model" (the model's own ``labels=`` loss: whole-sequence logits) or "chunked"
    (:func:`chunked_lm_loss`).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=gen)
    opt = make_optimizer(params, optimizer)
    model.train()
    losses = []

    def step():
        if loss == "chunked":
            value = chunked_lm_loss(model, ids, chunk)
        else:
            value = model(input_ids=ids, labels=ids).loss
        value.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(value.detach())

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - t0
    loss_values = [float(v) for v in losses]
    if not all(torch.isfinite(torch.tensor(loss_values))):
        raise FloatingPointError(f"non-finite training loss: {loss_values}")
    return {"tokens_per_s": batch * seq * steps / seconds, "step_ms": 1e3 * seconds / steps,
            "peak_mem_gib": _peak_gib(device), "losses": loss_values}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _oom_types() -> tuple[type, ...]:
    return (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (torch.cuda.OutOfMemoryError,)


def run_reduced(args, device: torch.device, backend: str, rows: list[Row], log=print) -> None:
    cfg = make_config(args.layers, args.tiny)
    for impl in args.impls:
        label = IMPLS[impl]
        log(f"reduced: {label}, {args.layers} layers, LoRA r={args.rank}")
        model = None
        try:
            model = build_peer(impl, cfg, args.rank, device, backend, args.seed)
            params = lora_only(model)
            _sync(device)
            weights = _allocated_gib(device)
            res = measure_training(model, params, seq=args.seq, batch=args.batch, vocab=cfg.vocab_size,
                                   warmup=args.warmup, steps=args.steps, optimizer="adamw", device=device,
                                   seed=args.seed)
            rows.append(Row("reduced", label, args.layers, args.rank, args.seq, args.batch, args.steps,
                            res["tokens_per_s"], res["step_ms"], res["peak_mem_gib"], weights, "torch AdamW",
                            False, extra={"losses": res["losses"], "trainable": sum(p.numel() for p in params)}))
            log(f"  {res['tokens_per_s']:,.0f} tokens/s, {res['step_ms']:.1f} ms/step, peak {res['peak_mem_gib']:.2f} "
                f"GiB (weights {_gib(weights)} GiB), loss {res['losses'][0]:.3f} -> {res['losses'][-1]:.3f}")
        except _oom_types() as e:
            rows.append(Row("reduced", label, args.layers, args.rank, args.seq, args.batch, args.steps, None, None,
                            None, None, "torch AdamW", False, status="OOM", note=str(e).splitlines()[0]))
            log(f"  out of memory: {str(e).splitlines()[0]}")
        finally:
            del model
            _free(device)


def run_full(args, device: torch.device, backend: str, rows: list[Row], log=print) -> None:
    cfg = make_config(args.full_layers, args.tiny)
    log(f"full: {args.full_layers} layers built layer by layer into NF4 (backend {backend})")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    model = build_full_nf4(cfg, device, backend, args.seed, log=log)
    build_s = time.perf_counter() - t0
    build_peak = _peak_gib(device)
    _sync(device)
    weights = _allocated_gib(device)
    nf4_experts = sum(m.gate_up_nf4.nbytes + m.down_nf4.nbytes for m in model.modules()
                      if hasattr(m, "gate_up_nf4")) / 2**30
    log(f"  built in {build_s:.0f} s: {_gib(weights)} GiB allocated ({nf4_experts:.2f} GiB NF4 experts), "
        f"build peak {build_peak:.2f} GiB")
    if hasattr(model, "activation_checkpointing_enable"):  # the newer name; older transformers v5 lack it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # fp32 logits of the whole sequence (the model's loss upcasts the bf16 logits): the biggest non-weight item.
    logits_fp32 = args.batch * args.seq * cfg.vocab_size * 4 / 2**30
    for rank in args.full_ranks:
        for loss in args.full_loss:
            impl = f"nf4moe r={rank}" + (", chunked loss" if loss == "chunked" else "")
            log(f"full: LoRA r={rank} on experts and attention, AdamW8bit, gradient checkpointing, "
                f"{'chunked' if loss == 'chunked' else 'whole-sequence'} loss")
            params = []
            try:
                params = set_full_lora(model, rank)  # fresh LoRA (B = 0) for every measurement
                lora_gib = sum(p.numel() * p.element_size() for p in params) / 2**30
                res = measure_training(model, params, seq=args.seq, batch=args.batch, vocab=cfg.vocab_size,
                                       warmup=args.warmup, steps=args.steps, optimizer="adamw8bit",
                                       device=device, seed=args.seed, loss=loss, chunk=args.loss_chunk)
            except _oom_types() as e:
                rows.append(Row("full", impl, args.full_layers, rank, args.seq, args.batch, args.steps, None,
                                None, None, weights, "bitsandbytes AdamW8bit", True, status="OOM",
                                note=str(e).splitlines()[0], extra={"loss": loss}))
                log(f"  out of memory: {str(e).splitlines()[0]}")
                continue
            finally:
                for p in params:
                    p.grad = None
                _free(device)
            verdict = "within" if res["peak_mem_gib"] <= BUDGET_GIB else "OVER"
            rows.append(Row("full", impl, args.full_layers, rank, args.seq, args.batch, args.steps,
                            res["tokens_per_s"], res["step_ms"], res["peak_mem_gib"], weights,
                            "bitsandbytes AdamW8bit", True, note=f"{verdict} the {BUDGET_GIB:g} GiB budget",
                            extra={"loss": loss, "loss_chunk": args.loss_chunk if loss == "chunked" else None,
                                   "nf4_experts_gib": nf4_experts, "lora_params_gib": lora_gib,
                                   "fp32_logits_gib": logits_fp32, "build_s": build_s,
                                   "build_peak_gib": build_peak, "losses": res["losses"],
                                   "trainable": sum(p.numel() for p in params)}))
            log(f"  peak {res['peak_mem_gib']:.2f} GiB (weights {_gib(weights)}, NF4 experts {nf4_experts:.2f}, "
                f"LoRA {lora_gib:.2f}, whole-sequence fp32 logits {logits_fp32:.2f}), "
                f"{res['tokens_per_s']:,.0f} tokens/s")
            del params
    del model
    _free(device)


# ---------------------------------------------------------------------------------------------- output
def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "date": datetime.date.today().isoformat(),
        "gpu": (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU ({platform.processor() or 'cpu'})"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    for mod in ("triton", "bitsandbytes", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = "not installed"
    return env


def markdown(rows: list[Row], env: dict, args) -> str:
    lines = [f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
             f"bitsandbytes {env['bitsandbytes']}, peft {env['peft']}, {env['date']}."
             + (" TOY CONFIG (--tiny), not the real shape." if args.tiny else ""), ""]
    reduced = [r for r in rows if r.part == "reduced"]
    if reduced:
        ours = next((r.tokens_per_s for r in reduced if r.impl == IMPLS["nf4moe"] and r.tokens_per_s), None)
        lines += [f"Reduced depth: {reduced[0].layers} layers, seq {reduced[0].seq}, batch {reduced[0].batch}, "
                  f"LoRA r={reduced[0].rank} on experts and attention (attention bitsandbytes 4-bit), torch AdamW, "
                  f"no gradient checkpointing; {reduced[0].steps} timed steps.", "",
                  "| implementation | tokens/s | ms/step | peak GiB | weights GiB | nf4moe speed-up |",
                  "|---|---|---|---|---|---|"]
        for r in reduced:
            if r.status != "ok":
                lines.append(f"| {r.impl} | {r.status} | | | | |")
                continue
            sp = f"{ours / r.tokens_per_s:.2f}x" if ours and r.impl != IMPLS["nf4moe"] else ""
            lines.append(f"| {r.impl} | {r.tokens_per_s:,.0f} | {r.step_ms:.1f} | {r.peak_mem_gib:.2f} | "
                         f"{_gib(r.weights_gib)} | {sp} |")
        lines.append("")
    full = [r for r in rows if r.part == "full"]
    if full:
        lines += [f"Full model: {full[0].layers} layers built layer by layer into NF4, seq {full[0].seq}, batch "
                  f"{full[0].batch}, LoRA on experts and attention, bitsandbytes AdamW8bit, gradient checkpointing; "
                  f"peak = max over the warm-up and {full[0].steps} timed steps. Budget {BUDGET_GIB:g} GiB.", "",
                  "| LoRA | loss | peak GiB | weights GiB | NF4 experts GiB | LoRA params GiB | whole-seq fp32 logits "
                  "GiB | tokens/s | verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for r in full:
            loss = "chunked" if r.extra.get("loss") == "chunked" else "whole sequence"
            if r.status != "ok":
                lines.append(f"| r={r.rank} | {loss} | {r.status} | {_gib(r.weights_gib)} | | | | | {r.note} |")
                continue
            x = r.extra
            lines.append(f"| r={r.rank} | {loss} | {r.peak_mem_gib:.2f} | {_gib(r.weights_gib)} | "
                         f"{x['nf4_experts_gib']:.2f} | {x['lora_params_gib']:.2f} | {x['fp32_logits_gib']:.2f} | "
                         f"{r.tokens_per_s:,.0f} | {r.note} |")
    return "\n".join(lines) + "\n"


def write_results(out: str, part: str, rows: list[Row], env: dict, args) -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    doc = {"kind": "e2e", "title": "QLoRA training step, Qwen3-30B-A3B width" + (" (TOY --tiny config)" if args.tiny
                                                                                 else ""),
           "env": env, "budget_gib": BUDGET_GIB,
           "config": {"layers": args.layers, "full_layers": args.full_layers, "seq": args.seq, "batch": args.batch,
                      "rank": args.rank, "full_ranks": args.full_ranks, "full_loss": args.full_loss,
                      "loss_chunk": args.loss_chunk, "tiny": args.tiny, "quick": args.quick},
           "rows": [asdict(r) for r in rows]}
    js = os.path.join(out, f"e2e_{part}.json")
    md = os.path.join(out, f"e2e_{part}.md")
    with open(js, "w") as fh:
        json.dump(doc, fh, indent=1)
    with open(md, "w") as fh:
        fh.write(markdown(rows, env, args))
    return js, md


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("reduced", "full", "all"), default="all", help="which part to run")
    ap.add_argument("--quick", action="store_true",
                    help="fewer steps (1 warm-up, 2 timed) and 2 reduced layers: a fast sanity run")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of the reduced part (default 4)")
    ap.add_argument("--full-layers", type=int, default=None, help="decoder layers of the full part (default 48)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of the reduced part (alpha = 2 x rank)")
    ap.add_argument("--full-ranks", default="8,16", help="LoRA ranks of the full part, comma-separated")
    ap.add_argument("--full-loss", default="chunked,model",
                    help="loss of the full part, comma-separated: 'model' (transformers' labels= loss on the whole "
                         "sequence's logits) and/or 'chunked' (output head + fp32 cross-entropy --loss-chunk "
                         "positions at a time, checkpointed)")
    ap.add_argument("--loss-chunk", type=int, default=256, help="positions per chunk of the chunked loss")
    ap.add_argument("--impls", default="peft,dequant,nf4moe",
                    help=f"reduced-part implementations, comma-separated, from {','.join(IMPLS)}")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default 2048; --tiny: 64)")
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2; --quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 8; --quick 2)")
    ap.add_argument("--device", default="cuda", help="torch device (default cuda; cpu only with --tiny)")
    ap.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                    help="nf4moe backend (auto: triton on CUDA, reference on CPU)")
    ap.add_argument("--tiny", action="store_true", help="toy config of the same architecture (CPU smoke test)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights and tokens")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"),
                    help="folder for e2e_<part>.json / .md (default $OUT or bench/results)")
    return ap


def resolve(args) -> argparse.Namespace:
    args.layers = args.layers or (2 if args.quick else 4)
    args.full_layers = args.full_layers or (3 if args.tiny else 48)
    args.seq = args.seq or (64 if args.tiny else 2048)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    args.steps = args.steps or (2 if args.quick else 8)
    args.full_ranks = [int(r) for r in str(args.full_ranks).split(",") if r]
    args.impls = [i for i in str(args.impls).split(",") if i]
    args.full_loss = [x for x in str(args.full_loss).split(",") if x]
    if set(args.full_loss) - {"model", "chunked"} or not args.full_loss:
        raise SystemExit(f"--full-loss: choose from model,chunked; got {args.full_loss}")
    unknown = sorted(set(args.impls) - set(IMPLS))
    if unknown:
        raise SystemExit(f"--impls: unknown {unknown}; choose from {list(IMPLS)}")
    for name in ("layers", "full_layers", "seq", "batch", "steps", "rank", "loss_chunk"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv=None) -> int:
    args = resolve(build_parser().parse_args(argv))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_e2e needs a CUDA GPU (or --tiny --device cpu for a smoke test)", file=sys.stderr)
        return 2
    if device.type != "cuda" and not args.tiny:
        print("bench_e2e measures the real shape on a GPU only; pass --tiny for a CPU smoke test", file=sys.stderr)
        return 2
    backend = args.backend if args.backend != "auto" else ("triton" if device.type == "cuda" else "reference")
    env = environment(device)
    print(json.dumps(env), flush=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    written = []
    parts = ("reduced", "full") if args.part == "all" else (args.part,)
    for part in parts:
        rows: list[Row] = []
        (run_reduced if part == "reduced" else run_full)(args, device, backend, rows, log=log)
        written += write_results(args.out, part, rows, env, args)
        print(markdown(rows, env, args), flush=True)
    print("wrote " + ", ".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
