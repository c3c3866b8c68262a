"""Where the host (Python) time of one eager nf4moe layer call goes, on the GPU: enqueue time per call
(no synchronisation, GPU idle enough not to back-pressure), the GPU time of the same call under a CUDA
graph, and the cProfile functions that cost the most.  Used to write lab/NOTES-history.md.

    python -m lab.profile_host --shape qwen3 --tokens 1,128
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time

import torch


def host_us(fn, iters: int = 200) -> float:
    """Mean wall time of enqueueing one call, synchronising only every 20 calls."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    total = 0.0
    for i in range(0, iters, 20):
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        total += time.perf_counter() - t0
        torch.cuda.synchronize()
    return 1e6 * total / iters


def main(argv=None) -> int:
    from nf4moe.benchmarks.layer import graph_ms, profile_cases

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3")
    ap.add_argument("--tokens", default="1,128")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args(argv)
    bf16, ours, cases = profile_cases(args.shape, args.tokens, args.rank)
    for t, x, idx, w in cases:
        with torch.no_grad():
            for name, layer in (("nf4moe", ours), ("bf16 grouped_mm", bf16)):
                host = host_us(lambda: layer(x, idx, w))
                graph = 1e3 * graph_ms(layer, [(x, idx, w)])
                print(f"T={t} {name}: host {host:.1f} us/call, CUDA graph {graph:.1f} us/call", flush=True)
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(100):
                ours(x, idx, w)
            prof.disable()
            torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.top)
            print(buf.getvalue(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
