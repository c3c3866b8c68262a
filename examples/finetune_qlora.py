#!/usr/bin/env python
"""QLoRA fine-tuning of a Mixture-of-Experts model with the Hugging Face Trainer and nf4moe.

    python examples/finetune_qlora.py --model Qwen/Qwen3-30B-A3B --data train.jsonl --output-dir out \\
        --bf16 --gradient-checkpointing --seq-len 2048 --max-steps 1000

What goes where in the one model:

- expert layers (3-D ``gate_up_proj`` / ``down_proj``): NF4 base + LoRA in nf4moe's fused kernels,
  quantized while the checkpoint loads (``nf4moe.from_pretrained``), so the bf16 experts never
  all sit in memory;
- attention and the other ``nn.Linear`` layers (shared experts, dense MLPs; not the output head, not the
  router): bitsandbytes 4-bit (``BitsAndBytesConfig``, NF4, double quant) + PEFT LoRA, as usual.  Where
  bitsandbytes' 4-bit Linear cannot run on the device (``--linear-4bit auto`` probes it; some CPU builds),
  they stay in ``--bf16`` / fp32 with plain PEFT LoRA, and the script says so.

Data: a local ``.jsonl`` file (one object per line, text under ``--text-field``) or a text file (one
example per non-empty line).  Examples are tokenized, joined with EOS and packed into ``--seq-len`` blocks.

Output (``--output-dir``): ``adapter/`` (one PEFT-format adapter: ``target_parameters`` for the experts and
``target_modules`` for the linear layers; ``peft.PeftModel.from_pretrained(base_model, dir)`` loads it onto
the original model, ``nf4moe.finetune.load_lora`` onto an nf4moe model), ``train_summary.json``
(loss, tokens/s, peak memory), and with ``--merged-dir`` a dense merged model (``save_pretrained``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import nf4moe
from nf4moe import finetune as ft

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="finetune_qlora.py", description=__doc__.split("\n\n")[0],
        epilog="Every flag has a default except --model, --data and --output-dir.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = ap.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="a supported MoE model: a local checkpoint directory or a Hugging Face hub name")
    g.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or hub name (default: the model's); 'bytes' for nf4moe's byte tokenizer "
                        "(UTF-8 bytes + pad/bos/eos, vocabulary 259) for models trained on it")
    g.add_argument("--device", default="auto", help="cuda, cuda:N or cpu; auto picks cuda when available")
    g.add_argument("--backend", default="auto", choices=("auto", "triton", "reference"),
                   help="nf4moe expert backend; auto: triton on CUDA, reference (plain PyTorch) on CPU")
    g.add_argument("--linear-4bit", default="auto", choices=("auto", "on", "off"),
                   help="non-expert linear layers in bitsandbytes 4-bit NF4. auto: on where bitsandbytes' 4-bit "
                        "Linear runs on --device (a probe), else off: dense layers with plain PEFT LoRA (said on "
                        "stdout)")
    g.add_argument("--bf16", action="store_true",
                   help="load non-expert weights in bf16 and train with bf16 autocast (else fp32)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each decoder layer in backward (non-reentrant): activations of one layer at a "
                        "time instead of all layers")
    g = ap.add_argument_group("LoRA")
    g.add_argument("--lora-rank", type=int, default=16, help="LoRA rank on experts and linear layers")
    g.add_argument("--lora-alpha", type=float, default=32, help="LoRA alpha (scale alpha / rank)")
    g.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the PEFT LoRA input (linear layers)")
    g.add_argument("--target-modules", default="all-linear",
                   help="linear layers that get PEFT LoRA: 'all-linear' (all but the output head), comma-separated "
                        "names such as q_proj,k_proj,v_proj,o_proj, or 'none' (LoRA on the experts only)")
    g = ap.add_argument_group("data")
    g.add_argument("--data", required=True, help="local .jsonl (one JSON object per line) or text file (one example "
                                                 "per non-empty line)")
    g.add_argument("--text-field", default="text", help="key of the text in each JSONL object")
    g.add_argument("--seq-len", type=int, default=2048, help="tokens per packed training sequence")
    g.add_argument("--max-examples", type=int, default=None, help="use only the first N examples of --data")
    g = ap.add_argument_group("training")
    g.add_argument("--output-dir", required=True, help="where the adapter, the summary and Trainer logs go")
    g.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; -1: run --epochs epochs")
    g.add_argument("--epochs", type=float, default=1.0, help="epochs over the packed data when --max-steps is -1")
    g.add_argument("--batch-size", type=int, default=1, help="sequences per device per micro-batch")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    g.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps, then cosine decay")
    g.add_argument("--optim", default="adamw_torch",
                   help="Trainer optimizer name, e.g. adamw_torch, adamw_bnb_8bit, paged_adamw_8bit")
    g.add_argument("--logging-steps", type=int, default=10, help="log loss, tokens/s and peak memory every N steps")
    g.add_argument("--seed", type=int, default=0, help="seed of LoRA init and data order")
    g.add_argument("--merged-dir", default=None,
                   help="also write a dense merged model here: the checkpoint reloaded on CPU in the training dtype, "
                        "LoRA of linear layers merged by PEFT, experts by nf4moe.merge_and_unload "
                        "(dequantized NF4 + LoRA delta)")
    return ap


# ---------------------------------------------------------------------------------------------- data
def read_examples(path: str, text_field: str, limit: int | None) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--data {path}: no such file")
    texts = []
    with open(p, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            if p.suffix == ".jsonl":
                obj = json.loads(line)
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise SystemExit(f"--data {path}, line {n}: no string field {text_field!r} (--text-field)")
                texts.append(obj[text_field])
            else:
                texts.append(line.rstrip("\n"))
            if limit is not None and len(texts) >= limit:
                break
    if not texts:
        raise SystemExit(f"--data {path}: no examples")
    return texts


class PackedDataset(torch.utils.data.Dataset):
    """Token ids of all examples, each followed by EOS, cut into ``seq_len`` blocks (a partial last one is dropped)."""

    def __init__(self, texts: list[str], tokenizer, seq_len: int):
        eos = getattr(tokenizer, "eos_token_id", None)
        ids: list[int] = []
        for t in texts:
            ids += _encode(tokenizer, t) + ([eos] if eos is not None else [])
        n = len(ids) // seq_len
        if n == 0:
            raise SystemExit(f"the data holds {len(ids)} tokens, fewer than one --seq-len block ({seq_len})")
        self.blocks = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def _encode(tokenizer, text: str) -> list[int]:
    if isinstance(tokenizer, ft.ByteTokenizer):
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def load_tokenizer(args):
    if args.tokenizer == "bytes":
        return ft.ByteTokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(args.tokenizer or args.model)


# ---------------------------------------------------------------------------------------------- model
def bnb_linear_runs(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether bitsandbytes' 4-bit Linear runs forward and backward on ``device`` (a 64x64 probe)."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        return False, f"bitsandbytes does not import ({e})"
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4").to(device)
        x = torch.randn(2, 64, device=device, dtype=dtype, requires_grad=True)
        layer(x).sum().backward()
    except (RuntimeError, NotImplementedError, AssertionError) as e:
        return False, f"bitsandbytes 4-bit Linear failed on {device}: {type(e).__name__}: {e}"
    return True, ""


def load_model(args, device: torch.device, dtype: torch.dtype, backend: str):
    """nf4moe.from_pretrained: experts quantized to NF4 as they load; linear layers via bitsandbytes when asked."""
    kwargs = dict(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, backend=backend, dtype=dtype,
                  device=str(device))
    use_4bit, note = args.linear_4bit != "off", ""
    if use_4bit:
        ok, why = bnb_linear_runs(device, dtype)
        if not ok and args.linear_4bit == "on":
            raise SystemExit(f"--linear-4bit on: {why}")
        if not ok:
            use_4bit, note = False, why
    if use_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
        print("linear layers: bitsandbytes 4-bit NF4 (double quant) + PEFT LoRA")
    else:
        print(f"linear layers: NOT quantized ({str(dtype).removeprefix('torch.')}), plain PEFT LoRA"
              + (f" -- fallback: {note}" if note else " (--linear-4bit off)"))
    model = nf4moe.from_pretrained(args.model, **kwargs)
    return model, use_4bit


def add_linear_lora(model, args) -> list[str]:
    spec = args.target_modules.strip()
    if spec in ("", "none"):
        names = []
    else:
        names = ft.linear_targets(model, "all-linear" if spec == "all-linear" else spec.split(","))
        ft.inject_linear_lora(model, names, rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    # transformers' Trainer refuses a 4-bit model "without adapters" unless this flag (what model.add_adapter sets)
    # is on; the adapters are attached by nf4moe.finetune instead, see ft.inject_linear_lora for why.
    model._hf_peft_config_loaded = True
    return names


# ---------------------------------------------------------------------------------------------- training
def make_trainer_class():
    from transformers import Trainer

    class MeteredTrainer(Trainer):
        """Adds tokens/s (since the previous log) and peak memory to every log line."""

        tokens_per_step = 0
        device_for_memory = torch.device("cpu")
        _last = None

        def log(self, logs, *args, **kwargs):
            now, step = time.perf_counter(), self.state.global_step
            if self._last is not None and step > self._last[1]:
                logs["tokens_per_s"] = round(self.tokens_per_step * (step - self._last[1]) / (now - self._last[0]), 1)
            if "loss" in logs or "train_loss" in logs:
                logs["peak_mem_gib"] = round(ft.peak_memory_bytes(self.device_for_memory) / 2**30, 3)
            self._last = (now, step)
            super().log(logs, *args, **kwargs)

    return MeteredTrainer


def train(args) -> dict:
    from transformers import TrainingArguments, set_seed

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no CUDA device")
    backend = args.backend if args.backend != "auto" else ("triton" if device.type == "cuda" else "reference")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    set_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = load_tokenizer(args)
    t0 = time.perf_counter()
    model, use_4bit = load_model(args, device, dtype, backend)
    ft.check_vocab(model, tokenizer)
    names = add_linear_lora(model, args)
    counts = ft.count_lora(model)
    n_experts = sum(isinstance(m, nf4moe.QuantGroupedExperts) for m in model.modules())
    print(f"model: {args.model} loaded in {time.perf_counter() - t0:.1f} s on {device}; {n_experts} expert layers in "
          f"NF4 (backend {backend}); trainable LoRA: {counts.experts:,} on experts, {counts.linear:,} on "
          f"{len(names)} linear layers")
    if args.gradient_checkpointing:
        model.config.use_cache = False
        if hasattr(model, "activation_checkpointing_enable"):  # the newer name; older transformers v5 lack it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    data = PackedDataset(read_examples(args.data, args.text_field, args.max_examples), tokenizer, args.seq_len)
    print(f"data: {args.data}: {len(data)} blocks of {args.seq_len} tokens")
    targs = TrainingArguments(
        output_dir=str(out / "trainer"),
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim=args.optim,
        bf16=args.bf16,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=device.type == "cpu",
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    Trainer = make_trainer_class()
    Trainer.tokens_per_step = args.batch_size * args.grad_accum * args.seq_len
    Trainer.device_for_memory = device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trainer = Trainer(model=model, args=targs, train_dataset=data)
    t1 = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - t1
    steps = trainer.state.global_step
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    summary = {
        "model": args.model,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "backend": backend,
        "linear_4bit": use_4bit,
        "dtype": str(dtype).removeprefix("torch."),
        "gradient_checkpointing": args.gradient_checkpointing,
        "lora_rank": args.lora_rank,
        "lora_alpha": args.lora_alpha,
        "trainable_expert_lora": counts.experts,
        "trainable_linear_lora": counts.linear,
        "steps": steps,
        "seq_len": args.seq_len,
        "tokens": steps * Trainer.tokens_per_step,
        "train_seconds": round(seconds, 2),
        "tokens_per_s": round(steps * Trainer.tokens_per_step / seconds, 1),
        "peak_memory_gib": round(ft.peak_memory_bytes(device) / 2**30, 3),
        "peak_memory_kind": ft.memory_label(device),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "train_loss": result.training_loss,
    }
    adapter_dir = out / "adapter"
    ft.save_lora(model, adapter_dir)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(adapter_dir)
    summary["adapter"] = str(adapter_dir)
    print(f"trained {steps} steps in {seconds:.1f} s: {summary['tokens_per_s']:,.0f} tokens/s, "
          f"{summary['peak_memory_kind']} {summary['peak_memory_gib']:.2f} GiB, loss {summary['first_loss']} -> "
          f"{summary['last_loss']}; adapter (PEFT format) in {adapter_dir}")
    if args.merged_dir:
        del trainer, model
        summary["merged"] = merge(args, adapter_dir, dtype, tokenizer)
    with open(out / "train_summary.json", "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary


def merge(args, adapter_dir: Path, dtype: torch.dtype, tokenizer) -> str:
    """Dense merged model on CPU: linear LoRA merged into the checkpoint's weights, experts into dequantized NF4."""
    import transformers

    t0 = time.perf_counter()
    base = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, device_map="cpu")
    nf4moe.replace_experts(base, lora_rank=0, backend="reference")
    ft.load_lora(base, adapter_dir)
    merged = ft.merge_lora(base, dtype)
    merged.save_pretrained(args.merged_dir)
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(args.merged_dir)
    print(f"merged model written to {args.merged_dir} in {time.perf_counter() - t0:.1f} s")
    return str(args.merged_dir)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("lora_rank", "seq_len", "batch_size", "grad_accum", "logging_steps"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_steps == -1 and not (args.epochs > 0 and math.isfinite(args.epochs)):
        raise SystemExit("--epochs must be a positive number when --max-steps is -1")
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
