"""Compile the NF4 grouped GEMM for one pinned config and write its TTGIR, PTX and SASS statistics to
--out: registers, spills, and the instruction mix of the K loop (what lab/NOTES-history.md reasons from).

    NF4MOE_CONFIG="BLOCK_M=128,BLOCK_N=128,BLOCK_K=64,num_warps=8,num_stages=3" python -m lab.dump_asm --tokens 8192
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import sys

import torch


def main(argv=None) -> int:
    from nf4moe.benchmarks.layer import SHAPES, build_peers, routing

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--tag", default="cfg")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args(argv)
    e, h, i, k = SHAPES[args.shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    _, _, ours = build_peers(e, h, i, k, 16, gen)
    x = torch.randn(args.tokens, h, device="cuda", dtype=torch.bfloat16, generator=gen)
    idx, w = routing(args.tokens, e, k, gen)
    with torch.no_grad():
        ours(x, idx, w)
    torch.cuda.synchronize()
    from nf4moe.kernels.grouped_gemm import nf4_moe_gemm_kernel

    jit = nf4_moe_gemm_kernel.fn
    n = 0
    for cache in jit.device_caches.values():
        for key, kern in cache[0].items():
            n += 1
            base = os.path.join(args.out, f"{args.tag}_{n}")
            with open(base + ".ttgir", "w") as f:
                f.write(kern.asm["ttgir"])
            ptx = kern.asm["ptx"]
            ops = collections.Counter(m.group(1) for m in re.finditer(r"^\s+([a-z][\w.]*)", ptx, re.M))
            top = ", ".join(f"{op} {c}" for op, c in ops.most_common(25))
            print(f"[{args.tag} {n}] regs {kern.n_regs} spills {kern.n_spills} shared {kern.metadata.shared} | {top}")
            with open(base + ".ptx", "w") as f:
                f.write(ptx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
