"""A few eager layer calls for Nsight Compute to profile (GPU only; no timing of its own).

    NF4MOE_CONFIG=BLOCK_M=16,BLOCK_N=64,BLOCK_K=128,num_warps=4,num_stages=3 ncu --clock-control none \
        --kernel-name regex:nf4_moe_gemm --launch-skip 2 --launch-count 2 --section WarpStateStats \
        python3 -m lab.ncu_case --tokens 128
    ncu --profile-from-start off --kernel-name regex:nf4_moe_gemv --section WarpStateStats \
        python3 -m lab.ncu_case --tokens 1 --profile-last   # autotuned first, then one profiled call
"""
from __future__ import annotations

import argparse
import sys

import torch


def main(argv=None) -> int:
    from nf4moe.benchmarks.layer import profile_cases

    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3")
    ap.add_argument("--tokens", default="128")
    ap.add_argument("--calls", type=int, default=3)
    ap.add_argument("--profile-last", action="store_true",
                    help="open the profiler range (cudaProfilerStart) only around one call after the others, so "
                         "that ncu --profile-from-start off skips the autotuner's launches")
    args = ap.parse_args(argv)
    _, ours, cases = profile_cases(args.shape, args.tokens, 16)
    for _, x, idx, w in cases:
        with torch.no_grad():
            for _ in range(args.calls):
                ours(x, idx, w)
            torch.cuda.synchronize()
            if args.profile_last:
                torch.cuda.profiler.start()
                ours(x, idx, w)
                torch.cuda.synchronize()
                torch.cuda.profiler.stop()
        torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
