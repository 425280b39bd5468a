#!/usr/bin/env bash
# One prepared check on a machine with an NVIDIA GPU, in a fixed time budget (default 300 s,
# build included), steps in priority order; a step that does not fit in what is left is
# skipped and says so:
#   1. build distillkit._C for this GPU against the torch found here
#      (TORCH_CUDA_ARCH_LIST from nvidia-smi's compute capability, MAX_JOBS = nproc,
#      setup.py build_ext --inplace: no network, no pip), then the import test with
#      DISTILLKIT_EXPECT_CUDA=1 (every op has a CUDA kernel registered);
#   2. benchmarks/gpu_sync_check.py: every op fwd+bwd under set_sync_debug_mode("error");
#   3. liger-kernel: used if importable, else `pip install --no-deps liger-kernel` is tried
#      (skipped with a note when it cannot be installed, e.g. no network);
#   4. bench_kd_loss.py --gpu (16384 x 131072 bf16: distillkit, eager, compile, liger);
#   5. benchmarks/gpu_floors.py (the bytes floor and the fused-linear GEMMs);
#   6. bench_fused_linear.py --gpu (C = 128256 bf16);
#   7. the CUDA tests: `-m cuda`, every test skipped without a GPU (tests/conftest.py gives
#      the cuda marker to each test whose skip reason is its NEEDS_CUDA);
#   8. bench_sparse_kd, bench_slam_loss, bench_distance, bench_coordinate_lstm with --gpu.
# Results: the benches and checks write benchmarks/results/*<GPU name>*; this script writes
# benchmarks/results/gpu_check_<GPU name>.md (step, status, seconds, log tail of failures).
# When $OUT is set (the device runner's output folder) results and logs are copied there.
#
# usage: benchmarks/gpu_check.sh [--dry-run] [--budget SECONDS]
#   --dry-run   no GPU needed: prints the plan, runs the CPU-side parts (the sync check and
#               floors in dry-run mode, the CUDA test selection collected) and builds nothing
# env: PYTHON (default: .venv/bin/python if present, else python3), CUDA_HOME (default /usr/local/cuda), GPU_CHECK_BUDGET
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET:-300}
DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
START=$SECONDS
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

if [ "$DRY" = 1 ]; then
  GPU_NAME="dry run"; CAP="9.0"; DRIVER="-"
else
  if ! command -v nvidia-smi >/dev/null; then echo "gpu_check: no nvidia-smi" >&2; exit 2; fi
  GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0)
  CAP=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader -i 0)
  DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader -i 0)
fi
SLUG=$(printf '%s' "$GPU_NAME" | tr -cs 'A-Za-z0-9' '_' | sed 's/^_*//; s/_*$//')
LOGS=${OUT:-/tmp}/gpu_check_logs
mkdir -p "$LOGS" benchmarks/results
SUMMARY=benchmarks/results/gpu_check_${SLUG}.md
[ "$DRY" = 1 ] && SUMMARY=$LOGS/gpu_check_dry_run.md
ROWS=()
FAILED=0
LAST=ok
SKIP=""

# run STEP MAX_SECONDS CMD...: runs CMD with at most min(MAX_SECONDS, budget left) seconds.
run() {
  local step=$1 max=$2; shift 2
  local left=$((BUDGET - (SECONDS - START)))
  local t=$((max < left ? max : left))
  if [ -n "$SKIP" ]; then
    ROWS+=("| $step | skipped: $SKIP | 0 |")
    LAST=skipped
    return 0
  fi
  if [ "$t" -lt 10 ]; then
    ROWS+=("| $step | skipped: out of time budget | 0 |")
    echo "gpu_check: $step skipped (${left} s left)"
    LAST=skipped
    return 0
  fi
  echo "gpu_check: $step (up to ${t} s): $*"
  local t0=$SECONDS rc=0
  timeout --kill-after=10 "$t" "$@" >"$LOGS/$step.log" 2>&1 || rc=$?
  local dt=$((SECONDS - t0)) status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="timed out after ${t} s"; FAILED=1
  elif [ "$rc" != 0 ]; then status="FAILED (rc $rc)"; FAILED=1; fi
  ROWS+=("| $step | $status | $dt |")
  LAST=$status
  echo "gpu_check: $step: $status (${dt} s)"
  if [ "$status" != ok ]; then
    ROWS+=("| | \`$(tail -n 3 "$LOGS/$step.log" | tr '\n|' ' /' | cut -c1-300)\` | |")
  fi
  return 0
}

if ! env_line=$("$PY" -c "import torch; print(f'torch {torch.__version__}, torch CUDA {torch.version.cuda}')"); then
  echo "gpu_check: $PY cannot import torch (set PYTHON to the interpreter that has it)" >&2
  exit 2
fi
if [ "$DRY" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(torch.version.cuda is None or not torch.cuda.is_available())"; then
  echo "gpu_check: $env_line cannot run on the GPU (a CPU-only torch, or no GPU visible)" >&2
  exit 2
fi
nvcc_line=$("$CUDA_HOME/bin/nvcc" --version 2>/dev/null | tail -n 1)
echo "gpu_check: $GPU_NAME (sm ${CAP}, driver $DRIVER), $env_line, nvcc ${nvcc_line:-missing}, budget ${BUDGET} s"

BENCH=(--gpu --repeats 5 --budget 2)
if [ "$DRY" = 1 ]; then
  run sync_check 120 "$PY" benchmarks/gpu_sync_check.py --dry-run
  run floors 60 "$PY" benchmarks/gpu_floors.py --dry-run --repeats 3
  run cuda_tests_collect 120 "$PY" -m pytest -q -p no:cacheprovider --collect-only \
    --continue-on-collection-errors -m cuda tests
  for b in kd_loss fused_linear sparse_kd slam_loss distance coordinate_lstm; do
    echo "gpu_check: plan: $PY benchmarks/bench_$b.py ${BENCH[*]}"
  done
else
  # Without ninja, torch's BuildExtension compiles one file at a time.
  command -v ninja >/dev/null || "$PY" -c "import ninja" 2>/dev/null ||
    ROWS+=("| ninja | missing: the build runs serially | 0 |")
  run build 150 env MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="$CAP" \
    "$PY" setup.py build_ext --inplace
  if [ "$LAST" != ok ]; then SKIP="the build failed"; fi
  run import 60 env DISTILLKIT_EXPECT_CUDA=1 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_import.py::test_every_op_has_its_kernels
  run sync_check 45 "$PY" benchmarks/gpu_sync_check.py
  if "$PY" -c "import liger_kernel" 2>/dev/null; then
    ROWS+=("| liger-kernel | already installed | 0 |")
  else
    run liger_install 30 "$PY" -m pip install -q --no-deps liger-kernel
  fi
  run bench_kd_loss 90 "$PY" benchmarks/bench_kd_loss.py "${BENCH[@]}"
  run floors 30 "$PY" benchmarks/gpu_floors.py
  run bench_fused_linear 60 "$PY" benchmarks/bench_fused_linear.py "${BENCH[@]}"
  run cuda_tests 90 "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors \
    -m cuda tests
  run bench_sparse_kd 45 "$PY" benchmarks/bench_sparse_kd.py "${BENCH[@]}"
  run bench_slam_loss 30 "$PY" benchmarks/bench_slam_loss.py "${BENCH[@]}"
  run bench_distance 45 "$PY" benchmarks/bench_distance.py "${BENCH[@]}"
  run bench_coordinate_lstm 45 "$PY" benchmarks/bench_coordinate_lstm.py "${BENCH[@]}"
fi

{
  echo "# GPU check: $GPU_NAME"
  echo
  echo "\`benchmarks/gpu_check.sh$([ "$DRY" = 1 ] && echo ' --dry-run')\`, $(date -u +%Y-%m-%dT%H:%M:%SZ), git $(git describe --always --dirty --abbrev=12 2>/dev/null || echo unknown)"
  echo
  echo "- device: $GPU_NAME, compute capability $CAP, driver $DRIVER"
  echo "- $env_line; nvcc: ${nvcc_line:-missing}; TORCH_CUDA_ARCH_LIST=$CAP, MAX_JOBS=$(nproc)"
  echo "- budget ${BUDGET} s, used $((SECONDS - START)) s"
  echo
  echo "| step | status | seconds |"
  echo "|---|---|--:|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "Per-bench results: benchmarks/results/*_cuda_${SLUG}.md and cuda_${SLUG}.csv; sync check:"
  echo "gpu_sync_${SLUG}.md; floors: gpu_floors_${SLUG}.md."
} >"$SUMMARY"
cat "$SUMMARY"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT/results"
  cp benchmarks/results/*"${SLUG}"* "$OUT/results/" 2>/dev/null || true
fi
exit "$FAILED"
