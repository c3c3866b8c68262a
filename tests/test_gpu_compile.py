"""The kernels compile for an H100 (sm_90) on this CPU machine, with the properties the GPU results rely on.

CI has no GPU, so the GPU suite runs only in device sessions; this catches a kernel that Triton can no
longer lower for Hopper (inline PTX, layouts, the pipeliner) before device time is spent.  The compile runs
in a subprocess without TRITON_INTERPRET (tests/gpu_compile.py), through Triton's own compiler and ptxas.
What it checks, per kernel variant:
- the forward GEMM (both K-step kinds, tiles of up to 32 rows in MMA k order and larger ones in natural
  order) and the backward's transposed GEMM issue Hopper wgmma and stage their loads with cp.async (the
  software pipeline), and decode NF4 with the scaled PTX table;
- the forward GEMM in MMA k order reads the staged weight bytes as words (the natural order byte by byte);
- the decode GEMV uses the unscaled table and no tensor cores; with the fused combine it counts arrivals with
  one acq_rel atomic and reads the slot rows past L1; the routing kernel compiles at 1024 keys;
- the Gluon GEMM for many rows (grouped_gemm_wgmma.py), both of the plan's tiles, issues asynchronous wgmma
  from shared memory fed by cp.async (activations) and 16-byte weight-byte loads decoded by the pair PTX with
  its table words in registers, with no local memory;
- the backward's Gluon GEMMs (grouped_gemm_wgmma_bwd.py) likewise, and the int32 and 16-bit views of their
  decoded weight tile are the same bytes (linear layouts);
- with PDL (programmatic dependent launch, v46) every kernel of the inference path waits for its predecessor
  before its first global memory access, and without it none has grid dependency control.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
from triton_cases import run_uninterpreted  # noqa: E402  (nf4moe needs triton)
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.fixture(scope="module")
def compiled():
    if not PTXAS.exists() and shutil.which("ptxas") is None:
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    return json.loads(run_uninterpreted("gpu_compile.py"))


GEMMS = ["gemm_up_bk128", "gemm_up_bk64", "gemm_up_bk64_bm16", "gemm_up_bm64_bk128", "gemm_up_bm128_bk128",
         "bwd_up_dx"]


@pytest.mark.parametrize("variant", GEMMS)
def test_gemms_use_wgmma_pipelined_loads_and_the_table_decode(compiled, variant):
    f = compiled[variant]
    assert f["wgmma"] > 0, "no Hopper tensor-core instruction"
    assert f["cp_async_bytes"], "loads are not software-pipelined (no cp.async)"
    assert f["lut_decodes"] > 0 and f["lut_scaled"], "NF4 decode is not the scaled PTX table"


@pytest.mark.parametrize("variant", [v for v in GEMMS if v != "gemm_up_bk64_bm16"])
def test_weight_bytes_staged_in_16_byte_copies(compiled, variant):
    """nf4_decode.row_bytes tells the compiler packed rows start 16-byte aligned (K_DIM is a multiple of the
    blocksize), so each K step's weight runs of 16+ bytes are staged by 16-byte cp.async; the launch's own
    hint (K_DIM % 16 == 0) allowed only 8 (v44).  The 4-byte copies left are the activations and absmax."""
    f = compiled[variant]
    assert 16 in f["cp_async_bytes"] and 8 not in f["cp_async_bytes"], f["cp_async_bytes"]


def test_short_mma_order_runs_staged_whole(compiled):
    """A 16-row tile's K step of 64 in MMA k order gives each lane group a run of 64 / 8 = 8 bytes per row
    (nf4_decode.mma_k_order): staged by 8-byte cp.async, nothing narrower than the 4-byte activation and absmax
    copies."""
    f = compiled["gemm_up_bk64_bm16"]
    assert max(f["cp_async_bytes"]) == 8 and min(f["cp_async_bytes"]) >= 4, f["cp_async_bytes"]


def test_gemv_xa_early_sums_the_partials_without_a_loop(compiled):
    """XA_EARLY (the plan's ``gemv_xa_early``, on in CUDA-graph captures): the 16 X·Aᵀ partials are masked
    straight-line loads, so the kernel loses the epilogue's partial loop (its branches) and spills nothing."""
    early, late = compiled["gemv_up_xa_early"], compiled["gemv_up_xa_late"]
    assert early["branches"] < late["branches"], (early["branches"], late["branches"])
    assert not any("local" in op for op in early["ptx_ops"]), "registers spilled to local memory"


@pytest.mark.parametrize("variant", ["gemm_up_bk128", "gemm_up_bk64_bm16"])
def test_mma_k_order_loads_weight_words_and_decodes_pairs(compiled, variant):
    """K steps in MMA k order (nf4_decode.mma_k_order, tiles of up to 32 rows): the staged weight bytes are read
    as words, not one byte at a time, and decoded straight into (even, odd) operand pairs; the natural order
    (larger tiles) reads K steps of 128 as bytes."""
    f = compiled[variant]
    assert f["smem_byte_loads"] == 0 and f["lut_pairs"] > 0, f
    assert compiled["gemm_up_bm64_bk128"]["smem_byte_loads"] > 0
    assert compiled["gemm_up_bm128_bk128"]["smem_byte_loads"] > 0
    assert compiled["gemm_up_bk64"]["lut_pairs"] > 0  # the natural order (64-row tiles) decodes pairs too


def test_gemv_uses_the_pair_table_without_tensor_cores(compiled):
    """The decode GEMV decodes through the GEMMs' pair PTX (unscaled: the absmax is applied in fp32 once per
    lane and step; table words in registers, not immediates), multiplies on the FP32 units, and reads its
    weights and activations as 16-byte vectors in one layout (no shared memory)."""
    f = compiled["gemv_up"]
    assert f["lut_pairs"] > 0 and f["lut_table_regs"] > 0 and not f["lut_scaled"] and f["wgmma"] == 0, f
    assert f["global_v4_loads"] > 0 and f["smem_byte_loads"] == 0, f


def test_gemv_fused_combine_counts_arrivals_with_an_acq_rel_atomic(compiled):
    """The down GEMV with the fused combine (grouped_gemv._combine_last): one acq_rel arrival per program (one
    thread, then broadcast), and the last slot to arrive reads the token's slot rows with ld.global.cg (past L1,
    where another SM's stores are not); still the pair table, 16-byte loads, no tensor cores."""
    f = compiled["gemv_down_combine"]
    assert f["acq_rel_counter"] == 1, f
    assert f["l2_loads"] > 0, f
    assert f["lut_pairs"] > 0 and f["global_v4_loads"] > 0 and f["wgmma"] == 0 and f["smem_byte_loads"] == 0, f
    assert compiled["pdl_gemv_down"]["acq_rel_counter"] == 0  # the plain down GEMV: no counter


def test_routing_kernel_compiles_at_the_threshold(compiled):
    assert "routing_1024" in compiled and compiled["routing_1024"]["ptx_ops"]


def test_routing_xa_kernel_compiles_with_its_check(compiled):
    """The routing launch that also computes the up projection's X·Aᵀ (v39): compiles for sm_90, keeps the id
    check, no local memory."""
    f = compiled["routing_xa"]
    assert f["ptx_ops"] and f["assertfail"] > 0 and f["local"] == 0, f


def test_routing_kernel_checks_ids_only_when_asked(compiled):
    """The layer's routing launch (CHECK, compiled with debug) traps on a negative id; the plain one has no
    assert at all (device_assert compiles to nothing without debug)."""
    assert compiled["routing_1024_check"]["assertfail"] > 0
    assert compiled["routing_1024"]["assertfail"] == 0


PDL_KERNELS = ["pdl_routing", "pdl_routing_xa", "pdl_gemv_up", "pdl_lora_xa_down", "pdl_gemv_down", "pdl_combine",
               "pdl_gemm_up"]


@pytest.mark.parametrize("variant", PDL_KERNELS)
def test_pdl_kernels_wait_before_any_global_access(compiled, variant):
    """v46 (the launch plan's ``pdl``): a kernel launched as a programmatic dependent launch may start while its predecessor
    runs, so it must wait (griddepcontrol.wait) before its first global load, store, atomic or cp.async, and it
    lets its own dependent launch (launch_dependents); once each, on the entry path."""
    f = compiled[variant]
    assert f["pdl_waits"] == 1 and f["pdl_launch_dependents"] == 1, f
    assert f["pdl_wait_first"], "a global memory access comes before griddepcontrol.wait"


@pytest.mark.parametrize("variant", ["gemm_up_bk128", "gemv_up", "routing_1024", "routing_xa"])
def test_kernels_without_pdl_have_no_grid_dependency_control(compiled, variant):
    f = compiled[variant]
    assert f["pdl_waits"] == 0 and f["pdl_launch_dependents"] == 0, f


def test_pdl_leaves_the_gemm_loop_unchanged(compiled):
    """PDL adds the two instructions at entry and nothing to the K loop: same wgmmas, table decodes and copies."""
    on, off = compiled["pdl_gemm_up"], compiled["gemm_up_bk128"]
    for fact in ("wgmma", "lut_pairs", "cp_async_bytes", "global_v4_loads"):
        assert on[fact] == off[fact], fact


@pytest.mark.parametrize("variant", ["wgmma_up", "wgmma_down", "wgmma_up_256rows", "wgmma_down_256rows"])
def test_wgmma_gemm_decodes_into_shared_memory_for_async_wgmma(compiled, variant):
    if variant not in compiled:
        pytest.skip("this Triton has no Gluon Hopper API")
    f = compiled[variant]
    ops = f["ptx_ops"]
    assert f["wgmma"] > 0 and ops.get("wgmma.wait_group.sync.aligned", 0) > 0, "no asynchronous wgmma"
    assert 16 in f["cp_async_bytes"], "activation rows not copied with 16-byte cp.async"
    assert f["global_v4_loads"] > 0, "weight bytes not loaded 16 bytes at a time"
    assert f["lut_pairs"] > 0, "NF4 not decoded by the pair PTX"
    assert f["lut_table_regs"] > 0, "the decode's table words are immediates, not registers (v42)"
    assert any(op.startswith("fence.proxy.async") for op in ops), "decoded tiles not fenced for the async proxy"
    assert not any("local" in op for op in ops), "registers spilled to local memory"


@pytest.mark.parametrize("variant", ["wgmma_bwd_down", "wgmma_bwd_up"])
def test_wgmma_backward_decodes_into_shared_memory_for_async_wgmma(compiled, variant):
    """The backward's Gluon GEMMs (grouped_gemm_wgmma_bwd.py): asynchronous wgmma fed by 16-byte cp.async of the
    dy rows and of the packed bytes (each thread decodes the chunk it copied: no shared byte loads), the pair PTX
    with its table words in registers, the decoded tile fenced for the async proxy, no local memory."""
    if variant not in compiled:
        pytest.skip("this Triton has no Gluon Hopper API")
    f = compiled[variant]
    ops = f["ptx_ops"]
    assert f["wgmma"] >= 5 and ops.get("wgmma.wait_group.sync.aligned", 0) > 0, "no asynchronous wgmma (4 + LoRA)"
    assert f["cp_async_bytes"] == [16], f["cp_async_bytes"]
    assert f["lut_pairs"] > 0 and f["lut_table_regs"] > 0, "NF4 not decoded by the pair PTX with register tables"
    assert f["smem_byte_loads"] == 0, "packed bytes read from shared memory byte by byte"
    assert any(op.startswith("fence.proxy.async") for op in ops), "decoded tiles not fenced for the async proxy"
    assert not any("local" in op for op in ops), "registers spilled to local memory"


def test_wgmma_backward_weight_tile_views_are_the_same_bytes(compiled):
    """The decoded tile is written as int32 words and read as 16-bit values: both NVMMA layouts map every byte to
    the same place (tile rows of 256 bytes: two 128-byte swizzle slabs)."""
    match = compiled.get("wgmma_bwd_tile_bytes_match")
    if match is None:
        pytest.skip("this Triton's Gluon exposes no linear layouts")
    assert match
