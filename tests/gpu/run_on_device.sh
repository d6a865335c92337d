#!/usr/bin/env bash
# One pass of every GPU check, for a lent CUDA machine with no network (run from the repository
# root). Wheels the machine lacks (seqapps itself, fla-core, mambapy) are expected in .whl/, built
# beforehand with `pip wheel --no-deps . -w .whl` and `pip download --no-deps fla-core mambapy -d .whl`.
# Every step has its own time limit and goes on after a failure; logs go to $OUT (or ./gpu-out).
# ONLY=name[,name] runs just those steps. Compiled kernels and autotune timings go to .triton-cache/
# (git-ignored, so a second call on the same warm machine keeps them): fla's first calls autotune for
# minutes, and a rerun with ONLY=gla_vs_fla picks up where the first left off.
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 TRITON_CACHE_AUTOTUNING=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
ONLY=${ONLY:-}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
fi
# `python3 -P`: the checkout's seqapps/ folder (the shell package alone) must not shadow the install
PY="python3 -P"

step() {  # step NAME SECONDS COMMAND...: run, log to $OUT/NAME.log, record the exit status
  local name=$1 limit=$2; shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return 0; fi
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: exit $rc in $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/summary.txt"
$PY -c "import torch, triton, fla, seqapps.kernels; print('torch', torch.__version__, 'triton', triton.__version__,
'fla', getattr(fla, '__version__', '?'), torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/summary.txt"

step triton_tests 90 $PY -m pytest tests/kernels/test_triton_gla.py tests/kernels/test_triton_delta_rule.py \
  tests/kernels/test_triton_selective_scan.py -q -x -n 8
step selective_scan_check 45 $PY tests/gpu/gpu_check_selective_scan.py
PARTS=check,ours step gla_check 120 $PY tests/gpu/gpu_check_gla.py
step delta_rule_check 40 $PY tests/gpu/gpu_check_delta_rule.py
step bench ${BENCH_LIMIT:-120} $PY -c "
import json, os
from seqapps.bench import markdown, run_bench
result = run_bench(ops=('gla', 'gla_scalar', 'delta_rule', 'selective_scan', 'sdpa', 'mamba_block'),
                   backends=('triton', 'chunk'), lengths=(4096, 16384), batch=4, heads=8, dim=128,
                   dtype='bfloat16', warmup=2, repeats=10, fla=False)
json.dump(result, open(os.path.join('$OUT', 'bench.json'), 'w'), indent=1)
print(markdown(result))"
# last, with the time left: fla autotunes its backward for minutes on first use (not done in 170 s on an H100)
PARTS=fla step gla_vs_fla ${FLA_LIMIT:-300} $PY tests/gpu/gpu_check_gla.py
cat "$OUT/summary.txt"
