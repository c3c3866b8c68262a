"""GPU benchmark of one MoE expert layer: nf4moe against its peers, in one process and one run.

Peers (DESIGN.md): transformers' ``grouped_mm`` experts forward on bf16 weights; dequantize the whole
NF4 weight with bitsandbytes then the same grouped_mm; PEFT LoRA on the 3D expert parameters
(fwd+bwd mode).  Every row is also reported as a fraction of the floor, whose two ceilings (copy
bandwidth, bf16 matmul rate) are measured in the same run.

    python -m nf4moe bench [--mode fwd|fwdbwd|all] [--shapes qwen3,glm45air,dsv3] [--tokens 1,16,...]

(``python bench/bench_layer.py`` in a checkout is the same.)  Writes JSON and a markdown table to --out
(default: $OUT, else bench/results under the current directory).  Part of the package so that it runs from
an installed wheel; ``import nf4moe`` does not import it (only the ``bench`` command does).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
from dataclasses import asdict, dataclass

import torch

SHAPES = {
    # name: (E, H, I, top_k)
    "qwen3": (128, 2048, 768, 8),       # Qwen3-30B-A3B
    "glm45air": (128, 4096, 1408, 8),   # GLM-4.5-Air
    "dsv3": (256, 7168, 2048, 8),       # DeepSeek-V3
}
TOKENS = (1, 16, 128, 1024, 8192, 16384)


@dataclass
class Row:
    shape: str
    mode: str
    tokens: int
    impl: str
    ms: float
    floor_ms: float
    rel_err: float | None = None
    extra_mem_gib: float | None = None
    note: str = ""
    rounds_ms: list[float] | None = None  # eager rows: each round's median (``ms`` is their median)


def _bench(fn, *, rep_ms: int = 200) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))


def measure_ceilings() -> dict:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate on this GPU, now."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    t = _bench(lambda: b.copy_(a))
    bw = 2 * n / (t * 1e-3)
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    t2 = _bench(lambda: x @ y)
    del a, b, x, y
    return {"copy_bytes_per_s": bw, "bf16_flops_per_s": 2 * m**3 / (t2 * 1e-3)}


def routing(t: int, e: int, k: int, gen: torch.Generator):
    logits = torch.randn(t, e, device="cuda", generator=gen)
    w, idx = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return idx, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)


def floor_ms(ceil: dict, mod, idx: torch.Tensor, t: int, h: int, i: int, rank: int, backward: bool) -> float:
    e = mod.num_experts
    active = torch.unique(idx[(idx >= 0) & (idx < e)]).numel()
    per_expert = (mod.gate_up_nf4.nbytes + mod.down_nf4.nbytes) / e
    byts = active * per_expert + 2 * t * h * 2  # weights of the touched experts + x in + y out (bf16)
    p = idx.numel()
    flops = 2 * p * (3 * h * i) + 2 * p * rank * (2 * h + 4 * i)
    if backward:
        flops *= 2  # dX through both projections (+ recompute of nothing); LoRA grads are small
        byts *= 2
    return 1e3 * max(byts / ceil["copy_bytes_per_s"], flops / ceil["bf16_flops_per_s"])


def build_peers(e: int, h: int, i: int, k: int, rank: int, gen: torch.Generator):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    import nf4moe

    cfg = Qwen3MoeConfig(hidden_size=h, moe_intermediate_size=i, num_experts=e, num_experts_per_tok=k,
                         hidden_act="silu")
    cfg._experts_implementation = "grouped_mm"
    with torch.device("cuda"):
        bf16 = Qwen3MoeExperts(cfg).to(torch.bfloat16)
    with torch.no_grad():
        bf16.gate_up_proj.normal_(0, h ** -0.5, generator=gen)
        bf16.down_proj.normal_(0, i ** -0.5, generator=gen)
    bf16.requires_grad_(False)
    ours = nf4moe.QuantGroupedExperts.from_weights(bf16.gate_up_proj, bf16.down_proj, lora_rank=rank,
                                                   lora_alpha=2 * rank, backend="triton")
    with torch.no_grad():
        for p in ours.lora_B.values():
            p.normal_(0, 0.02, generator=gen)
    return cfg, bf16, ours


def profile_cases(shape: str, tokens: str, rank: int):
    """For the profiling scripts: (bf16 peer, nf4moe layer) of ``shape`` with seeded random weights, and an
    iterator of (T, x, top_k_index, top_k_weights) on the GPU for each T of the comma-separated ``tokens``."""
    e, h, i, k = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    _, bf16, ours = build_peers(e, h, i, k, rank, gen)

    def inputs():
        for t in [int(v) for v in tokens.split(",")]:
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen)
            yield (t, x, *routing(t, e, k, gen))

    return bf16, ours, inputs()


def dequant_peer(bf16_mod, ours):
    """The dequantize-whole-weight path: bitsandbytes dequantize_4bit (split_lora.bnb_dequantizer) of the layer's
    NF4 weights on every call, then transformers grouped_mm."""
    from torch.func import functional_call

    from .split_lora import bnb_dequantizer

    gate_up, down = bnb_dequantizer(ours.gate_up_nf4), bnb_dequantizer(ours.down_nf4)

    def fwd(x, idx, w):
        return functional_call(bf16_mod, {"gate_up_proj": gate_up(), "down_proj": down()}, (x, idx, w))

    return fwd


def ref_output(ours, x, idx, w) -> torch.Tensor:
    """fp32 reference on the dequantized weights, LoRA included (nf4moe.reference)."""
    from nf4moe.reference import Lora, moe_forward

    return moe_forward(
        x, idx, w,
        lambda e: ours.gate_up_nf4.dequantize_expert(e, torch.float32),
        lambda e: ours.down_nf4.dequantize_expert(e, torch.float32),
        num_experts=ours.num_experts, act=ours.act,
        lora_gate_up=Lora(ours.lora_A["gate_up_proj"], ours.lora_B["gate_up_proj"]) if ours.lora_rank else None,
        lora_down=Lora(ours.lora_A["down_proj"], ours.lora_B["down_proj"]) if ours.lora_rank else None,
        lora_scaling=ours.scaling,
    )


def graph_ms(fn, inputs: list, keep: list | None = None) -> float:
    """Per-call time of a CUDA graph that replays fn over several input sets (rotating the weights
    touched so repeated calls do not measure L2); ``keep`` receives the graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for args in inputs:
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for args in inputs:
            fn(*args)
    if keep is not None:
        keep.append(g)
    return _bench(g.replay) / len(inputs)


def rounds_ms(impls: dict, rounds: int, rep_ms: int = 200) -> dict[str, list[float]]:
    """Each implementation's median time in each of ``rounds`` rounds, the implementations alternating within a
    round (``rep_ms`` of timing per implementation in all).  Eager calls at small T are host-bound, and the GPU
    machines' host speed drifts over seconds (session 19 on an H100: the same eager call 0.27 ms in one process
    and 0.54 in the next, and 0.32-0.74 ms within one); alternating gives every implementation the same drift,
    and the per-round times show the spread."""
    out: dict[str, list[float]] = {name: [] for name in impls}
    for _ in range(rounds):
        for name, fn in impls.items():
            out[name].append(_bench(fn, rep_ms=max(20, rep_ms // rounds)))
    return out


def run_fwd(shape: str, tokens, rank: int, ceil: dict, rows: list, check: bool, graph_max_t: int, rounds: int = 3):
    e, h, i, k = SHAPES[shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    cfg, bf16, ours = build_peers(e, h, i, k, rank, gen)
    deq = dequant_peer(bf16, ours)
    for t in tokens:
        x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen)
        idx, w = routing(t, e, k, gen)
        fl = floor_ms(ceil, ours, idx, t, h, i, rank, backward=False)
        err = None
        with torch.no_grad():
            if check and t <= 1024:
                out = ours(x, idx, w)
                ref = ref_output(ours, x, idx, w)
                err = float((out.float() - ref).norm() / ref.norm())
            impls = {
                "transformers grouped_mm bf16": lambda: bf16(x, idx, w),
                "dequant(bnb) + grouped_mm": lambda: deq(x, idx, w),
                f"nf4moe (LoRA r={rank})": lambda: ours(x, idx, w),
            }
            times = rounds_ms(impls, rounds)
            for name, per_round in times.items():
                ms = statistics.median(per_round)
                rows.append(Row(shape, "fwd", t, name, ms, fl, err if name.startswith("nf4moe") else None,
                                rounds_ms=per_round))
                print(f"{shape:9s} T={t:6d} {name:32s} {ms:8.3f} ms  floor {fl:.4f} ms  x{ms / fl:6.1f}  rounds "
                      + " ".join(f"{v:.3f}" for v in per_round)
                      + (f"  err {err:.2e}" if err is not None and name.startswith("nf4moe") else ""), flush=True)
            if t <= graph_max_t:
                sets = [(torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen), *routing(t, e, k, gen))
                        for _ in range(16)]
                for name, fn in (("transformers grouped_mm bf16", bf16), (f"nf4moe (LoRA r={rank})", ours)):
                    try:
                        ms = graph_ms(fn, sets)
                    except RuntimeError as exc:  # a peer that cannot be captured: say so, keep the other rows
                        if name.startswith("nf4moe"):
                            raise
                        print(f"{shape:9s} T={t:6d} {name + ' [graph]':32s} not capturable: {exc}", flush=True)
                        torch.cuda.synchronize()
                        continue
                    rows.append(Row(shape, "fwd", t, name + " [CUDA graph]", ms, fl))
                    print(f"{shape:9s} T={t:6d} {name + ' [graph]':32s} {ms:8.3f} ms  x{ms / fl:6.1f}", flush=True)
    del bf16, ours
    torch.cuda.empty_cache()


def environment() -> dict:
    import transformers
    import triton

    env = {
        "date": datetime.date.today().isoformat(),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    for mod in ("bitsandbytes", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = "not installed"
    return env


def markdown(rows: list[Row], env: dict, ceil: dict) -> str:
    lines = [
        f"GPU {env['gpu']}, torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
        f"bitsandbytes {env['bitsandbytes']}, peft {env['peft']}, {env['date']}.",
        f"Measured ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s (read+write), "
        f"bf16 matmul {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s.",
        "",
        "| shape | mode | T | implementation | ms | floor ms | x floor | peer ÷ nf4moe (>1: nf4moe faster) | rel err "
        "| extra GiB | note | eager rounds, ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ours = {(r.shape, r.mode, r.tokens, r.impl.endswith("[CUDA graph]")): r.ms for r in rows if r.impl.startswith("nf4moe")}
    for r in rows:
        o = ours.get((r.shape, r.mode, r.tokens, r.impl.endswith("[CUDA graph]")))
        sp = f"{r.ms / o:.2f}x" if o and not r.impl.startswith("nf4moe") else ""
        err = f"{r.rel_err:.1e}" if r.rel_err is not None else ""
        per_round = " / ".join(f"{v:.3f}" for v in r.rounds_ms) if r.rounds_ms else ""
        mem = f"{r.extra_mem_gib:.2f}" if r.extra_mem_gib is not None else ""
        lines.append(f"| {r.shape} | {r.mode} | {r.tokens} | {r.impl} | {r.ms:.4f} | {r.floor_ms:.4f} | "
                     f"{r.ms / r.floor_ms:.1f} | {sp} | {err} | {mem} | {r.note} | {per_round} |")
    return "\n".join(lines) + "\n"


def write_results(out: str, mode: str, rows, env: dict, ceil: dict) -> None:
    with open(os.path.join(out, f"layer_{mode}.json"), "w") as f:
        json.dump({"env": env, "ceilings": ceil, "rows": [asdict(r) for r in rows]}, f, indent=1)
    with open(os.path.join(out, f"layer_{mode}.md"), "w") as f:
        f.write(markdown(rows, env, ceil))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nf4moe bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=("fwd", "fwdbwd", "all"), default="fwd")
    ap.add_argument("--shapes", default="qwen3,glm45air,dsv3")
    ap.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check against the reference")
    ap.add_argument("--graph-max-t", type=int, default=128,
                    help="CUDA-graph rows (bf16 grouped_mm and nf4moe) for T up to this (0: none)")
    ap.add_argument("--rounds", type=int, default=3, help="eager timing rounds, the implementations alternating "
                    "(fwd: each round a do_bench median; fwdbwd: each round 8 steps back to back, one synchronize)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("nf4moe bench needs a CUDA GPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    env = environment()
    ceil = measure_ceilings()
    print(json.dumps(env), json.dumps(ceil), flush=True)
    rows: list[Row] = []
    tokens = [int(t) for t in args.tokens.split(",") if t]
    for shape in args.shapes.split(","):
        if args.mode in ("fwd", "all"):
            run_fwd(shape, tokens, args.rank, ceil, rows, not args.no_check, args.graph_max_t, args.rounds)
        if args.mode in ("fwdbwd", "all"):
            from .train import run_fwdbwd

            run_fwdbwd(shape, tokens, args.rank, ceil, rows, args.rounds)
        write_results(args.out, args.mode, rows, env, ceil)  # after every shape: a crash later keeps these
    print(markdown(rows, env, ceil))
    return 0


if __name__ == "__main__":
    sys.exit(main())
