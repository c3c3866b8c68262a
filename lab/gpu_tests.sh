#!/usr/bin/env bash
# The GPU test run of a device session: `bash lab/gpu_tests.sh LIMIT_S FILE...` on the device machine (repo root,
# .whl carried: bitsandbytes and peft wheels).  One GEMM config pinned (NF4MOE_CONFIG) so the run compiles instead
# of autotuning every shape; each test's outcome in $OUT/gpu_tests.log (kept when LIMIT_S cuts the run).
set -uo pipefail
limit=$1
shift
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
NF4MOE_CONFIG=BLOCK_M=16,BLOCK_N=32,BLOCK_K=64,num_warps=4,num_stages=3 \
  timeout "$limit" python3 -m pytest -v -rfE -p no:cacheprovider "$@" > "$OUT/gpu_tests.log" 2>&1
rc=$?
grep -E "^FAILED|^ERROR|passed|failed" "$OUT/gpu_tests.log" | grep -v "^tests/.* PASSED" | tail -25
echo "pytest exit: $rc"
exit $rc
