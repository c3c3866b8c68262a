"""Registers and spills of every decode-GEMV candidate, compiled for sm_90a on a machine without a GPU.

The GEMV is latency-bound at decode sizes (NOTES v35: too few loads in flight per SM), and how many warps an
SM keeps resident is set by the registers a config needs; the autotuner only sees times.  This compiles each
GPU candidate (``NF4MOE_GEMV_TILES=1`` too) for the Qwen3-30B-A3B up projection (K = 2048, gated) and down
projection (K = 768, with and without the fused combine) with tests/gpu_compile.py's specialisation, runs the
bundled ptxas with ``-v`` on the PTX and prints registers, spill bytes and the warps per SM that 64K registers
allow.  Nothing runs on a GPU.

    python -m lab.gemv_regs [--tiles 0|1]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile


def ptxas_facts(ptx: str) -> dict:
    """ptxas -v of ``ptx`` for sm_90a: registers and spill bytes."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, check=True)
    log = res.stdout + res.stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return {"regs": regs, "spill_bytes": spills}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", default="1", help="NF4MOE_GEMV_TILES for the candidate list (default 1)")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.pop("NF4MOE_CONFIG", None)
    os.environ["NF4MOE_GEMV_TILES"] = args.tiles
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "tests"))
    import gpu_compile as gc

    from nf4moe.kernels import grouped_gemv as gv

    down_ints = dict(gc.INTS, N=2048, N_TOTAL=2048, K_DIM=768, stride_xm=768, stride_om=2048, ROW_BUCKET=8, P=8)
    down = dict(gc.COMMON, TOP_K=1, GATED=False, GATHER=False, SCATTER=True, LUT=True, K_DIM=768)
    projections = {  # name: (ints, constexprs), as grouped_gemm.projection_meta gives them
        "up": (dict(gc.INTS, ROW_BUCKET=8, P=8),
               dict(gc.COMMON, GATED=True, GATHER=True, SCATTER=False, LUT=True, K_DIM=2048, COMBINE=False, SLOTS=1,
                    XA_BY_PAIR=False, XA_EARLY=False)),
        "down": (down_ints, dict(down, COMBINE=False, SLOTS=1, XA_BY_PAIR=False, XA_EARLY=False)),
        "down_combine": (down_ints, dict(down, COMBINE=True, SLOTS=8, XA_BY_PAIR=False, XA_EARLY=False)),
    }
    for name, (ints, cx) in projections.items():
        kept = gv.prune_gemv(gv.gemv_configs(), {}, ROW_BUCKET=8, N=ints["N"], BS=64, K_DIM=cx["K_DIM"],
                             COMBINE=cx["COMBINE"])
        for c in kept:
            ptx = gc.compile_kernel(gv.nf4_moe_gemv_kernel, gc.PTRS, ints, dict(cx, **c.kwargs), c.num_warps, 1,
                                    maxnreg=c.maxnreg)
            f = ptxas_facts(ptx)
            regs = -(-f["regs"] // 8) * 8  # allocated per thread in units of 8 (256 per warp)
            warps = min(64, (65536 // (regs * 32 * c.num_warps)) * c.num_warps)  # whole programs per SM
            print(f"{name:13s} {c.kwargs} warps={c.num_warps} maxnreg={c.maxnreg}: {f['regs']} registers, {f['spill_bytes']} spill bytes, "
                  f"{warps} warps per SM", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
