"""Compile nf4moe's Triton kernels for an H100 (sm_90) without a GPU and report facts about the PTX.

Run as a script with TRITON_INTERPRET unset (tests/test_gpu_compile.py does it in a subprocess): the
kernels are then real JIT functions, and Triton's compiler with its bundled ptxas lowers them for a target
given by hand.  Integer arguments are specialised the way a GPU launch specialises them (a multiple of 16
gets the divisibility hint, stride 1 becomes a constant), so the layouts, vector widths and software
pipelining are the ones a launch on the GPU would get from the same Triton version.

Prints one JSON object: kernel variant -> facts(ptx).
"""
from __future__ import annotations

import collections
import json
import os
import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)


def compile_kernel(kernel, ptr_types: dict, ints: dict, constexprs: dict, num_warps: int, num_stages: int,
                   gluon: bool = False, maxnreg: int | None = None, debug: bool = False) -> str:
    """PTX of ``kernel`` (an autotuned or plain JIT function, or a Gluon kernel) for TARGET."""
    fn = kernel.fn if hasattr(kernel, "configs") else kernel
    names = fn.arg_names
    sig, cx, attrs = {}, {}, {}
    for idx, name in enumerate(names):
        if name in constexprs:
            sig[name] = "constexpr"
            cx[(idx,)] = constexprs[name]
        elif name.endswith("_ptr"):
            sig[name] = ptr_types.get(name, "*fp32")
            attrs[(idx,)] = [["tt.divisibility", 16]]
        elif name == "scaling":
            sig[name] = "fp32"
        elif ints.get(name, 1024) == 1:  # a launch specialises an int equal to 1 as a constant
            sig[name] = "constexpr"
            cx[(idx,)] = 1
        else:
            sig[name] = "i32"
            if ints.get(name, 1024) % 16 == 0:
                attrs[(idx,)] = [["tt.divisibility", 16]]
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    else:
        src = ASTSource(fn=fn, signature=sig, constexprs=cx, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages, "debug": debug, "sanitize_overflow": False}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    k = triton.compile(src, target=TARGET, options=options)
    if os.environ.get("NF4MOE_DUMP_TTGIR"):  # a path: the last compiled kernel's TTGIR (layouts) for reading
        with open(os.environ["NF4MOE_DUMP_TTGIR"], "w") as f:
            f.write(k.asm["ttgir"])
    return k.asm["ptx"]


def facts(ptx: str) -> dict:
    """Opcode counts of the compiler's own PTX lines, the cp.async sizes (software-pipelined loads), and how
    often the NF4 table decode's inline PTX (nf4_decode._lut_pairs_asm: lut_decodes counts its table lookup
    line, lut_pairs its pair output) was emitted."""
    ops = collections.Counter(m.group(1) for m in re.finditer(r"^\s+([a-z][\w.]*)", ptx, re.M))
    cp = sorted({int(m.group(1), 16) for m in re.finditer(r"cp\.async\.c[ag]\.shared\.global[^\n]*?, (0x[0-9a-f]+)", ptx)})
    return {"ptx_ops": dict(ops), "cp_async_bytes": cp,
            "wgmma": sum(c for op, c in ops.items() if op.startswith("wgmma.mma_async")),
            "lut_decodes": ptx.count("prmt.b32 a, tl0, tl1"), "lut_scaled": "fma.rn." in ptx and "x2 " in ptx,
            "lut_pairs": ptx.count("lo, hi, 0x4051"), "lut_table_regs": len(re.findall(r"mov\.b32 tl0, %r", ptx)),
            "smem_byte_loads": ops.get("ld.shared.b8", 0) + ops.get("ld.shared.u8", 0),
            "acq_rel_counter": len(re.findall(r"atom\.global\.gpu\.acq_rel\.add\.u32", ptx)),
            "l2_loads": len(re.findall(r"ld\.global\.cg\.", ptx)),  # predicated loads sit in inline-asm lines
            "global_v4_loads": len(re.findall(r"ld\.global(?:\.[\w:]+)*\.v4\.b32", ptx)),
            "branches": len(re.findall(r"\bbra(?:\.uni)?\s", ptx)),
            **pdl_facts(ptx)}


def pdl_facts(ptx: str) -> dict:
    """The programmatic-dependent-launch instructions (common.pdl_enter) and whether the wait comes before the
    kernel's first global memory access (load, store, atomic or cp.async): the entry block is first in the PTX,
    so a wait there that precedes every such instruction in the text precedes it on every path."""
    wait = ptx.find("griddepcontrol.wait")
    first = re.search(r"\b(?:ld|st|atom|red|cp\.async[\w.]*)\.global|\bprefetch\.global", ptx)
    return {"pdl_waits": ptx.count("griddepcontrol.wait"),
            "pdl_launch_dependents": ptx.count("griddepcontrol.launch_dependents"),
            "pdl_wait_first": wait >= 0 and (first is None or wait < first.start())}


_BF16_PTRS = {n: "*bf16" for n in ("x_ptr", "dy_ptr", "out_ptr", "gu_ptr", "la_ptr", "lb_ptr", "topw_ptr")}
PTRS = {**_BF16_PTRS, "w_ptr": "*u8", "pair_ptr": "*i32", "eoff_ptr": "*i32", "idx_ptr": "*i64",
        "pairs_ptr": "*i32", "cnt_ptr": "*i32"}
# Qwen3-30B-A3B up projection: N = I = 768, K = H = 2048, 1024 routed rows, LoRA r=16, bf16
INTS = dict(stride_xm=2048, stride_xk=1, N=768, K_DIM=2048, N_TOTAL=1536, E=128, R=16, P=1024, ROW_BUCKET=1024,
            stride_om=768, XA_SPLIT=1, stride_dm=2048, stride_dk=1, KR=2048)
COMMON = dict(TOP_K=8, E_POW2=128, R_PAD=16, ACT=0, HAS_LORA=True, NESTED=True, BS=64, BS2=256, PDL=False)


def pdl_variants(up: dict, gemv: dict) -> dict:
    """Every kernel of the inference path compiled with PDL on (v46; the launch plan's ``pdl``, on in CUDA-graph
    captures on sm_90+): the Qwen3-30B-A3B T=1 chain (routing + up X·Aᵀ, up GEMV, down X·Aᵀ, down GEMV, combine)
    and the T=128 up GEMM."""
    from nf4moe.kernels.combine import combine_kernel
    from nf4moe.kernels.grouped_gemm import nf4_moe_gemm_kernel
    from nf4moe.kernels.grouped_gemv import nf4_moe_gemv_kernel
    from nf4moe.kernels.lora_xa import lora_xa_kernel
    from nf4moe.kernels.routing import routing_kernel, routing_xa_kernel

    t1 = dict(INTS, XA_SPLIT=16, P=8, ROW_BUCKET=8)
    down_ints = dict(t1, N=2048, N_TOTAL=2048, K_DIM=768, stride_xm=768, stride_om=2048, XA_SPLIT=6)
    gemv_t1 = dict(gemv, PDL=True, COMBINE=False, SLOTS=1, XA_EARLY=False, BLOCK_M=1, BLOCK_N=8, LANES=8, STEPS=1,
                   VEC=16)
    xa = dict(TOP_K=8, E_POW2=128, R_PAD=16, INTERPRET=False, BLOCK_M=16, BLOCK_K=64, PDL=True)
    ptrs = dict(PTRS, a_ptr="*bf16", y_ptr="*bf16")
    return {
        "pdl_routing": facts(compile_kernel(routing_kernel, ptrs, dict(P=8, E=128),
                                            dict(P_POW2=128, NUM_BINS=256, CHECK=False, PDL=True), 4, 1)),
        "pdl_routing_xa": facts(compile_kernel(
            routing_xa_kernel, ptrs, dict(P=8, E=128, R=16, K_DIM=2048, K_SLICE=128, SPLIT=16),
            dict(P_POW2=128, NUM_BINS=256, CHECK=True, TOP_K=8, R_PAD=16, BLOCK_K=64, INTERPRET=False, PDL=True), 4, 1,
            debug=True)),
        "pdl_gemv_up": facts(compile_kernel(nf4_moe_gemv_kernel, ptrs, t1, dict(gemv_t1, XA_BY_PAIR=True, K_DIM=2048),
                                            2, 1)),
        "pdl_lora_xa_down": facts(compile_kernel(lora_xa_kernel, ptrs, dict(down_ints, K_SLICE=128),
                                                 dict(xa, GATHER=False), 4, 1)),
        "pdl_gemv_down": facts(compile_kernel(nf4_moe_gemv_kernel, ptrs, down_ints,
                                              dict(gemv_t1, TOP_K=8, GATED=False, GATHER=False, SCATTER=True,
                                                   XA_BY_PAIR=False, K_DIM=768), 2, 1)),
        "pdl_combine": facts(compile_kernel(combine_kernel, ptrs, dict(H=2048, E=128),
                                            dict(TOP_K=8, BLOCK_H=1024, PDL=True), 4, 1)),
        # gemm_up_bk128 with PDL on (the comparison's other side)
        "pdl_gemm_up": facts(compile_kernel(nf4_moe_gemm_kernel, ptrs, INTS,
                                            dict(up, PDL=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128), 4, 3)),
    }


def gluon_available() -> bool:
    """Triton ships Gluon's Hopper API (3.6 and later; the layer's own test: moe_layers.triton_backend)."""
    import importlib.util

    return importlib.util.find_spec("triton.experimental.gluon.language.nvidia.hopper") is not None


def main() -> int:
    from nf4moe.kernels.grouped_gemm import nf4_moe_gemm_kernel
    from nf4moe.kernels.grouped_gemm_bwd import nf4_moe_gemm_t_kernel
    from nf4moe.kernels.grouped_gemv import nf4_moe_gemv_kernel
    from nf4moe.kernels.routing import routing_kernel

    ptrs, ints, common = PTRS, INTS, COMMON
    out = {}
    up = dict(common, GATED=True, GATHER=True, SCATTER=False, INTERPRET=False, LUT=True, XA_PRE=True,
              WRITE_GU=False, WRITE_OUT=True)
    # tiles of up to 32 rows take their K steps in MMA k order (nf4_decode.mma_k_order), larger ones in natural order
    out["gemm_up_bk128"] = facts(compile_kernel(nf4_moe_gemm_kernel, ptrs, ints,
                                                dict(up, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128), 4, 3))
    out["gemm_up_bk64"] = facts(compile_kernel(nf4_moe_gemm_kernel, ptrs, ints,
                                               dict(up, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), 4, 3))
    out["gemm_up_bk64_bm16"] = facts(compile_kernel(nf4_moe_gemm_kernel, ptrs, ints,
                                                    dict(up, BLOCK_M=16, BLOCK_N=64, BLOCK_K=64), 4, 4))
    out["gemm_up_bm128_bk128"] = facts(compile_kernel(nf4_moe_gemm_kernel, ptrs, ints,
                                                      dict(up, BLOCK_M=128, BLOCK_N=128, BLOCK_K=128), 8, 3))
    out["gemm_up_bm64_bk128"] = facts(compile_kernel(nf4_moe_gemm_kernel, ptrs, ints,
                                                     dict(up, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128), 4, 3))
    gemv = {k: v for k, v in up.items() if k not in ("INTERPRET", "XA_PRE", "WRITE_GU", "WRITE_OUT")}
    out["gemv_up"] = facts(compile_kernel(nf4_moe_gemv_kernel, ptrs, ints,
                                          dict(gemv, COMBINE=False, SLOTS=1, XA_BY_PAIR=False, XA_EARLY=False, K_DIM=2048, BLOCK_M=1, BLOCK_N=4,
                                               LANES=32, STEPS=1, VEC=16), 4, 1))
    # the down GEMV with the fused combine (the plan's combine="gemv", eager decode calls): Qwen3-30B-A3B T=1
    down_t1 = dict(ints, N=2048, N_TOTAL=2048, stride_xm=768, stride_om=2048, XA_SPLIT=6, P=8, ROW_BUCKET=8)
    out["gemv_down_combine"] = facts(compile_kernel(
        nf4_moe_gemv_kernel, ptrs, down_t1,
        dict(gemv, TOP_K=1, GATED=False, GATHER=False, SCATTER=True, COMBINE=True, SLOTS=8, XA_BY_PAIR=False,
             XA_EARLY=False, K_DIM=768, BLOCK_M=1, BLOCK_N=8, LANES=8, STEPS=1, VEC=16), 2, 1))
    # the routing launch's X·Aᵀ (16 partials by pair id) summed while the first chunk is in flight (XA_EARLY)
    for when, early in (("early", True), ("late", False)):  # (the Qwen3-30B-A3B T=1 up winner's config)
        out["gemv_up_xa_" + when] = facts(compile_kernel(
            nf4_moe_gemv_kernel, ptrs, dict(ints, XA_SPLIT=16, P=8, ROW_BUCKET=8),
            dict(gemv, COMBINE=False, SLOTS=1, XA_BY_PAIR=True, XA_EARLY=early, K_DIM=2048, BLOCK_M=1, BLOCK_N=8,
                 LANES=8, STEPS=1, VEC=16), 2, 1))
    bwd = dict(common, DOWN=False, NEED_DY=True, NEED_OUT=True, NEED_DW=False, NEED_XA=False, NEED_DZB=True,
               INTERPRET=False, LUT=True)
    out["bwd_up_dx"] = facts(compile_kernel(nf4_moe_gemm_t_kernel, ptrs, dict(ints, N=2048, KR=1536),
                                            dict(bwd, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), 4, 3))
    for check in (False, True):  # the layer's launch checks ids in the kernel (compiled with debug for it)
        ptx = compile_kernel(routing_kernel, ptrs, dict(P=8, E=128), dict(P_POW2=1024, NUM_BINS=256, CHECK=check, PDL=False),
                             8, 1, debug=check)
        out["routing_1024" + ("_check" if check else "")] = dict(facts(ptx), assertfail=ptx.count("__assertfail"))
    from nf4moe.kernels.routing import routing_xa_kernel

    # Qwen3-30B-A3B T=1: 8 pairs, K=2048 in 16 slices of 128, r=16 (the routing launch with the up X·Aᵀ, v39)
    ptx = compile_kernel(routing_xa_kernel, ptrs, dict(P=8, E=128, R=16, K_DIM=2048, K_SLICE=128, SPLIT=16),
                         dict(P_POW2=128, NUM_BINS=256, CHECK=True, TOP_K=8, R_PAD=16, BLOCK_K=64, INTERPRET=False,
                              PDL=False), 4, 1, debug=True)
    out["routing_xa"] = dict(facts(ptx), assertfail=ptx.count("__assertfail"), local=ptx.count(".local"))
    out.update(pdl_variants(up, gemv))
    if gluon_available():  # the Gluon GEMM for many rows (grouped_gemm_wgmma.py), up and down, nested absmax
        from nf4moe.kernels.grouped_gemm_wgmma import nf4_moe_gemm_wgmma_kernel

        wg_ptrs = dict(ptrs, am_ptr="*u8", xa_ptr="*fp32", tile_ptr="*i32")
        wg_ints = dict(ints, K_HALF=1024, P=65536)
        wg = dict(TOP_K=8, R_PAD=16, ACT=0, HAS_LORA=True, NESTED=True, BS=64, BS2=256, WRITE_GU=False, WRITE_OUT=True)
        down_ints = dict(wg_ints, N=2048, K_DIM=768, K_HALF=384, N_TOTAL=2048)
        from nf4moe.kernels.plan import TILES

        for bm, tn in TILES.values():  # every tile the plan can choose: 128x256 ("") and 256x128 ("_256rows")
            name = "" if (bm, tn) == (128, 256) else f"_{bm}rows"
            tile = dict(wg, BLOCK_M=bm, TILE_N=tn)
            out["wgmma_up" + name] = facts(compile_kernel(nf4_moe_gemm_wgmma_kernel, wg_ptrs, wg_ints,
                                                          dict(tile, GATED=True, BLOCK_N=tn // 2), 8, 1, gluon=True))
            out["wgmma_down" + name] = facts(compile_kernel(nf4_moe_gemm_wgmma_kernel, wg_ptrs, down_ints,
                                                            dict(tile, TOP_K=1, GATED=False, BLOCK_N=tn), 8, 1,
                                                            gluon=True))
        # the backward's Gluon GEMMs (grouped_gemm_wgmma_bwd.py): Qwen3-30B-A3B T=8192, down with every epilogue
        # output, up (dx), both nested
        from nf4moe.kernels.grouped_gemm_wgmma_bwd import BLOCK_M, TILE_N, nf4_moe_gemm_t_wgmma_kernel

        bw_ptrs = dict(wg_ptrs, dyb_ptr="*fp32", dw_ptr="*fp32")
        bw = dict(TOP_K=8, R_PAD=16, ACT=0, HAS_LORA=True, NESTED=True, BS=64, BS2=256, BLOCK_M=BLOCK_M,
                  TILE_N=TILE_N)
        for name, sh, cx in (
                ("wgmma_bwd_down", dict(stride_dm=2048, N=768, KR=2048, N_HALF=384),
                 dict(bw, DOWN=True, NEED_OUT=True, NEED_DW=True, NEED_XA=True)),
                ("wgmma_bwd_up", dict(stride_dm=1536, N=2048, KR=1536, N_HALF=1024),
                 dict(bw, DOWN=False, NEED_OUT=True, NEED_DW=False, NEED_XA=False))):
            out[name] = facts(compile_kernel(nf4_moe_gemm_t_wgmma_kernel, bw_ptrs, dict(sh, E=128, R=16, P=65536),
                                             cx, 8, 1, gluon=True))
        out["wgmma_bwd_tile_bytes_match"] = reinterpreted_tiles_match(TILE_N)
    json.dump(out, sys.stdout)
    return 0


def reinterpreted_tiles_match(tile_n: int) -> bool | None:
    """Whether the backward's decoded weight tile, written as (64, tile_n / 2) int32 words with the NVMMA 128-byte
    swizzle and read by the wgmma as (64, tile_n) 16-bit values through a reinterpreting view, is the same bytes
    in both: each layout's offset bases (Triton's linear layouts) scaled to bytes must agree.  None where this
    Triton's Gluon builder does not expose its linear layouts."""
    from triton._C.libtriton import gluon_ir, ir
    from triton.experimental.gluon import language as gl

    ctx = ir.context()
    ir.load_dialects(ctx)
    b = gluon_ir.GluonOpBuilder(ctx, "sm90")
    if not hasattr(b, "to_linear_layout"):
        return None

    def byte_bases(bits: int, shape: list) -> list:
        layout = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=bits, rank=2)
        bases = b.to_linear_layout(layout._to_ir(b), shape).offset_bases
        per = bits // 8
        # element offset bit j -> (row, column) of that element; in bytes the column scales by the element size
        return [(r, c * per) for r, c in bases]

    words = byte_bases(32, [64, tile_n // 2])
    halves = byte_bases(16, [64, tile_n])
    # the 16-bit layout has one offset bit more (elements are half the size): its first base is byte 2 of a row,
    # which the 32-bit one reaches inside a word; every further base must coincide
    return halves[0] == (0, 2) and halves[1:] == words


if __name__ == "__main__":
    sys.exit(main())
