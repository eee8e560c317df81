#!/usr/bin/env bash
# Everything a short GPU loan should run, in one command that stays under ten minutes:
#   OUT=/some/dir bash benchmarks/gpu_check.sh
# 1. the kernel, dtype and statistics tests natively on CUDA (they run through Triton's
#    interpreter on CPU machines, where bf16 subnormals and real atomics cannot be checked);
# 2. bench_gpu.py over every model, starting no new row after --budget-s (its JSON is rewritten
#    after each row, so a cut-short run keeps what it measured);
# 3. the A/B rows: the separate statistics pass instead of the fused ReLU, and the pure-torch pass.
# Results go under $OUT (default gpu-check/): gpu.txt, tests.log, bench_*.json and bench_*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
export PYTHONPATH=src

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$out/gpu.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a hard time limit, say how it ended
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - t0)) s" | tee -a "$out/steps.txt"
}

step tests 150 python3 -m pytest -q -p no:cacheprovider tests/core/test_kernels.py tests/core/test_stats.py \
  tests/core/test_dtypes.py tests/test_bench_gpu.py
step bench_gpu 330 python3 benchmarks/bench_gpu.py --budget-s 240 --json "$out/bench_gpu.json"
step bench_unfused 50 python3 benchmarks/bench_gpu.py --models MLP ResNet --no-compile --no-fused-relu \
  --repeats 3 --json "$out/bench_unfused.json"
DEADRELU_NO_TRITON=1 step bench_torch_pass 50 python3 benchmarks/bench_gpu.py --models MLP ResNet --no-compile \
  --repeats 3 --json "$out/bench_torch_pass.json"
tail -n 20 "$out/tests.log" "$out/bench_gpu.log"
