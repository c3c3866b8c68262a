"""A/B of two nf4moe trees in one process: the layer forward (eager and CUDA graph) and forward + backward.

Issue 32's "no behaviour change" check: the code before the simplification, copied as package ``nf4moe_base``
(``git archive <commit> nf4moe`` renamed; its imports are relative), against the working tree's ``nf4moe``, on
the same NF4 weights, LoRA values, routing and inputs, in alternating rounds.  Each eager row is N calls back to
back with one synchronize, divided by N (what an N-layer model sees), the median of the rounds; graph rows replay
one captured call N times.  Outputs and gradients of the two trees are compared (bit equality and relative error).

    python -m lab.ab_layer --base .baseline --out $OUT [--shapes qwen3,glm45air] [--quick]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

SHAPES = {"qwen3": (128, 2048, 768, 8), "glm45air": (128, 4096, 1408, 8)}  # (E, H, I, top_k)
FWD_T = {"qwen3": (1, 16, 128, 1024, 8192), "glm45air": (1, 16, 128, 1024, 8192)}
GRAPH_T = (1, 16, 128)
FWDBWD_T = {"qwen3": (1024, 2048, 8192), "glm45air": (2048, 8192)}
RANK = 16


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def layers(pkg_new, pkg_base, e, h, i, gen):
    gu = torch.randn(e, 2 * i, h, device="cuda", dtype=torch.bfloat16, generator=gen) * h ** -0.5
    dn = torch.randn(e, h, i, device="cuda", dtype=torch.bfloat16, generator=gen) * i ** -0.5
    new = pkg_new.QuantGroupedExperts.from_weights(gu, dn, lora_rank=RANK, lora_alpha=2 * RANK, backend="triton")
    with torch.no_grad():
        for p in new.lora_B.values():
            p.normal_(0, 0.02, generator=gen)
    base = pkg_base.QuantGroupedExperts(e, h, i, lora_rank=RANK, lora_alpha=2 * RANK, backend="triton",
                                        device="cuda")
    base.load_state_dict(new.state_dict())
    del gu, dn
    return new, base


def inputs(t, e, h, k, gen):
    x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen)
    logits = torch.randn(t, e, device="cuda", generator=gen)
    w, idx = torch.topk(torch.softmax(logits, -1), k, dim=-1)
    return x, idx, (w / w.sum(-1, keepdim=True)).to(torch.bfloat16)


def graph_ms(fn, n: int) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def alternate(impls: dict, measure, rounds: int) -> dict:
    """Median over ``rounds`` of measure(fn) per impl, the order alternating each round."""
    names = list(impls)
    got = {n: [] for n in names}
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            got[n].append(measure(impls[n]))
    return {n: (statistics.median(v), v) for n, v in got.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", required=True, help="folder holding the package nf4moe_base")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="qwen3,glm45air")
    ap.add_argument("--modes", default="fwd,graph,fwdbwd")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args(argv)
    sys.path.insert(0, args.base)
    import nf4moe
    import nf4moe_base
    from nf4moe.benchmarks.train import back_to_back_ms
    import transformers
    import triton

    modes = args.modes.split(",")
    env = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
               transformers=transformers.__version__, date=time.strftime("%Y-%m-%d"))
    print(env, flush=True)
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(f"{args.out}/ab_layer.json", "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)

    gen = torch.Generator(device="cuda").manual_seed(0)
    for shape in args.shapes.split(","):
        e, h, i, k = SHAPES[shape]
        new, base = layers(nf4moe, nf4moe_base, e, h, i, gen)
        impls_of = lambda f: {"base": lambda: f(base), "new": lambda: f(new)}  # noqa: E731
        if "fwd" in modes or "graph" in modes:
            for t in FWD_T[shape]:
                x, idx, w = inputs(t, e, h, k, gen)
                with torch.no_grad():
                    ob, on = base(x, idx, w), new(x, idx, w)  # also the first calls: autotuning, compiles
                    plan = new.launch_plan(x, idx, w)
                    n = 48 if t <= 1024 else 12
                    if "fwd" in modes:
                        res = alternate(impls_of(lambda m: m(x, idx, w)), lambda fn: back_to_back_ms(fn, n),
                                        args.rounds)
                        emit(dict(shape=shape, mode="fwd eager", tokens=t, n=n, base_ms=res["base"][0],
                                  new_ms=res["new"][0], ratio=res["new"][0] / res["base"][0],
                                  base_rounds=res["base"][1], new_rounds=res["new"][1], bit_equal=bool(torch.equal(ob, on)),
                                  rel_err=rel(on, ob), plan=plan.key))
                    if "graph" in modes and t in GRAPH_T:
                        res = alternate(impls_of(lambda m: m(x, idx, w)), lambda fn: graph_ms(fn, 48), args.rounds)
                        emit(dict(shape=shape, mode="fwd graph", tokens=t, n=48, base_ms=res["base"][0],
                                  new_ms=res["new"][0], ratio=res["new"][0] / res["base"][0],
                                  base_rounds=res["base"][1], new_rounds=res["new"][1]))
        if "fwdbwd" in modes:
            for t in FWDBWD_T[shape]:
                x0, idx, w0 = inputs(t, e, h, k, gen)
                gout = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen)
                grads = {}

                def step(m, keep=None):
                    x = x0.detach().requires_grad_(True)
                    w = w0.detach().requires_grad_(True)
                    out = m(x, idx, w)
                    out.backward(gout)
                    if keep is not None:
                        keep[:] = [out.detach(), x.grad, w.grad] + [p.grad.clone() for p in m.parameters()]
                    for p in m.parameters():
                        p.grad = None

                gb, gn = [], []
                step(base, gb)
                step(new, gn)
                torch.cuda.synchronize()
                mem = {}
                for name, m in (("base", base), ("new", new)):
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    step(m)
                    torch.cuda.synchronize()
                    mem[name] = (torch.cuda.max_memory_allocated() - before) / 2**30
                n = 10
                res = alternate(impls_of(step), lambda fn: back_to_back_ms(fn, n), args.rounds)
                emit(dict(shape=shape, mode="fwd+bwd eager", tokens=t, n=n, base_ms=res["base"][0],
                          new_ms=res["new"][0], ratio=res["new"][0] / res["base"][0], base_rounds=res["base"][1],
                          new_rounds=res["new"][1], extra_mem_gib=mem,
                          bit_equal=all(torch.equal(a, b) for a, b in zip(gb, gn)),
                          rel_err=max(rel(a, b) for a, b in zip(gn, gb))))
        del new, base
        torch.cuda.empty_cache()

    lines = [f"{env}", "", "| shape | mode | T | before ms | after ms | after / before | rounds (before; after) | same bits | rel err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rb = ", ".join(f"{v:.4g}" for v in r["base_rounds"])
        rn = ", ".join(f"{v:.4g}" for v in r["new_rounds"])
        lines.append(f"| {r['shape']} | {r['mode']} | {r['tokens']} | {r['base_ms']:.4f} | {r['new_ms']:.4f} | "
                     f"{r['ratio']:.3f} | {rb}; {rn} | {r.get('bit_equal', '')} | {r.get('rel_err', '')} |")
    with open(f"{args.out}/ab_layer.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
