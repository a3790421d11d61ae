#!/usr/bin/env bash
# The one command for the day a GPU is lent (about 8 minutes on an H200 once set up):
#
#   bash scripts/gpu_check.sh            # results in $OUT if set, else gpu_check_results/
#
# 1. set-up: reuses .venv when its torch sees CUDA, else `TORCH_SPEC=torch bash scripts/setup.sh` (a CUDA torch);
# 2. environment: nvidia-smi, torch / triton / CUDA versions, sirl_kernels.available_backends();
# 3. tests/gpu (Triton parity at realistic shapes, sync-free path, CUDA-graph capture);
# 4. the CUDA backend tests (tests/sirl_kernels/backends/test_cuda.py);
# 5. the whole kernel parity suite on CUDA (tests/sirl_kernels; the CPU-only AOT compile test left out);
# 6. a short benchmarks/bench_gpu.py (Triton and CUDA backends vs eager, torch.compile, Liger / CCE when installed);
# 7. compute-sanitizer memcheck of a small Triton forward+backward, when compute-sanitizer is on PATH or in
#    /usr/local/cuda/bin.
# Every step runs under a time limit, its log and exit code are kept, a failing step does not stop the next;
# summary.md / summary.json list them all and the script exits non-zero if any step failed.
# Time: each step has its own limit, and all steps after set-up share a budget (GPU_CHECK_BUDGET, default 450 s):
# a step gets at most what is left of it, and is skipped when less than 15 s are left.
# Env: OUT, TORCH_SPEC (default torch), GPU_CHECK_BENCH_ARGS (default: N=4096, D=4096, V=151936, 5 reps),
#      GPU_CHECK_BUDGET, GPU_CHECK_SKIP_SETUP=1 (use the environment as it is), TRITON_CACHE_DIR.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${OUT:-$ROOT/gpu_check_results}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
BUDGET=${GPU_CHECK_BUDGET:-450}
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:---n 4096 --d 4096 --vocab 151936 --reps 5}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/sirl-gpu-check-triton-cache}  # not in OUT: not a result
export PYTHONUNBUFFERED=1
STEPS=()
START_ALL=$(date +%s)

BUDGET_END=0  # set after set-up
# run_step NAME TIMEOUT CMD...: runs CMD with its output in NAME.log, records its exit code and time.
run_step() {
  local name=$1 limit=$2
  shift 2
  local log="$OUT_DIR/$name.log" start rc
  if [ "$BUDGET_END" -gt 0 ]; then
    local left=$(( BUDGET_END - $(date +%s) ))
    if [ "$left" -lt 15 ]; then
      echo "=== $name: skipped, the ${BUDGET}s budget is spent"
      STEPS+=("$name|skipped (budget)|0|-")
      return
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  echo "=== $name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1
  rc=$?
  local secs=$(( $(date +%s) - start ))
  [ "$rc" = 124 ] && echo "(timed out after ${limit}s)" >>"$log"
  echo "    rc=$rc, ${secs}s, log $log"
  tail -n 3 "$log" | sed 's/^/    | /'
  STEPS+=("$name|$rc|$secs|$log")
}

# --- 1. set-up ------------------------------------------------------------------------------------------------
if [ "${GPU_CHECK_SKIP_SETUP:-0}" = 1 ]; then
  echo "=== setup: skipped (GPU_CHECK_SKIP_SETUP=1)"
  STEPS+=("setup|skipped|0|GPU_CHECK_SKIP_SETUP=1")
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" \
    2>/dev/null; then
  echo "=== setup: reusing .venv (its torch sees CUDA)"
  STEPS+=("setup|0|0|(reused .venv)")
else
  run_step setup 900 env TORCH_SPEC="${TORCH_SPEC:-torch}" bash scripts/setup.sh
fi
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || PY=$(command -v python3)
BUDGET_END=$(( $(date +%s) + BUDGET ))

# --- 2. environment -------------------------------------------------------------------------------------------
run_step environment 60 bash -c "nvidia-smi; \"$PY\" - <<'EOF'
import torch, sirl_kernels
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton; print('triton', triton.__version__)
except Exception as exc:
    print('triton unavailable:', exc)
for status in sirl_kernels.available_backends().values():
    print(status)
EOF"

# --- 3-5. tests -----------------------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -ra -p no:cacheprovider)
run_step tests_gpu 150 "${PYTEST[@]}" tests/gpu --junitxml="$OUT_DIR/tests_gpu.xml"
run_step tests_cuda_backend 90 "${PYTEST[@]}" tests/sirl_kernels/backends/test_cuda.py \
  --junitxml="$OUT_DIR/tests_cuda_backend.xml"
run_step tests_kernel_parity 150 "${PYTEST[@]}" tests/sirl_kernels \
  --ignore=tests/sirl_kernels/backends/test_triton_compile.py --junitxml="$OUT_DIR/tests_kernel_parity.xml"

# --- 6. benchmark ---------------------------------------------------------------------------------------------
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
run_step bench_gpu 180 "$PY" benchmarks/bench_gpu.py $BENCH_ARGS --out "$OUT_DIR/bench_gpu.json" \
  --md "$OUT_DIR/bench_gpu.md"

# --- 7. compute-sanitizer ---------------------------------------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || true)
[ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
if [ -n "$SANITIZER" ]; then
  cat >"$OUT_DIR/sanitizer_case.py" <<'EOF'
"""A small forward+backward of every Triton kernel family (split and unsplit, bf16, fused linear with bias and
several chunks, in place), for compute-sanitizer."""
import torch
import sirl_kernels
from sirl_kernels.backends.triton import utils

torch.manual_seed(0)
for splits in (None, 3):
    with utils.force_num_splits(splits):
        x = (torch.randn(7, 3001, device="cuda") * 3).bfloat16().requires_grad_(True)
        y = torch.randint(0, 3001, (7,), device="cuda"); y[2] = -100
        lp, h = sirl_kernels.token_logprobs_entropy(x * 1, y, backend="triton", inplace_backward=True)
        (lp.sum() + h.sum()).backward()
        hid = torch.randn(37, 64, device="cuda").bfloat16().requires_grad_(True)
        w = (torch.randn(999, 64, device="cuda") / 8).bfloat16().requires_grad_(True)
        b = torch.randn(999, device="cuda").bfloat16().requires_grad_(True)
        y = torch.randint(0, 999, (37,), device="cuda"); y[5] = -100
        lp, h = sirl_kernels.linear_token_logprobs_entropy(hid, w, y, bias=b, backend="triton", chunk_size=16)
        (lp.sum() + h.sum()).backward()
torch.cuda.synchronize()
print("ok")
EOF
  run_step compute_sanitizer 120 "$SANITIZER" --tool memcheck --error-exitcode 1 \
    "$PY" "$OUT_DIR/sanitizer_case.py"
else
  echo "=== compute_sanitizer: not found, skipped"
  STEPS+=("compute_sanitizer|skipped|0|compute-sanitizer not on PATH nor in /usr/local/cuda/bin")
fi

# --- summary ----------------------------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - START_ALL ))
FAILED=0
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  echo
  echo "| step | exit code | seconds | log |"
  echo "| --- | --- | ---: | --- |"
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name rc secs log <<<"$s"
    echo "| $name | $rc | $secs | ${log#"$OUT_DIR"/} |"
  done
  echo
  echo "Total: ${TOTAL}s."
  [ -f "$OUT_DIR/bench_gpu.md" ] && { echo; echo "## bench_gpu"; echo; cat "$OUT_DIR/bench_gpu.md"; }
} >"$OUT_DIR/summary.md"
{
  echo "{\"total_s\": $TOTAL, \"steps\": ["
  sep=""
  for s in "${STEPS[@]}"; do
    IFS='|' read -r name rc secs log <<<"$s"
    printf '%s{"step": "%s", "rc": "%s", "seconds": %s, "log": "%s"}' "$sep" "$name" "$rc" "$secs" "${log#"$OUT_DIR"/}"
    sep=$',\n'
  done
  echo "]}"
} >"$OUT_DIR/summary.json"
for s in "${STEPS[@]}"; do
  IFS='|' read -r _ rc _ _ <<<"$s"
  case $rc in 0 | skipped*) ;; *) FAILED=1 ;; esac
done
cat "$OUT_DIR/summary.md"
exit $FAILED
