"""Training-step probe of one nf4moe layer: fwd+bwd time with each backward kernel (plan ``bwd``), recompute mode,
the training forward alone, and the per-kernel GPU times of one step (torch.profiler), on one warm GPU.

    python lab/bwd_probe.py [--shapes qwen3,glm45air,dsv3] [--tokens 1024,2048,8192] [--out $OUT]

Gradients of the two backward kernels are compared (max relative error over dX, d(top_k_weights) and the LoRA
gradients).  Prints one line per row and writes JSON to --out.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics

import torch

import nf4moe
from nf4moe.benchmarks.layer import SHAPES, build_peers, routing
from nf4moe.benchmarks.split_lora import rel_errors, step_grads
from nf4moe.benchmarks.train import back_to_back_ms


def _step(mod, x, idx, w, gout, *, backward=True):
    params = [p for p in mod.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        x.grad = w.grad = None
        out = mod(x, idx, w)
        if backward:
            out.backward(gout)

    return step


def _kernel_times(step) -> dict:
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    out = collections.Counter()
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            out[ev.name[:60]] += ev.device_time_total / 1e3
    return {k: round(v, 4) for k, v in out.most_common(14)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="qwen3")
    ap.add_argument("--tokens", default="1024,2048,8192")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    a = ap.parse_args()
    res = []
    for shape in a.shapes.split(","):
        e, h, i, k = SHAPES[shape]
        gen = torch.Generator(device="cuda").manual_seed(0)
        _, bf16, ours = build_peers(e, h, i, k, a.rank, gen)
        del bf16
        torch.cuda.empty_cache()
        for t in map(int, a.tokens.split(",")):
            x = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
            idx, w = routing(t, e, k, gen)
            w = w.requires_grad_(True)
            gout = torch.randn(t, h, device="cuda", dtype=torch.bfloat16, generator=gen)
            grads = {}
            for kern in ("gemm", "wgmma"):
                with nf4moe.plan_overrides(bwd=kern):
                    grads[kern] = step_grads(ours, x, idx, w, gout)
            err = max(rel_errors(grads["wgmma"], grads["gemm"]).values())
            rows = {}

            def timed(name, step, ov):
                with nf4moe.plan_overrides(**ov):
                    step()
                    rows[name] = [back_to_back_ms(step) for _ in range(a.rounds)]
                    if a.profile:
                        rows[name + " kernels"] = _kernel_times(step)

            timed("fwd (training)", _step(ours, x, idx, w, gout, backward=False), {})
            timed("fwd+bwd triton bwd", _step(ours, x, idx, w, gout), dict(bwd="gemm"))
            timed("fwd+bwd gluon bwd", _step(ours, x, idx, w, gout), dict(bwd="wgmma"))
            ours.recompute = True
            timed("fwd+bwd recompute gluon bwd", _step(ours, x, idx, w, gout), dict(bwd="wgmma"))
            ours.recompute = False
            for name, v in rows.items():
                if isinstance(v, list):
                    print(f"{shape} T={t} {name:32s} {statistics.median(v):8.3f} ms  rounds {v}", flush=True)
                else:
                    print(f"{shape} T={t} {name}: {v}", flush=True)
            print(f"{shape} T={t} max rel err gluon vs triton bwd grads {err:.2e}", flush=True)
            res.append(dict(shape=shape, tokens=t, rows=rows, rel_err=err))
        del ours
        torch.cuda.empty_cache()
    with open(os.path.join(a.out, "bwd_probe.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=res), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
