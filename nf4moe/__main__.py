"""``python -m nf4moe <command>``: the project's main job and its tools.

Commands:
    demo        QLoRA fine-tuning of a small Qwen3-MoE model shipped in the package (random init, no
                download): experts in NF4 with LoRA (nf4moe), LoRA on attention (PEFT), a few hundred
                steps on the packaged text corpus with a progress bar, held-out loss before and after,
                adapter saved in PEFT format, reloaded into a fresh model (identical logits checked),
                and a generated sample.  Under two minutes on a 2-core CPU.
    layer-demo  one MoE expert layer of Qwen3-30B-A3B's shape, scaled down to fit a CPU: random bf16
                weights quantized to NF4, run on random routed tokens; prints bf16 vs NF4 memory, the
                output error against the bf16 layer, and the time per call.
    bench       the layer benchmark against its peers on a GPU (nf4moe/benchmarks/layer.py).
    plot        PNG plots of benchmark JSON (bench/results/*.json) under bench/plots/ (needs the
                `plot` extra: pip install nf4moe[plot]).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

# Qwen3-30B-A3B (config.json): 128 experts, hidden 2048, moe_intermediate_size 768, 8 experts per token,
# 48 layers.  The demo keeps top-8 and shrinks the rest so it runs in seconds on a laptop CPU.
REAL_MODEL = "Qwen3-30B-A3B"
REAL_SHAPE = dict(experts=128, hidden=2048, intermediate=768, top_k=8, layers=48)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_per_call(fn, device: torch.device, *, min_calls: int, budget_s: float) -> tuple[float, int]:
    """Seconds per call: one warm-up, then at least ``min_calls`` timed calls, more while under budget."""
    fn()
    _sync(device)
    n, start = 0, time.perf_counter()
    while n < min_calls or (time.perf_counter() - start < budget_s and n < 1000):
        fn()
        n += 1
    _sync(device)
    return (time.perf_counter() - start) / n, n


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def _route(x: torch.Tensor, num_experts: int, top_k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A Qwen3-style router on random weights: softmax over experts, top-k, renormalised (norm_topk_prob)."""
    router = torch.randn(num_experts, x.shape[1], generator=gen).to(x.device) / x.shape[1] ** 0.5
    probs = torch.softmax(x.float() @ router.T * 4.0, dim=-1)  # x4: a peakier, more realistic load spread
    top_w, top_i = probs.topk(top_k, dim=-1)
    return top_i, top_w / top_w.sum(dim=-1, keepdim=True)


def layer_demo(args: argparse.Namespace) -> int:
    from nf4moe import QuantGroupedExperts
    from nf4moe.reference import moe_forward

    device = torch.device(args.device)
    e, h, i, k, t = args.experts, args.hidden, args.intermediate, args.top_k, args.tokens
    if not 1 <= k <= e:
        raise SystemExit(f"nf4moe layer-demo: --top-k must be between 1 and --experts ({e}), got {k}")
    gen = torch.Generator().manual_seed(args.seed)
    # Random bf16 weights at the scale of a trained layer (unit-variance activations stay unit-variance).
    gate_up = (torch.randn(e, 2 * i, h, generator=gen) / h**0.5).to(torch.bfloat16).to(device)
    down = (torch.randn(e, h, i, generator=gen) / i**0.5).to(torch.bfloat16).to(device)
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16).to(device)
    top_k_index, top_k_weights = _route(x, e, k, gen)

    real = REAL_SHAPE
    print(f"nf4moe layer-demo: one MoE expert layer with NF4 base weights ({args.tokens} tokens, seed {args.seed})")
    print(f"  shape     E={e}, H={h}, I={i}, top-{k}  ({REAL_MODEL} is E={real['experts']}, H={real['hidden']}, "
          f"I={real['intermediate']}, top-{real['top_k']}; scaled down to fit a CPU)")

    import bitsandbytes.functional  # noqa: F401  (its import, ~seconds on a CPU, is not quantization time)

    _sync(device)
    t0 = time.perf_counter()
    layer = QuantGroupedExperts.from_weights(gate_up, down, compress_statistics=True, backend=args.backend)
    _sync(device)
    t_quant = time.perf_counter() - t0
    backend = layer.resolve_backend(x)
    print(f"  quantize  bf16 -> NF4 (blocksize {layer.blocksize}, double quant): {t_quant * 1e3:.1f} ms "
          f"on {device}, backend={backend}")

    n_weights = gate_up.numel() + down.numel()
    bf16_bytes = n_weights * 2
    nf4_bytes = layer.nbytes
    bits = 8 * nf4_bytes / n_weights
    real_weights = real["experts"] * 3 * real["hidden"] * real["intermediate"] * real["layers"]
    print(f"  memory    bf16 {bf16_bytes / 2**20:.2f} MiB -> NF4 {nf4_bytes / 2**20:.2f} MiB "
          f"({bf16_bytes / nf4_bytes:.2f}x smaller, {bits:.2f} bits/weight)")
    print(f"            {REAL_MODEL}'s {real['layers']} expert layers at that rate: "
          f"{real_weights * 2 / 2**30:.1f} GiB bf16 -> {real_weights * bits / 8 / 2**30:.1f} GiB NF4")

    with torch.no_grad():
        out = layer(x, top_k_index, top_k_weights)
        ref = moe_forward(x, top_k_index, top_k_weights, gate_up, down)  # the bf16 layer, fp32 math
        rel = _rel(out, ref)
        w_rel = _rel(layer.gate_up_nf4.dequantize(torch.float32), gate_up)
        print(f"  error     ||out_nf4 - out_bf16|| / ||out_bf16|| = {rel:.4f}  (weights alone: {w_rel:.4f}; "
              "gate, up and down each add their NF4 rounding)")
        if not out.isfinite().all():
            raise SystemExit("nf4moe layer-demo: the NF4 layer produced non-finite values")

        def run_nf4():
            layer(x, top_k_index, top_k_weights)

        def run_bf16():
            moe_forward(x, top_k_index, top_k_weights, gate_up, down)

        per_nf4, n1 = _time_per_call(run_nf4, device, min_calls=args.min_calls, budget_s=args.time_budget)
        per_bf16, n2 = _time_per_call(run_bf16, device, min_calls=args.min_calls, budget_s=args.time_budget)
    print(f"  time      NF4 layer ({backend}) {per_nf4 * 1e3:.2f} ms per call ({n1} calls); "
          f"bf16 reference layer {per_bf16 * 1e3:.2f} ms per call ({n2} calls)")
    return 0


# ------------------------------------------------------------------------------------- demo (QLoRA)
def _corpus_ids(text: str, tokenizer) -> torch.Tensor:
    """Every non-empty line as [bos] + its bytes + newline, concatenated into one stream of ids."""
    ids: list[int] = []
    for line in text.splitlines():
        if line.strip():
            ids += tokenizer.encode(line + "\n")
    return torch.tensor(ids, dtype=torch.long)


def _windows(stream: torch.Tensor, starts: torch.Tensor, seq: int) -> torch.Tensor:
    return torch.stack([stream[int(s):int(s) + seq] for s in starts])


@torch.no_grad()
def _mean_loss(model, batches: list[torch.Tensor], device: torch.device) -> float:
    was_training = model.training
    model.eval()
    losses = [float(model(input_ids=b.to(device), labels=b.to(device)).loss) for b in batches]
    model.train(was_training)
    return sum(losses) / len(losses)


def _demo_tokenizer(model_path: str | None):
    from nf4moe.finetune import ByteTokenizer

    if model_path and Path(model_path).is_dir() and any(
            (Path(model_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        tok.encode = (lambda text, _enc=tok.encode: _enc(text, add_special_tokens=False))
        return tok, "the model's own"
    return ByteTokenizer(), "byte-level (UTF-8 bytes + pad/bos/eos)"


@torch.no_grad()
def _sample(model, tokenizer, args, device: torch.device) -> str:
    """The prompt and up to --max-new-tokens sampled after it (temperature 0.5, top-10, seeded), up to a newline."""
    was_training = model.training
    model.eval()
    prompt_ids = torch.tensor([tokenizer.encode(args.prompt)], device=device)
    stop = [i for i in (getattr(tokenizer, "eos_token_id", None), tokenizer.encode("\n")[-1]) if i is not None]
    pad = getattr(tokenizer, "pad_token_id", None)
    torch.manual_seed(args.seed)
    out = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                         max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.5, top_k=10,
                         eos_token_id=stop, pad_token_id=pad if pad is not None else stop[0])
    model.train(was_training)
    return args.prompt + tokenizer.decode(out[0, prompt_ids.shape[1]:].tolist()).rstrip("\n")


def _demo_model(args, config, dtype: torch.dtype, device: torch.device):
    """The base model: the checkpoint at --model if it has weights, else random weights from --seed."""
    from nf4moe.finetune import has_weights, random_model

    if args.model and has_weights(args.model):
        import transformers

        return transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    return random_model(config, seed=args.seed, dtype=dtype, device=device)


def demo(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from tqdm.auto import tqdm

    import nf4moe
    from nf4moe import finetune as ft

    if args.steps < 1:
        raise SystemExit(f"nf4moe demo: --steps must be >= 1, got {args.steps}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("nf4moe demo: --device cuda but torch sees no CUDA device")
    backend = args.backend if args.backend != "auto" else ("triton" if device.type == "cuda" else "reference")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    threads = torch.get_num_threads()
    if device.type == "cpu" and args.threads:
        # The model is tiny: one thread is nearly as fast as two, and OpenMP spin-waits turn a busy
        # second core into a 100x slowdown.
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="nf4moe-demo-"))
    try:
        return _demo(args, ft, nf4moe, tqdm, device, backend, dtype, out_dir)
    finally:
        torch.set_num_threads(threads)
        if not args.out:
            shutil.rmtree(out_dir, ignore_errors=True)


def _demo(args, ft, nf4moe, tqdm, device, backend, dtype, out_dir: Path) -> int:
    t_start = time.perf_counter()
    config = ft.load_config(args.model)
    tokenizer, tok_kind = _demo_tokenizer(args.model)
    targets = [] if args.lora_targets in ("", "none") else args.lora_targets.split(",")
    model = _demo_model(args, config, dtype, device)
    ft.check_vocab(model, tokenizer)
    dense_experts = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                        if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    counts = ft.add_lora(model, rank=args.rank, alpha=2 * args.rank, backend=backend, target_modules=targets)
    nf4_bytes = sum(m.gate_up_nf4.nbytes + m.down_nf4.nbytes for m in model.modules()
                    if isinstance(m, nf4moe.QuantGroupedExperts))
    n_layers = sum(isinstance(m, nf4moe.QuantGroupedExperts) for m in model.modules())
    src = args.model or f"{ft.DEFAULT_CONFIG.name} (packaged)"
    print(f"nf4moe demo: QLoRA fine-tuning of a {config.model_type} model on {device} (backend={backend})")
    print(f"  model     {src}: {getattr(config, 'num_hidden_layers', '?')} layers, hidden {config.hidden_size}, "
          f"{n_layers} MoE layers; tokenizer {tok_kind}; "
          + ("weights from the checkpoint" if args.model and ft.has_weights(args.model)
             else f"random init, seed {args.seed}"))
    print(f"  experts   {dense_experts / 2**20:.2f} MiB {str(dtype).removeprefix('torch.')} -> "
          f"{nf4_bytes / 2**20:.2f} MiB NF4 (double quant)")
    print(f"  LoRA      r={args.rank}, alpha={2 * args.rank}: {counts.experts:,} parameters on experts (nf4moe)"
          + (f", {counts.linear:,} on {counts.linear_modules} attention projections (PEFT: {','.join(targets)})"
             if counts.linear else "") + "; everything else frozen")

    corpus = Path(args.data) if args.data else ft.DEFAULT_CORPUS
    lines = [ln for ln in corpus.read_text(encoding="utf-8").splitlines() if ln.strip()]
    n_eval = max(1, len(lines) // 20)
    train_ids = _corpus_ids("\n".join(lines[:-n_eval]), tokenizer)
    eval_ids = _corpus_ids("\n".join(lines[-n_eval:]), tokenizer)
    seq = args.seq_len
    if len(train_ids) <= seq or len(eval_ids) <= seq:
        raise SystemExit(f"nf4moe demo: {corpus} is too short for --seq-len {seq}")
    gen = torch.Generator().manual_seed(args.seed)
    eval_batches = [_windows(eval_ids, torch.randint(0, len(eval_ids) - seq, (args.batch_size,), generator=gen), seq)
                    for _ in range(4)]
    print(f"  data      {corpus.name}: {len(train_ids):,} training tokens, {len(eval_ids):,} held out; "
          f"batch {args.batch_size} x {seq} tokens")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = min(20, args.steps // 10)
    def lr_factor(s: int) -> float:  # linear warm-up, then cosine decay to 10% of the peak
        return min(1.0, (s + 1) / max(warmup, 1)) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / args.steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    loss_before = _mean_loss(model, eval_batches, device)
    print(f"  sample    before training: {_sample(model, tokenizer, args, device)!r}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    meter = ft.Meter(device)
    losses: list[float] = []
    every = max(1, args.steps // 10)
    model.train()
    bar = tqdm(range(args.steps), desc="training", unit="step", dynamic_ncols=True, disable=args.no_progress)
    for step in bar:
        batch = _windows(train_ids, torch.randint(0, len(train_ids) - seq, (args.batch_size,), generator=gen), seq)
        batch = batch.to(device)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        meter.step(batch.numel())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{meter.tokens_per_s:,.0f}", mem=f"{meter.peak_gib:.2f}GiB",
                        refresh=False)
        if step % every == 0 or step == args.steps - 1:
            msg = (f"  step {step + 1:4d}/{args.steps}  loss {losses[-1]:.3f}  {meter.tokens_per_s:,.0f} tokens/s  "
                   f"{ft.memory_label(device)} {meter.peak_gib:.2f} GiB")
            if args.no_progress:
                print(msg, flush=True)
            else:
                tqdm.write(msg)
    bar.close()
    train_s = meter.elapsed
    loss_after = _mean_loss(model, eval_batches, device)
    k = max(1, min(10, args.steps // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"  training  {args.steps} steps in {train_s:.1f} s ({meter.tokens / train_s:,.0f} tokens/s, "
          f"{ft.memory_label(device)} {meter.peak_gib:.2f} GiB)")
    print(f"  loss      train (mean of {k} steps) {first:.3f} -> {last:.3f}; "
          f"held-out {loss_before:.3f} -> {loss_after:.3f}")

    adapter_dir = out_dir / "adapter"
    cfg = ft.save_lora(model, adapter_dir)
    size = sum(f.stat().st_size for f in adapter_dir.iterdir())
    print(f"  saved     PEFT adapter ({size / 2**20:.2f} MiB; target_parameters {len(cfg['target_parameters'])}, "
          f"target_modules {cfg.get('target_modules') or []}) to {adapter_dir}"
          + ("" if args.out else " (temporary; --out DIR keeps it)"))

    fresh = _demo_model(args, config, dtype, device)
    nf4moe.replace_experts(fresh, lora_rank=0, backend=backend)
    ft.load_lora(fresh, adapter_dir)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        probe = eval_batches[0].to(device)
        a, b = model(input_ids=probe).logits.float(), fresh(input_ids=probe).logits.float()
        diff = float((a - b).abs().max())
        rel = float((a - b).norm() / a.norm())
    # Same weights, same kernels: bit-identical on a CPU.  On a GPU, kernel autotuning or atomics in a
    # library op may reorder a sum; accept bf16 rounding there, never more.
    if diff == 0.0:
        verdict = "identical to"
    elif device.type == "cuda" and rel < 1e-2:
        verdict = f"equal up to bf16 rounding (relative {rel:.1e}) to"
    else:
        raise SystemExit(f"nf4moe demo: the reloaded adapter does not reproduce the trained model "
                         f"(max |diff| {diff:.3g}, relative {rel:.3g})")
    print(f"  reloaded  fresh model + load_lora: logits {verdict} the trained model's (max |diff| = {diff:.3g})")
    print(f"  sample    after training (reloaded model): {_sample(fresh, tokenizer, args, device)!r}")
    print(f"  done in {time.perf_counter() - t_start:.1f} s")
    return 0


# ------------------------------------------------------------------------------------------- plot
def plot(args: argparse.Namespace) -> int:
    from nf4moe.plot import main as plot_main

    return int(plot_main(args.plot_args) or 0)


# ------------------------------------------------------------------------------------------ bench
def bench(args: argparse.Namespace) -> int:
    # Every argument after `bench` goes to the benchmark's own parser.  Imported here only, so the demo and the
    # library never import benchmark code.
    from nf4moe.benchmarks.layer import main as bench_main

    return int(bench_main(list(args.bench_args)) or 0)


# ------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nf4moe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,layer-demo,bench,plot}")

    f = sub.add_parser("demo", help="QLoRA fine-tuning of a small packaged Qwen3-MoE model (no download)",
                       description="QLoRA fine-tuning demo: experts in NF4 + LoRA (nf4moe), LoRA on attention (PEFT), "
                                   "trained on a packaged corpus; saves, reloads and samples.")
    f.add_argument("--steps", type=int, default=500, help="optimizer steps (default 500)")
    f.add_argument("--model", default=None,
                   help="a local config JSON (random init) or checkpoint directory (its weights, and its tokenizer "
                        "if it has one); default: the packaged nf4moe/data/tiny_qwen3_moe.json")
    f.add_argument("--data", default=None, help="a local UTF-8 text file, one example per line "
                                                "(default: the packaged nf4moe/data/tiny_stories.txt)")
    f.add_argument("--device", default=_default_device(), help="torch device (default: cuda if available, else cpu)")
    f.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"),
                   help="QuantGroupedExperts backend (default auto: triton on CUDA, reference on CPU)")
    f.add_argument("--seed", type=int, default=0, help="seed of the random init, the batches and the sample")
    f.add_argument("--rank", type=int, default=16, help="LoRA rank on experts and attention (alpha = 2 x rank)")
    f.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="comma-separated linear modules that get PEFT LoRA besides the experts ('none': experts only)")
    f.add_argument("--lr", type=float, default=6e-3, help="peak learning rate, AdamW, warmup + cosine (default 6e-3)")
    f.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    f.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    f.add_argument("--prompt", default="Nora has five pears.", help="prompt of the generated samples")
    f.add_argument("--max-new-tokens", type=int, default=120, help="length limit of the sample (stops at a newline)")
    f.add_argument("--out", default=None, help="directory to keep the adapter in (default: a temporary one)")
    f.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the model is tiny; 0 keeps torch's default)")
    f.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    f.set_defaults(func=demo)

    d = sub.add_parser("layer-demo", help="quantize and run one scaled-down Qwen3-30B-A3B expert layer")
    d.add_argument("--tokens", type=int, default=256, help="tokens routed through the layer (default 256)")
    d.add_argument("--experts", type=int, default=32, help=f"number of experts E (default 32; {REAL_MODEL}: 128)")
    d.add_argument("--hidden", type=int, default=512, help=f"hidden size H (default 512; {REAL_MODEL}: 2048)")
    d.add_argument("--intermediate", type=int, default=256,
                   help=f"expert intermediate size I (default 256; {REAL_MODEL}: 768)")
    d.add_argument("--top-k", type=int, default=8, help="experts per token K (default 8, as the real model)")
    d.add_argument("--device", default=_default_device(), help="torch device (default: cuda if available, else cpu)")
    d.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"),
                   help="QuantGroupedExperts backend (default auto: triton on CUDA, reference on CPU)")
    d.add_argument("--seed", type=int, default=0, help="seed of the random weights, tokens and router")
    d.add_argument("--min-calls", type=int, default=3, help="timed calls at least (default 3)")
    d.add_argument("--time-budget", type=float, default=1.0,
                   help="seconds spent timing each layer beyond --min-calls (default 1.0)")
    d.set_defaults(func=layer_demo)

    b = sub.add_parser("bench", help="layer benchmark against the peers (nf4moe/benchmarks/layer.py)",
                       add_help=False)  # --help goes to the benchmark itself
    b.set_defaults(func=bench)  # every argument after `bench` goes to the benchmark (see main)

    p = sub.add_parser("plot", help="PNG plots of benchmark JSON (nf4moe/plot.py)", add_help=False)
    p.set_defaults(func=plot)  # arguments after `plot` go to nf4moe.plot.main

    m = sub.add_parser("models", help="the expert classes of the installed transformers and whether "
                                      "replace_experts supports them (from the adapter table)")
    m.add_argument("--all", action="store_true", help="also list the unsupported classes and why")
    m.set_defaults(func=models)
    return parser


def models_markdown(include_unsupported: bool = False) -> str:
    """The supported-model table, generated from nf4moe.adapters' layout table (README embeds it)."""
    import transformers

    from .adapters import supported_models

    rows = supported_models()
    lines = [f"Expert classes of transformers {transformers.__version__} (`python -m nf4moe models --all`):", "",
             "| model_type | experts class | layout | supported | why not |", "|---|---|---|---|---|"]
    for r in rows:
        if r["supported"] or include_unsupported:
            lines.append(f"| {r['model_type']} | {r['experts_class']} | {r['layout']} | "
                         f"{'yes' if r['supported'] else 'no'} | {r['reason']} |")
    n_ok = sum(r["supported"] for r in rows)
    lines += ["", f"{n_ok} of {len(rows)} decorated expert classes supported."]
    return "\n".join(lines) + "\n"


def models(args) -> int:
    print(models_markdown(args.all), end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args: argparse.REMAINDER in a subparser rejects a leading "--option", and the
    # benchmark's options are its own business.
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest
    elif args.command == "plot":
        args.plot_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
