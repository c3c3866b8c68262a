"""Feasibility probe for the next large-T GEMM (lab/NOTES-history.md v21): compile, for an H100 (sm_90) on any
machine, a Gluon kernel whose producer warps decode a weight tile (a uint8 stand-in for NF4 codes) into an
NVMMA-swizzled shared-memory buffer and whose consumer warp group runs an asynchronous wgmma on it, the two
partitions handing over through an mbarrier (``gl.warp_specialize``).  No GPU needed; prints PTX facts.

    python lab/probe_gluon_ws.py        # Triton >= 3.6 (the GPU image's 3.6.0 and the CPU's 3.9.0 both compile it)
    python lab/probe_gluon_ws.py --run  # on a GPU: launch it and compare with torch
"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                               warpgroup_mma_wait)

BM, BN, BK = 64, 64, 64


@gluon.jit
def _consumer(x_smem, w_smem, bar, out_ptr, BM: gl.constexpr, BN: gl.constexpr):
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    acc = gl.zeros([BM, BN], gl.float32, acc_l)
    mbarrier.wait(bar, 0)
    acc = warpgroup_mma(x_smem, w_smem.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=[acc])
    out_l: gl.constexpr = gl.BlockedLayout([1, 4], [8, 4], [4, 1], [1, 0])
    acc = gl.convert_layout(acc, out_l)
    rm = gl.arange(0, BM, layout=gl.SliceLayout(1, out_l))
    rn = gl.arange(0, BN, layout=gl.SliceLayout(0, out_l))
    gl.store(out_ptr + rm[:, None] * BN + rn[None, :], acc)


@gluon.jit
def _producer(x_ptr, w_ptr, x_smem, w_smem, bar, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
    l: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
    rk = gl.arange(0, BK, layout=gl.SliceLayout(0, l))
    rm = gl.arange(0, BM, layout=gl.SliceLayout(1, l))
    rn = gl.arange(0, BN, layout=gl.SliceLayout(1, l))
    x_smem.store(gl.load(x_ptr + rm[:, None] * BK + rk[None, :]))
    codes = gl.load(w_ptr + rn[:, None] * BK + rk[None, :])        # uint8 stand-in for NF4 codes
    w_smem.store((codes.to(gl.float32) * 0.125 - 1.0).to(gl.bfloat16))  # the "decode", in the producer warps
    fence_async_shared()
    mbarrier.arrive(bar, count=1)


@gluon.jit
def ws_mma_kernel(x_ptr, w_ptr, out_ptr, BM: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr):
    sl: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [BM, BK], sl)
    w_smem = gl.allocate_shared_memory(gl.bfloat16, [BN, BK], sl)
    bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(bar, count=1)
    gl.warp_specialize([(_consumer, (x_smem, w_smem, bar, out_ptr, BM, BN)),
                        (_producer, (x_ptr, w_ptr, x_smem, w_smem, bar, BM, BN, BK))], [4], [96])


def main() -> None:
    sig = {"x_ptr": "*bf16", "w_ptr": "*u8", "out_ptr": "*fp32", "BM": "constexpr", "BN": "constexpr",
           "BK": "constexpr"}
    src = GluonASTSource(fn=ws_mma_kernel, signature=sig, constexprs={(3,): BM, (4,): BN, (5,): BK})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    ptx = k.asm["ptx"]
    print(f"triton {triton.__version__}, sm_90 PTX: {len(ptx)} bytes; wgmma {ptx.count('wgmma.mma_async')}, "
          f"mbarrier {ptx.count('mbarrier')}, setmaxnreg {ptx.count('setmaxnreg')} (register split per partition)")


def run() -> None:
    import torch

    x = torch.randn(BM, BK, device="cuda", dtype=torch.bfloat16)
    w = torch.randint(0, 16, (BN, BK), device="cuda", dtype=torch.uint8)
    out = torch.full((BM, BN), float("nan"), device="cuda")
    ws_mma_kernel[(1,)](x, w, out, BM, BN, BK, num_warps=4)
    ref = x.float() @ (w.float() * 0.125 - 1.0).t()
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"triton {triton.__version__}: warp-specialised wgmma on {torch.cuda.get_device_name()}: rel err {err:.2e}")
    assert err < 1e-2, err


if __name__ == "__main__":
    run() if "--run" in sys.argv else main()
