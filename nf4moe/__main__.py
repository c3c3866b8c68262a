"""``python -m nf4moe <command>``: the project's main job and its tools.

Commands:
    demo    one MoE expert layer of Qwen3-30B-A3B's shape, scaled down to fit a CPU: random bf16
            weights quantized to NF4, run on random routed tokens; prints bf16 vs NF4 memory, the
            output error against the bf16 layer, and the time per call.
    bench   the layer benchmark against its peers (bench/bench_layer.py, source checkout only).
"""
from __future__ import annotations

import argparse
import importlib
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


def demo(args: argparse.Namespace) -> int:
    from nf4moe import QuantGroupedExperts
    from nf4moe.reference import moe_forward

    device = torch.device(args.device)
    e, h, i, k, t = args.experts, args.hidden, args.intermediate, args.top_k, args.tokens
    if not 1 <= k <= e:
        raise SystemExit(f"nf4moe demo: --top-k must be between 1 and --experts ({e}), got {k}")
    gen = torch.Generator().manual_seed(args.seed)
    # Random bf16 weights at the scale of a trained layer (unit-variance activations stay unit-variance).
    gate_up = (torch.randn(e, 2 * i, h, generator=gen) / h**0.5).to(torch.bfloat16).to(device)
    down = (torch.randn(e, h, i, generator=gen) / i**0.5).to(torch.bfloat16).to(device)
    x = torch.randn(t, h, generator=gen).to(torch.bfloat16).to(device)
    top_k_index, top_k_weights = _route(x, e, k, gen)

    real = REAL_SHAPE
    print(f"nf4moe demo: one MoE expert layer with NF4 base weights ({args.tokens} tokens, seed {args.seed})")
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
            raise SystemExit("nf4moe demo: the NF4 layer produced non-finite values")

        def run_nf4():
            layer(x, top_k_index, top_k_weights)

        def run_bf16():
            moe_forward(x, top_k_index, top_k_weights, gate_up, down)

        per_nf4, n1 = _time_per_call(run_nf4, device, min_calls=args.min_calls, budget_s=args.time_budget)
        per_bf16, n2 = _time_per_call(run_bf16, device, min_calls=args.min_calls, budget_s=args.time_budget)
    print(f"  time      NF4 layer ({backend}) {per_nf4 * 1e3:.2f} ms per call ({n1} calls); "
          f"bf16 reference layer {per_bf16 * 1e3:.2f} ms per call ({n2} calls)")
    return 0


# ------------------------------------------------------------------------------------------ bench
def _bench_dir() -> Path:
    """bench/ of the source checkout this package was imported from (absent in an installed wheel)."""
    return Path(__file__).resolve().parent.parent / "bench"


def bench(args: argparse.Namespace) -> int:
    # ==== `python -m nf4moe bench` hands over to bench/bench_layer.py (issue 4). ====
    # Contract: bench/bench_layer.py defines `main(argv: list[str]) -> int | None`; every argument after
    # `bench` is passed through untouched.  The module is imported only here, so the demo and the
    # library never import benchmark code.
    path = _bench_dir() / "bench_layer.py"
    if not path.is_file():
        raise SystemExit(
            f"nf4moe bench: {path} not found. The layer benchmark lives in the source checkout "
            "(bench/bench_layer.py) and is not part of the installed package; run it from a clone."
        )
    root = str(path.parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    module = importlib.import_module("bench.bench_layer")
    if Path(module.__file__).resolve() != path:
        raise SystemExit(f"nf4moe bench: imported bench.bench_layer from {module.__file__}, expected {path}")
    rc = module.main(list(args.bench_args))
    return int(rc or 0)


# ------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m nf4moe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,bench}")

    d = sub.add_parser("demo", help="quantize and run one scaled-down Qwen3-30B-A3B expert layer")
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
    d.set_defaults(func=demo)

    b = sub.add_parser("bench", help="layer benchmark against the peers (bench/bench_layer.py)",
                       add_help=False)  # --help goes to the benchmark itself
    b.set_defaults(func=bench)  # every argument after `bench` goes to bench/bench_layer.py (see main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_known_args: argparse.REMAINDER in a subparser rejects a leading "--option", and the
    # benchmark's options are its own business.
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
