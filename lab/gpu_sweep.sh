#!/usr/bin/env bash
# One GPU session's correctness + benchmark sweep, in parts that each fit a 10-minute command
# (times measured on an H100, 2026-11-25).  Writes everything under $OUT (default bench/results/sweep).
#
#   bash lab/gpu_sweep.sh tests      # GPU test suite, one pinned kernel config (~9 min: run the two halves below)
#   bash lab/gpu_sweep.sh tests_fwd  # forward kernels + routing (~5 min)
#   bash lab/gpu_sweep.sh tests_bwd  # backward kernels + the module (~4 min)
#   bash lab/gpu_sweep.sh qwen3      # forward all T + fwd+bwd T=8192/16384, Qwen3-30B-A3B (~3 min)
#   bash lab/gpu_sweep.sh wide       # forward GLM-4.5-Air all T, DeepSeek-V3 T <= 1024 (~5 min)
#   bash lab/gpu_sweep.sh dsv3big    # forward DeepSeek-V3 T = 8192, 16384 (~1 min)
#   bash lab/gpu_sweep.sh e2e        # end-to-end: reduced (4 layers) and the 48-layer memory figure (~4 min)
#   bash lab/gpu_sweep.sh profile    # per-kernel and host-time profiles at small and large T (~3 min)
#   bash lab/gpu_sweep.sh pipe       # the opt-in K-loop hint against the default, Qwen3, DeepSeek-V3 (~5 min; NOTES v16)
#   bash lab/gpu_sweep.sh splitk     # the opt-in split-K at decode sizes: its GPU tests, then against the default
#                                      # at T=1..8, Qwen3 and DeepSeek-V3, with CUDA-graph times (measured on an H200: slower, NOTES v22)
#   bash lab/gpu_sweep.sh wgmma      # the Gluon GEMM: its GPU tests, then its configs against the Triton GEMM (~7 min)
#   bash lab/gpu_sweep.sh h200all    # forward, all three shapes x all T, one process per shape, DeepSeek-V3 first (~4 min
#                                      # before the v31 GEMV; its autotuning made GLM and DeepSeek-V3 run past 165 / 220 s)
#   bash lab/gpu_sweep.sh h200_qwen3 # the same, one shape per command (~3, ~4, ~6 min): h200_qwen3, h200_glm, h200_dsv3
#   bash lab/gpu_sweep.sh ncu_wgmma  # Nsight Compute on the Gluon GEMM's up projection, Qwen3 T=8192, both tiles (~3 min)
#   bash lab/gpu_sweep.sh early      # the Gluon GEMM's GPU tests, then NF4MOE_WGMMA_EARLY_COPY against the default (~5 min)
#   bash lab/gpu_sweep.sh ncu_ws     # Nsight Compute with stall reasons: the warp-specialised Gluon GEMM against the default (~2 min)
#   bash lab/gpu_sweep.sh gemv       # the decode GEMV (grouped_gemv.py): its GPU tests, GEMM against GEMV at T <= 8 for
#                                      # the three shapes, and the layer (incl. CUDA graph) with and without it at T=1, 4 (~8 min)
#   bash lab/gpu_sweep.sh gemv_combine # the GEMV's fused combine: its GPU tests, then host time per eager call (~4 min)
#   bash lab/gpu_sweep.sh graph_combine # the fused combine under CUDA graphs: GPU tests, then fused / unfused / fused
#                                      # without the memset, eager and graph, per-kernel times, the three shapes at T=1, 2
#   bash lab/gpu_sweep.sh ncu_gemv   # Nsight Compute with stall reasons on the decode GEMV (autotuned), Qwen3 T=1 (~2 min)
#   bash lab/gpu_sweep.sh tiles      # session 12: GPU tests of the GEMV (incl. TILES), the Gluon GEMM (its launch through the
#                                      # compiled-kernel cache) and the compile facts; every GEMV candidate's time with NF4MOE_GEMV_TILES=1 at Qwen3 T=1, 2
#                                      # (eager and CUDA graph) (~10 min: session 14 measured the GEMV tests at 177 s, T=1 at
#                                      # ~170 s; until then it also ran the Qwen3 table, now h200_qwen3's alone)
#   bash lab/gpu_sweep.sh tunegraph  # v38: graph_bench's GPU test, then Qwen3 T=1 tuned twice with Triton's do_bench and twice
#                                      # with NF4MOE_TUNE_GRAPH=1, each in a fresh process: GEMV choices, kernel times, graph replays (~9 min)
#   bash lab/gpu_sweep.sh pending    # after session 14: GPU tests of v37-v39, then Qwen3 T=1 (eager, CUDA graph, kernel times) in
#                                      # four fresh processes: default, NF4MOE_TUNE_GRAPH=1, NF4MOE_XA_IN_ROUTING=1, both (~9 min)
#   bash lab/gpu_sweep.sh v40        # session 15: GPU tests of the capped GEMV pins (since dropped), Qwen3 T=1 profiles in two fresh processes,
#                                      # T=16 / 128 profiles with every GEMM candidate's time, the Qwen3 forward table (~10 min)
#   bash lab/gpu_sweep.sh crossover  # the GEMV / GEMM crossover at T = 4, 8 for Qwen3 and GLM-4.5-Air (~5 min)
#   bash lab/gpu_sweep.sh v42        # session 16: GPU tests of the Gluon GEMM's opt-in configs (NF4MOE_LUT_REGS among them) and
#                                      # the compile facts, the Gluon GEMM without / with the table in registers at Qwen3 T=1024, 8192
#                                      # and DeepSeek-V3 T=8192, then the GLM-4.5-Air GEMV / GEMM crossover at T = 4, 8 (~9 min)
#   bash lab/gpu_sweep.sh v44        # session 17: the Qwen3 forward table (all T, peers) with the v42 defaults, then the
#                                      # DeepSeek-V3 GEMV / GEMM crossover at T = 4, 8 (32 / 64 routed rows) (~8 min)
#   bash lab/gpu_sweep.sh v44b       # session 17: GPU tests of the MMA GEMMs (16-byte weight copies, nf4_decode.row_bytes), then
#                                      # Qwen3 T=128, 1024 (MMA GEMM, CUDA graphs) in three fresh processes: NF4MOE_ROW_ALIGN=1, 0, 1 (~7 min)
#   bash lab/gpu_sweep.sh v44c       # session 17: Qwen3 fwd+bwd T=8192 against its peers with NF4MOE_ROW_ALIGN=1, then 0 (fresh processes)
#   bash lab/gpu_sweep.sh v44d       # session 17: DeepSeek-V3 T=128 (MMA GEMM, CUDA graphs) with NF4MOE_ROW_ALIGN=1, then 0 (~4 min)
#   bash lab/gpu_sweep.sh ncu_t128   # Nsight Compute with stall reasons on the MMA GEMMs (up, down) at Qwen3 T=128, the
#                                      # autotuner's T=128 tile pinned (~2 min)
#   bash lab/gpu_sweep.sh v45        # after session 17: GPU tests of the GEMV's early X·Aᵀ sum, then Qwen3 T=1, 8 alternating the
#                                      # GEMV without / with it (CUDA graphs, kernel times), GLM-4.5-Air and DeepSeek-V3 T=1 (~6 min)
#   bash lab/gpu_sweep.sh v46        # v45 + v46 in one call: their GPU tests (early X·Aᵀ, PDL bit-identity eager / graph /
#                                      # training, compile facts), then Qwen3 T=1, 8 (GEMV) and T=16, 128 (MMA GEMM) alternating
#                                      # without / with NF4MOE_PDL (and the early X·Aᵀ), CUDA graphs; GLM-4.5-Air and DeepSeek-V3
#                                      # T=1 (~9 min)
#   bash lab/gpu_sweep.sh auto       # session 19's defaults (PDL and the early X·Aᵀ in CUDA-graph captures only): their GPU
#                                      # tests (captures compile them after eager calls, same bits), then Qwen3 T=1, 16, 128 with
#                                      # both forced off against the default, eager and CUDA graphs (~8 min)
#   bash lab/gpu_sweep.sh s20        # session 20: the Qwen3 forward table (all T, peers), the capture-default GPU tests, Qwen3
#                                      # T=16, 128 with the up / down X·Aᵀ in the GEMM's K loop (NF4MOE_XA_PRE=0: two launches fewer)
#                                      # against the default (eager, CUDA graphs), the eager host profile (~9 min)
#   bash lab/gpu_sweep.sh s20b       # session 20: the GLM-4.5-Air forward table, the host time with NF4MOE_XA_PRE=0 (~5 min)
#   bash lab/gpu_sweep.sh s21        # session 21: the capture-default GPU tests (the early X·Aᵀ test's order fix), then the
#                                      # Triton GEMM against the Gluon GEMM at Qwen3 T=1024, 2048 and GLM-4.5-Air T=1024,
#                                      # alternating, one process each (session 17's point 3; ~8 min)
#   bash lab/gpu_sweep.sh s21tests   # session 21: the forward GPU suite (forward, routing, launch, compile, decode table,
#                                      # MMA k order), one pinned GEMM config, cut at $LIMIT s (default 480)
#   bash lab/gpu_sweep.sh s22        # after session 21: the torch.compile / opcheck GPU tests (the traced counters' fix),
#                                      # the rest of the forward GPU suite (routing, launch, decode table, k order), the
#                                      # backward suite (~9 min; each part cut at its limit, logs in $OUT)
#   bash lab/gpu_sweep.sh s22b       # after the row_bytes fix: the compile / opcheck tests, the backward file (~5 min)
#   bash lab/gpu_sweep.sh s22c       # the module tests, then Qwen3 forward rows at T=1, 128, 1024 (~9 min)
#   bash lab/gpu_sweep.sh largeprof  # GEMM times of every autotuner candidate at T=8192, Qwen3 and DeepSeek-V3 (~2 min)
#   bash lab/gpu_sweep.sh s27        # for the first session with a GPU after 25-26 (issue 31, 34): the Gluon backward's and
#                                      # the plan's GPU tests, the quantizer's GPU memory test and test_hf_quantizer on CUDA,
#                                      # then lab/bwd_probe.py with the profile at Qwen3 / GLM-4.5-Air T = 1024, 2048, 8192
#                                      # (~9 min; .whl carried: install it with the first lines of lab/gpu_tests.sh)
set -euo pipefail
OUT=${OUT:-bench/results/sweep}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
# the GEMM config the GPU test runs pin (autotuning every test shape over every config would take most of an hour)
PIN=BLOCK_M=16,BLOCK_N=32,BLOCK_K=64,num_warps=4,num_stages=3
# pinned_tests LIMIT LOG PYTEST_ARGS...: the GPU tests with the pinned config, cut at LIMIT s, every test's outcome
# in $OUT/LOG (kept if the limit cuts the run), the failures and the summary line printed
pinned_tests() {
  local limit=$1 log=$OUT/$2
  shift 2
  NF4MOE_CONFIG=$PIN timeout "$limit" $py -m pytest -v -rfE -p no:cacheprovider "$@" > "$log" 2>&1 || true
  grep -E "^FAILED|^ERROR|passed|failed" "$log" | tail -15
}
case "${1:-}" in
  tests|tests_fwd|tests_bwd)
    files="tests/test_triton_forward.py tests/test_routing_device.py tests/test_launch.py"
    [ "$1" = tests_bwd ] && files="tests/test_triton_backward.py tests/test_module.py"
    [ "$1" = tests ] && files="$files tests/test_triton_backward.py tests/test_module.py"
    NF4MOE_CONFIG=$PIN \
      $py -m pytest -q -p no:cacheprovider $files 2>&1 | tee "$OUT/gpu_$1.log" ;;
  qwen3)
    mkdir -p "$OUT/qwen3"
    $py -m nf4moe bench --mode fwd --shapes qwen3 --out "$OUT/qwen3" 2>&1 | tee "$OUT/qwen3_fwd.log"
    $py -m nf4moe bench --mode fwdbwd --shapes qwen3 --tokens 8192,16384 --out "$OUT/qwen3" 2>&1 \
      | tee "$OUT/qwen3_fwdbwd.log" ;;
  wide)
    mkdir -p "$OUT/glm" "$OUT/dsv3"
    $py -m nf4moe bench --mode fwd --shapes glm45air --out "$OUT/glm" 2>&1 | tee "$OUT/glm_fwd.log"
    $py -m nf4moe bench --mode fwd --shapes dsv3 --tokens 1,16,128,1024 --out "$OUT/dsv3" 2>&1 \
      | tee "$OUT/dsv3_fwd.log" ;;
  dsv3big)
    mkdir -p "$OUT/dsv3big"
    $py -m nf4moe bench --mode fwd --shapes dsv3 --tokens 8192,16384 --no-check --out "$OUT/dsv3big" 2>&1 \
      | tee "$OUT/dsv3big_fwd.log" ;;
  e2e)
    $py bench/bench_e2e.py --part reduced --out "$OUT" 2>&1 | tee "$OUT/e2e_reduced.log"
    $py bench/bench_e2e.py --part full --quick --out "$OUT" 2>&1 | tee "$OUT/e2e_full.log" ;;
  profile)
    $py -m lab.profile_layer --tokens 1,16,128 --variants lut,gemv 2>&1 | tee "$OUT/profile_small.log"
    $py -m lab.profile_layer --tokens 1024,8192 --variants lut 2>&1 | tee "$OUT/profile_large.log"
    $py -m lab.profile_host --tokens 1,128 2>&1 | tee "$OUT/host.log" ;;
  pipe)
    $py -m lab.profile_layer --tokens 128,1024,8192 --variants gemm,pipe 2>&1 | tee "$OUT/profile_pipe_qwen3.log"
    $py -m lab.profile_layer --shape dsv3 --tokens 8192 --variants gemm,pipe 2>&1 | tee "$OUT/profile_pipe_dsv3.log" ;;
  splitk)
    NF4MOE_CONFIG=$PIN \
      $py -m pytest -q -p no:cacheprovider tests/test_triton_forward.py -k split_k 2>&1 | tee "$OUT/gpu_split_k.log"
    $py -m lab.profile_layer --tokens 1,2,8 --variants gemm,split2,split4 --check 2>&1 | tee "$OUT/profile_split_k.log"
    $py -m lab.profile_layer --shape dsv3 --tokens 1,8 --variants gemm,split2,split4 --check 2>&1 \
      | tee "$OUT/profile_split_k_dsv3.log"
    for s in 1 2 4; do mkdir -p "$OUT/split_k_$s"; NF4MOE_SPLIT_K=$s $py -m nf4moe bench --mode fwd --shapes qwen3 --tokens 1 --no-check \
      --out "$OUT/split_k_$s" 2>&1 | grep "nf4moe" | tee -a "$OUT/bench_split_k.log"; done ;;
  wgmma)
    $py -m pytest -q -p no:cacheprovider tests/test_triton_forward.py -k wgmma 2>&1 | tee "$OUT/gpu_wgmma.log"
    $py -m lab.profile_layer --tokens 128,512,1024,8192 --variants triton,wgmma,wgmma256,wgmma5 --check 2>&1 \
      | tee "$OUT/profile_wgmma_qwen3.log"
    $py -m lab.profile_layer --shape glm45air --tokens 8192 --variants triton,wgmma,wgmma256,wgmma5 2>&1 \
      | tee "$OUT/profile_wgmma_glm.log"
    $py -m lab.profile_layer --shape dsv3 --tokens 8192 --variants triton,wgmma,wgmma256,wgmma5 2>&1 \
      | tee "$OUT/profile_wgmma_dsv3.log" ;;
  h200all)
    mkdir -p "$OUT/dsv3" "$OUT/glm" "$OUT/qwen3"
    timeout 260 $py -m nf4moe bench --mode fwd --shapes dsv3 --tokens 1,16,128,1024,8192,16384 --out "$OUT/dsv3" 2>&1 \
      | tee -a "$OUT/h200all.log" || true
    timeout 190 $py -m nf4moe bench --mode fwd --shapes glm45air --out "$OUT/glm" 2>&1 | tee -a "$OUT/h200all.log" || true
    timeout 160 $py -m nf4moe bench --mode fwd --shapes qwen3 --out "$OUT/qwen3" 2>&1 | tee -a "$OUT/h200all.log" || true ;;
  h200_qwen3|h200_glm|h200_dsv3)
    shape=${1#h200_}; [ "$shape" = glm ] && shape=glm45air
    mkdir -p "$OUT/${1#h200_}"
    $py -m nf4moe bench --mode fwd --shapes $shape --tokens 1,16,128,1024,8192,16384 --out "$OUT/${1#h200_}" 2>&1 \
      | tee -a "$OUT/$1.log" ;;
  ncu_wgmma)
    for tile in 128x256 256x128; do
      NF4MOE_WGMMA_TILE=$tile ncu --clock-control none --kernel-name regex:nf4_moe_gemm_wgmma --launch-skip 2 \
        --launch-count 1 --section SpeedOfLight --section WarpStateStats --section MemoryWorkloadAnalysis \
        --section Occupancy --section SchedulerStats --section InstructionStats --section ComputeWorkloadAnalysis \
        $py -m lab.ncu_case --tokens 8192 --calls 2 2>&1 | tee "$OUT/ncu_wgmma_up_t8192_$tile.txt"
    done ;;
  early)
    # the Gluon GEMM's GPU tests (every configuration, incl. the remainder split and the early activation copy),
    # then the early copy (one bar.sync fewer per K step, NOTES v29) against the default
    $py -m pytest -q -p no:cacheprovider tests/test_triton_forward.py -k "wgmma or ws" 2>&1 | tee "$OUT/gpu_wgmma_all.log"
    $py -m lab.profile_layer --tokens 1024,8192 --variants wgmma,wgmma_early --check 2>&1 | tee "$OUT/profile_early_qwen3.log"
    $py -m lab.profile_layer --shape dsv3 --tokens 8192 --variants wgmma,wgmma_early 2>&1 | tee "$OUT/profile_early_dsv3.log" ;;
  ncu_ws)
    # the warp-specialised Gluon GEMM (two producer warp groups) against the default one, with the stall reasons
    for ws in 0 8,96,128,4,3; do
      NF4MOE_WGMMA_WS=$ws ncu --clock-control none --kernel-name regex:nf4_moe_gemm_w --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --print-details all \
        $py -m lab.ncu_case --tokens 8192 --calls 2 2>&1 | tee "$OUT/ncu_ws_up_t8192_${ws//,/_}.txt"
    done ;;
  gemv)
    NF4MOE_CONFIG=$PIN $py -m pytest -q -p no:cacheprovider \
      tests/test_triton_forward.py -k "gemv or torch_compile or opcheck or poisoned or matches_reference" 2>&1 \
      | tee "$OUT/gpu_gemv.log"
    $py -m lab.profile_layer --tokens 1,2,4,8 --variants gemm,gemv --check --timings 2>&1 | grep -v "bench nf4_moe_gemm" \
      | tee "$OUT/profile_gemv_qwen3.log"
    for s in dsv3 glm45air; do
      $py -m lab.profile_layer --shape $s --tokens 1,4 --variants gemm,gemv --check 2>&1 | tee "$OUT/profile_gemv_$s.log"
    done
    for rows in 0 16; do mkdir -p "$OUT/gemv_rows_$rows"; NF4MOE_GEMV_ROWS=$rows $py -m nf4moe bench --mode fwd \
      --shapes qwen3 --tokens 1,4 --no-check --out "$OUT/gemv_rows_$rows" 2>&1 | grep -v Warn | tee -a "$OUT/bench_gemv.log"; done ;;
  gemv_combine)
    # the decode GEMV with its fused combine (session 9): its GPU tests (reference, bit-identical to down then
    # combine, CUDA-graph replays against eager, compile, opcheck), then the host time per eager call
    NF4MOE_CONFIG=$PIN $py -m pytest -q -p no:cacheprovider \
      tests/test_triton_forward.py -k "gemv or combine or cuda_graph or torch_compile or opcheck or poisoned or deterministic" \
      2>&1 | tee "$OUT/gpu_gemv_combine.log"
    $py -m lab.host_cpu --tokens 1,16 2>&1 | grep T= | tee "$OUT/host_cpu.log"
    $py -m lab.profile_host --tokens 1,16 2>&1 | tee "$OUT/host_profile.log" ;;
  graph_combine)
    NF4MOE_CONFIG=$PIN $py -m pytest -q -p no:cacheprovider \
      tests/test_triton_forward.py -k "gemv or combine or cuda_graph or decode" 2>&1 | tee "$OUT/gpu_graph_combine.log" || true
    for s in qwen3 glm45air dsv3; do
      timeout 200 $py -m lab.profile_layer --shape $s --tokens 1,2 --variants gemv,gemv_unfused,gemv_nomemset --graph \
        --check 2>&1 | tee "$OUT/profile_graph_combine_$s.log" || true
    done ;;
  ncu_gemv)
    ncu --clock-control none --profile-from-start off --kernel-name regex:nf4_moe_gemv --launch-count 2 \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy \
      --section MemoryWorkloadAnalysis --print-details all $py -m lab.ncu_case --tokens 1 --calls 3 --profile-last 2>&1 \
      | tee "$OUT/ncu_gemv_t1.txt" ;;
  ncu_t128)
    NF4MOE_CONFIG=BLOCK_M=16,BLOCK_N=64,BLOCK_K=128,num_warps=4,num_stages=3 timeout 170 ncu --clock-control none \
      --kernel-name regex:nf4_moe_gemm_kernel --launch-skip 2 --launch-count 2 --section SpeedOfLight \
      --section WarpStateStats --section SchedulerStats --section Occupancy --section MemoryWorkloadAnalysis \
      --section LaunchStats --print-details all $py -m lab.ncu_case --tokens 128 2>&1 | tee "$OUT/ncu_gemm_t128.txt" || true ;;
  tiles)
    NF4MOE_CONFIG=$PIN timeout 240 $py -m pytest -q -p no:cacheprovider \
      tests/test_triton_forward.py tests/test_gpu_compile.py -k "gemv or combine or cuda_graph or decode or poisoned or compile" \
      2>&1 | tee "$OUT/gpu_gemv_tiles.log" || true
    timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_triton_forward.py -k "wgmma and not ws" 2>&1 | tee "$OUT/gpu_wgmma.log" || true
    NF4MOE_GEMV_TILES=1 timeout 200 $py -m lab.profile_layer --tokens 1,2 --variants gemv --check --timings --graph 2>&1 \
      | grep -v "bench nf4_moe_gemm" | tee "$OUT/profile_gemv_tiles_qwen3.log" || true ;;
  tunegraph)
    timeout 60 $py -m pytest -q -p no:cacheprovider tests/test_launch.py -k graph 2>&1 | tee "$OUT/gpu_graph_bench.log" || true
    for run in 1 2; do
      for flag in 0 1; do
        NF4MOE_TUNE_GRAPH=$flag timeout 120 $py -m lab.profile_layer --tokens 1 --variants gemv --timings --graph 2>&1 \
          | grep -v "Warn\|_warn" | tee "$OUT/profile_t1_tunegraph${flag}_run$run.log" || true
      done
    done ;;
  pending)
    timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_routing_device.py tests/test_launch.py \
      tests/test_triton_forward.py -k "check_ids or graph_bench or negative or xa_in_routing or routing_xa" 2>&1 \
      | tail -30 | tee "$OUT/gpu_pending.log" || true
    for v in "0 0" "1 0" "0 1" "1 1"; do
      set -- $v
      NF4MOE_TUNE_GRAPH=$1 NF4MOE_XA_IN_ROUTING=$2 timeout 100 $py -m lab.profile_layer --tokens 1 --variants gemv \
        --timings --graph 2>&1 | grep -v "Warn\|_warn" | tee "$OUT/profile_t1_tune$1_xa$2.log" || true
    done ;;
  v40)
    timeout 100 $py -m pytest -q -p no:cacheprovider tests/test_triton_forward.py -k "gemv_configs_match or xa_in_routing" \
      2>&1 | tail -5 | tee "$OUT/gpu_v40.log" || true
    for run in 1 2; do
      timeout 90 $py -m lab.profile_layer --tokens 1 --variants gemv --timings --graph 2>&1 | grep -v "Warn\|_warn" \
        | tee "$OUT/profile_t1_v40_run$run.log" || true
    done
    timeout 150 $py -m lab.profile_layer --tokens 16,128 --variants gemm --check --timings --graph 2>&1 \
      | grep -v "Warn\|_warn\|bench nf4_moe_gemv" | tee "$OUT/profile_t16_t128_v40.log" || true
    mkdir -p "$OUT/qwen3"
    timeout 240 $py -m nf4moe bench --mode fwd --shapes qwen3 --out "$OUT/qwen3" 2>&1 | tee "$OUT/qwen3_fwd.log" || true
    # the GEMV / GEMM crossover (NF4MOE_GEMV_ROWS = 16 routed rows by default): T = 4, 16 on each
    timeout 150 $py -m lab.profile_layer --tokens 4,16 --variants gemv,gemm --graph 2>&1 | grep -v "Warn\|_warn" \
      | tee "$OUT/profile_crossover_v40.log" || true ;;
  crossover)  # the GEMV / GEMM crossover at 32 and 64 routed rows (T = 4, 8), Qwen3 and GLM-4.5-Air (~5 min)
    timeout 150 $py -m lab.profile_layer --tokens 4,8 --variants gemv,gemm --graph 2>&1 | grep -v "Warn\|_warn" \
      | tee "$OUT/profile_crossover_qwen3.log" || true
    timeout 200 $py -m lab.profile_layer --shape glm45air --tokens 4,8 --variants gemv,gemm --graph 2>&1 \
      | grep -v "Warn\|_warn" | tee "$OUT/profile_crossover_glm.log" || true ;;
  v42)
    timeout 130 $py -m pytest -q -p no:cacheprovider tests/test_triton_forward.py tests/test_gpu_compile.py \
      -k "wgmma_gemm_opt_in or wgmma_gemm_decodes" 2>&1 | tail -8 | tee "$OUT/gpu_v42.log" || true
    timeout 120 $py -m lab.profile_layer --tokens 1024,8192 --variants wgmma_imm,wgmma,wgmma_imm,wgmma --check 2>&1 \
      | grep -v "Warn\|_warn" | tee "$OUT/profile_lut_regs_qwen3.log" || true
    timeout 110 $py -m lab.profile_layer --shape dsv3 --tokens 8192 --variants wgmma_imm,wgmma --check 2>&1 \
      | grep -v "Warn\|_warn" | tee "$OUT/profile_lut_regs_dsv3.log" || true
    timeout 220 $py -m lab.profile_layer --shape glm45air --tokens 4,8 --variants gemv,gemm --graph 2>&1 \
      | grep -v "Warn\|_warn" | tee "$OUT/profile_crossover_glm.log" || true ;;
  v44)
    mkdir -p "$OUT/qwen3"
    timeout 250 $py -m nf4moe bench --mode fwd --shapes qwen3 --tokens 1,16,128,1024,8192,16384 --out "$OUT/qwen3" 2>&1 \
      | grep -v "Warn\|_warn" | tee "$OUT/h200_qwen3.log" || true
    timeout 230 $py -m lab.profile_layer --shape dsv3 --tokens 4,8 --variants gemv,gemm --graph 2>&1 \
      | grep -v "Warn\|_warn" | tee "$OUT/profile_crossover_dsv3.log" || true ;;
  v44b)
    NF4MOE_CONFIG=BLOCK_M=16,BLOCK_N=64,BLOCK_K=128,num_warps=4,num_stages=3 timeout 110 $py -m pytest -q \
      -p no:cacheprovider tests/test_triton_forward.py tests/test_triton_backward.py \
      -k "(gemm or operand) and not gemv and not wgmma" 2>&1 | tail -8 | tee "$OUT/gpu_v44b.log" || true
    for a in 1 0 1; do
      echo "NF4MOE_ROW_ALIGN=$a" | tee -a "$OUT/profile_row_align_qwen3.log"
      NF4MOE_ROW_ALIGN=$a timeout 100 $py -m lab.profile_layer --tokens 128,1024 --variants gemm --check --graph 2>&1 \
        | grep -v "Warn\|_warn" | tee -a "$OUT/profile_row_align_qwen3.log" || true
    done ;;
  v44c)
    for a in 1 0; do
      mkdir -p "$OUT/fwdbwd_align$a"
      NF4MOE_ROW_ALIGN=$a timeout 210 $py -m nf4moe bench --mode fwdbwd --shapes qwen3 --tokens 8192 \
        --out "$OUT/fwdbwd_align$a" 2>&1 | grep -v "Warn\|_warn" | tee "$OUT/qwen3_fwdbwd_align$a.log" || true
    done ;;
  v44d)
    for a in 1 0; do
      echo "NF4MOE_ROW_ALIGN=$a" | tee -a "$OUT/profile_row_align_dsv3.log"
      NF4MOE_ROW_ALIGN=$a timeout 125 $py -m lab.profile_layer --shape dsv3 --tokens 128 --variants gemm --check --graph \
        2>&1 | grep -v "Warn\|_warn" | tee -a "$OUT/profile_row_align_dsv3.log" || true
    done ;;
  v45)
    timeout 100 $py -m pytest -q -p no:cacheprovider tests/test_triton_forward.py tests/test_gpu_compile.py \
      -k "xa_early or xa_in_routing" 2>&1 | tail -6 | tee "$OUT/gpu_v45.log" || true
    timeout 130 $py -m lab.profile_layer --tokens 1,8 --variants gemv_noxae,gemv_xae,gemv_noxae,gemv_xae --check --graph 2>&1 \
      | grep -v "Warn\|_warn" | tee "$OUT/profile_xa_early_qwen3.log" || true
    for shape in glm45air dsv3; do
      timeout 100 $py -m lab.profile_layer --shape $shape --tokens 1 --variants gemv_noxae,gemv_xae,gemv_noxae,gemv_xae --check \
        --graph 2>&1 | grep -v "Warn\|_warn" | tee "$OUT/profile_xa_early_$shape.log" || true
    done ;;
  v46)
    timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_triton_forward.py tests/test_gpu_compile.py \
      tests/test_launch.py -k "pdl or xa_early or xa_in_routing or env_flags" 2>&1 | tail -8 | tee "$OUT/gpu_v46.log" || true
    timeout 140 $py -m lab.profile_layer --tokens 1,8 --variants gemv_nopdl_noxae,gemv_pdl_noxae,gemv_nopdl_xae,gemv_pdl_xae,gemv_nopdl_noxae,gemv_pdl_noxae \
      --check --graph 2>&1 | grep -v "Warn\|_warn" | tee "$OUT/profile_pdl_qwen3_t1.log" || true
    timeout 100 $py -m lab.profile_layer --tokens 16,128 --variants gemm_nopdl,gemm_pdl,gemm_nopdl,gemm_pdl --check --graph 2>&1 \
      | grep -v "Warn\|_warn" | tee "$OUT/profile_pdl_qwen3_t128.log" || true
    # WIDE=0 leaves out the other two shapes (their T=1 rows then come from the forward tables).
    [ "${WIDE:-1}" = 0 ] || for shape in glm45air dsv3; do
      timeout 90 $py -m lab.profile_layer --shape $shape --tokens 1 --variants gemv_nopdl_noxae,gemv_pdl_noxae,gemv_pdl_xae,gemv \
        --check --graph 2>&1 | grep -v "Warn\|_warn" | tee "$OUT/profile_pdl_$shape.log" || true
    done ;;
  auto)
    timeout 300 $py -m pytest -q -p no:cacheprovider tests/test_triton_forward.py tests/test_gpu_compile.py \
      tests/test_launch.py -k "pdl or xa_early or captures or graph_flags" 2>&1 | tail -8 | tee "$OUT/gpu_auto.log" || true
    timeout 100 $py -m lab.profile_layer --tokens 1 --variants gemv_nopdl_noxae,gemv,gemv_nopdl_noxae,gemv \
      --check --graph 2>&1 | grep -v "Warn\|_warn" | tee "$OUT/profile_auto_qwen3.log" || true
    timeout 100 $py -m lab.profile_layer --tokens 16,128 --variants gemm_nopdl,gemm,gemm_nopdl,gemm \
      --check --graph 2>&1 | grep -v "Warn\|_warn" | tee -a "$OUT/profile_auto_qwen3.log" || true ;;
  s20)
    mkdir -p "$OUT/qwen3"
    timeout 200 $py -m nf4moe bench --mode fwd --shapes qwen3 --tokens 1,16,128,1024,8192,16384 --out "$OUT/qwen3" 2>&1 \
      | tee -a "$OUT/qwen3.log" || true
    timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_triton_forward.py tests/test_launch.py \
      -k "captures or xa_early or layer_call" 2>&1 | tail -8 | tee "$OUT/gpu_auto.log" || true
    timeout 110 $py -m lab.profile_layer --tokens 16,128 --variants gemm,xaloop,gemm,xaloop --check --graph 2>&1 \
      | grep -v "Warn\|_warn" | tee "$OUT/profile_xaloop_qwen3.log" || true
    timeout 50 $py -m lab.profile_host --tokens 16,128 --top 45 2>&1 | tee "$OUT/host_qwen3.log" || true ;;
  s20b)
    mkdir -p "$OUT/glm"
    timeout 280 $py -m nf4moe bench --mode fwd --shapes glm45air --tokens 1,16,128,1024,8192,16384 --out "$OUT/glm" 2>&1 \
      | tee -a "$OUT/glm.log" || true
    NF4MOE_XA_PRE=0 timeout 40 $py -m lab.profile_host --tokens 16,128 --top 0 2>&1 | tee "$OUT/host_xaloop_qwen3.log" || true ;;
  s21)
    timeout 120 $py -m pytest -q -p no:cacheprovider tests/test_triton_forward.py tests/test_launch.py \
      -k "captures or xa_early or layer_call" 2>&1 | tail -30 | tee "$OUT/gpu_auto.log" || true
    timeout 220 $py -m lab.profile_layer --tokens 1024,2048 --variants gemm,wgmma,gemm,wgmma --check 2>&1 \
      | grep -v "Warn\|_warn" | tee "$OUT/profile_crossover_qwen3.log" || true
    timeout 150 $py -m lab.profile_layer --shape glm45air --tokens 1024 --variants gemm,wgmma,gemm,wgmma --check 2>&1 \
      | grep -v "Warn\|_warn" | tee "$OUT/profile_crossover_glm.log" || true ;;
  s21tests)
    # the forward GPU suite with today's defaults, one pinned GEMM config (the GEMV then runs one config too); every
    # test's outcome in $OUT even if the time limit cuts the run
    NF4MOE_CONFIG=$PIN timeout ${LIMIT:-480} $py -m pytest -v -rfE \
      -p no:cacheprovider tests/test_triton_forward.py tests/test_routing_device.py tests/test_launch.py \
      tests/test_gpu_compile.py tests/test_lut_decode.py tests/test_mma_k_order.py > "$OUT/gpu_s21tests.log" 2>&1 || true
    grep -cE " PASSED" "$OUT/gpu_s21tests.log" || true
    grep -E " FAILED| ERROR|^FAILED|^ERROR|passed|failed" "$OUT/gpu_s21tests.log" | tail -40 ;;
  s22)
    # session 21's leftovers: the torch.compile tests on the GPU after the traced counters' fix (one failed there),
    # then the rest of the forward GPU suite past where s21tests' time ran out, then the backward suite
    pinned_tests 150 gpu_s22_compile.log tests/ -k "torch_compile or opcheck or fullgraph"
    # (test_gpu_compile.py compiles for sm_90 on the CPU: CI runs it)
    pinned_tests 200 gpu_s22_rest.log tests/test_routing_device.py tests/test_launch.py tests/test_lut_decode.py \
      tests/test_mma_k_order.py
    pinned_tests 220 gpu_s22_bwd.log tests/test_triton_backward.py tests/test_module.py ;;
  s22b)
    # after s22: the compiled layer's backward failed (torch 2.11's mutation analysis could not lower the GEMMs:
    # tl.multiple_of on a scalar it makes a constant); with row_bytes fixed, the compile / opcheck tests again,
    # then the whole backward file
    pinned_tests 120 gpu_s22b_compile.log tests/test_routing_device.py tests/test_triton_forward.py \
      -k "torch_compile or opcheck or fullgraph"
    grep -c "Encountered an exception in identify" "$OUT/gpu_s22b_compile.log" || true
    pinned_tests 420 gpu_s22b_bwd.log tests/test_triton_backward.py ;;
  s22c)
    # the module tests on the GPU (s22 reached 38% of the backward part), then the Qwen3 forward rows after
    # the row_bytes change (same GEMM bytes expected: the 16-byte copies are kept, test_gpu_compile)
    pinned_tests 420 gpu_s22c_module.log tests/test_module.py
    mkdir -p "$OUT/qwen3"
    timeout 150 $py -m nf4moe bench --mode fwd --shapes qwen3 --tokens 1,128,1024 --out "$OUT/qwen3" 2>&1 \
      | tee "$OUT/qwen3_fwd.log" || true ;;
  largeprof)
    $py -m lab.profile_layer --tokens 8192 --variants gemm --timings 2>&1 | tee "$OUT/profile_large_qwen3.log"
    $py -m lab.profile_layer --shape dsv3 --tokens 8192 --variants gemm --timings 2>&1 | tee "$OUT/profile_large_dsv3.log" ;;
  s27)
    pinned_tests 200 gpu_s27_bwd.log tests/test_wgmma_backward.py tests/test_triton_backward.py tests/test_plan.py
    pinned_tests 120 gpu_s27_quantizer.log tests/test_adapters_edges.py tests/test_hf_quantizer.py -k "gpu or bit_exact"
    timeout 240 $py lab/bwd_probe.py --shapes qwen3,glm45air --tokens 1024,2048,8192 --profile --out "$OUT" 2>&1 \
      | tee "$OUT/bwd_probe.log" || true ;;
  *)
    sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2 ;;
esac
