#!/usr/bin/env bash
# The one command for the day a GPU is lent (at most 8 minutes on an H100 once set up: 7 for the steps after the
# gate, the rest for a set-up that has nothing to install and the gate):
#
#   bash scripts/gpu_check.sh            # results in $OUT if set, else gpu_check_results/
#
# 1. set-up: `bash scripts/setup.sh gpu` (the test set-up, with a CUDA build of torch (TORCH_SPEC, default torch)
#    in place of a CPU-only one, and libsirl_cuda required in the build), then the peers the speed gates compare
#    against, from PyPI: liger-kernel and cut-cross-entropy (PEERS_SPEC); fast when nothing changed. Then a GATE:
#    unless torch sees a CUDA device and the "cuda" and "triton" backends run on it, the script stops here, with
#    the reason, and fails (no test would run on the GPU, so no step may pass);
# 2. environment: nvidia-smi, torch / triton / CUDA versions, sirl_kernels.available_backends();
# 3. bench_gpu: the SPEED GATES (benchmarks/bench_gpu.py --gates). N in {256, 1024, 4096, 16384} at V = 151936 and
#    a V = 151665 view, logits input and fused linear (D = 4096), bf16, sirl (triton, cuda) against eager,
#    torch.compile, Liger and CCE, with the copy bandwidth and the cuBLAS bf16 matmul rate measured in the same run.
#    Fails when a logits forward is under 85% of the copy bandwidth, a logits forward+backward under 75%, a fused
#    linear under 65% of the matmul rate (N >= 1024), a sirl op is slower than torch.compile, Liger or CCE at the
#    same shape, or a peer could not be measured. Writes bench_gpu.md (measured next to the model's prediction,
#    tools/gpu_model.py, for the same op and shape: paste it beside README's "GPU status"), bench_gpu.json and a
#    torch.profiler per-kernel breakdown of each sirl op at N = 4096 (profile/);
# 4. tests/gpu (special values, fp16, temperature, V % 8 != 0, N·V > 2^31, the unsplit forward at N >= 16896, a
#    second device, tight bf16 fused-linear tolerances, the sync-free path, CUDA-graph capture, realistic shapes);
# 5. compute-sanitizer memcheck, racecheck, initcheck and synccheck of a small forward+backward of the Triton and
#    CUDA backends (split-V, misaligned rows, V % 8 != 0, in place, several backward chunks), when
#    compute-sanitizer is on PATH or in /usr/local/cuda/bin;
# 6. the CUDA backend tests (tests/sirl_kernels/backends/test_cuda.py);
# 7. the rest of the kernel parity suite on CUDA (tests/sirl_kernels without step 6's file and the CPU-only AOT
#    compile tests);
# 8. with GPU_CHECK_TRAINER=1 only (its own budget, GPU_CHECK_TRAINER_BUDGET, default 1200 s): the trainer
#    benchmarks on the GPU: HF generate against vLLM rollouts, and parallel=ddp against fsdp on 2+ GPUs.
# Every step after the gate runs under a time limit, its log and exit code are kept, a failing step does not stop
# the next; summary.md / summary.json list them all and the script exits non-zero if any step failed.
# Time: each step of 2-7 has its own limit (LIMIT_* below), and together they share a budget (GPU_CHECK_BUDGET,
# default 420 s, which the limits add up to: the script refuses to start when they exceed it). A step gets at most
# what is left of the budget and is skipped when less than 15 s are left; a step skipped for the budget, like one
# that timed out (exit code 124), is a FAILURE: a check that did not run did not pass. The limits were sized without
# a GPU (none has been lent yet) from the steps' work: bench_gpu's sweep with torch.compile, Liger and CCE compiling
# cold, tests/gpu compiling its own Triton specialisations into a cold cache (bench_gpu's shapes are warm by then),
# the sanitizers on a case of a few kernels, the parity suite's small shapes; the first run on a GPU says whether
# they hold (a step that needs more fails with rc 124 in summary.md, it never passes short).
# Env: OUT, TORCH_SPEC (default torch), PEERS_SPEC (default "liger-kernel cut-cross-entropy"),
#      GPU_CHECK_BENCH_ARGS (extra bench_gpu.py arguments, e.g. --allow-missing-peers or --n 4096),
#      GPU_CHECK_BUDGET, GPU_CHECK_SKIP_SETUP=1 (use the environment as it is), TRITON_CACHE_DIR.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT_DIR=${OUT:-$ROOT/gpu_check_results}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
BUDGET=${GPU_CHECK_BUDGET:-420}
# per-step limits of steps 2-7, in seconds; their sum must fit BUDGET
LIMIT_ENVIRONMENT=15
LIMIT_BENCH=160
LIMIT_TESTS_GPU=95   # with a cold Triton cache for the tests' own specialisations
LIMIT_SANITIZER=20   # each of memcheck, racecheck, initcheck, synccheck
LIMIT_CUDA_BACKEND=25
LIMIT_PARITY=45
LIMITS_SUM=$(( LIMIT_ENVIRONMENT + LIMIT_BENCH + LIMIT_TESTS_GPU + 4 * LIMIT_SANITIZER + LIMIT_CUDA_BACKEND + LIMIT_PARITY ))
if [ "$LIMITS_SUM" -gt "$BUDGET" ]; then
  echo "gpu_check: the step limits add up to ${LIMITS_SUM}s, over the ${BUDGET}s budget (GPU_CHECK_BUDGET): steps" \
    "would be skipped, which fails the check; raise the budget or lower a limit" >&2
  exit 2
fi
BENCH_ARGS=${GPU_CHECK_BENCH_ARGS:-}
PEERS_SPEC=${PEERS_SPEC:-liger-kernel cut-cross-entropy}
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
      echo "=== $name: SKIPPED, the budget is spent (counts as a failure)"
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
else
  run_step setup 900 env TORCH_SPEC="${TORCH_SPEC:-torch}" bash scripts/setup.sh gpu
fi
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || PY=$(command -v python3)
if [ "${GPU_CHECK_SKIP_SETUP:-0}" != 1 ]; then
  # shellcheck disable=SC2086  # PEERS_SPEC is a list of requirements
  run_step peers 300 "$PY" -m pip install -q $PEERS_SPEC
fi

# The gate: a CUDA device that torch sees, and the "cuda" and "triton" backends running on it. Without it every
# gpu / needs-CUDA test would skip and the summary would be green with nothing run on the GPU.
GATE_LOG="$OUT_DIR/gate.log"
if ! "$PY" - >"$GATE_LOG" 2>&1 <<'EOF'
import sys

import torch

problems = []
if not torch.cuda.is_available():
    problems.append(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
import sirl_kernels

backends = sirl_kernels.available_backends()
for name in ("cuda", "triton"):
    status = backends.get(name)
    if status is None or not status.available or "cuda" not in status.reason.removeprefix("runs on ").split(", "):
        problems.append(f"backend {name!r} does not run on CUDA: {status.reason if status else 'not listed'}")
for status in backends.values():
    print(status)
if problems:
    print("GATE FAILED: " + "; ".join(problems))
    sys.exit(1)
print("gate: torch sees", torch.cuda.get_device_name(), "and the cuda and triton backends run on it")
EOF
then
  cat "$GATE_LOG"
  STEPS+=("gate|1|0|$GATE_LOG")
  {
    echo "# gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname): STOPPED at the gate, no GPU test ran"
    echo
    for st in "${STEPS[@]}"; do echo "- $st"; done
    echo
    echo '```'
    cat "$GATE_LOG"
    echo '```'
  } >"$OUT_DIR/summary.md"
  echo "{\"total_s\": $(( $(date +%s) - START_ALL )), \"gate\": \"failed\", \"log\": \"gate.log\"}" \
    >"$OUT_DIR/summary.json"
  echo "gpu_check: STOPPED: the GPU is not usable here (see above and $GATE_LOG$([ -f "$OUT_DIR/setup.log" ] \
    && echo "; set-up: $OUT_DIR/setup.log"))" >&2
  exit 1
fi
tail -n 1 "$GATE_LOG"
STEPS+=("gate|0|0|$GATE_LOG")
BUDGET_END=$(( $(date +%s) + BUDGET ))

# --- 2. environment -------------------------------------------------------------------------------------------
run_step environment "$LIMIT_ENVIRONMENT" bash -c "nvidia-smi; \"$PY\" - <<'EOF'
import torch, sirl_kernels
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import triton; print('triton', triton.__version__)
except Exception as exc:
    print('triton unavailable:', exc)
for status in sirl_kernels.available_backends().values():
    print(status)
EOF"

# --- 3. speed gates -----------------------------------------------------------------------------------------------
# shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
run_step bench_gpu "$LIMIT_BENCH" "$PY" benchmarks/bench_gpu.py --gates --profile "$OUT_DIR/profile" $BENCH_ARGS \
  --out "$OUT_DIR/bench_gpu.json" --md "$OUT_DIR/bench_gpu.md"

# --- 4. GPU tests -------------------------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -ra -p no:cacheprovider)
run_step tests_gpu "$LIMIT_TESTS_GPU" "${PYTEST[@]}" tests/gpu --junitxml="$OUT_DIR/tests_gpu.xml"

# --- 5. compute-sanitizer ---------------------------------------------------------------------------------------
SANITIZER=$(command -v compute-sanitizer || true)
[ -z "$SANITIZER" ] && [ -x /usr/local/cuda/bin/compute-sanitizer ] && SANITIZER=/usr/local/cuda/bin/compute-sanitizer
if [ -n "$SANITIZER" ]; then
  cp "$ROOT/scripts/sanitizer_case.py" "$OUT_DIR/sanitizer_case.py"
  for tool in memcheck racecheck initcheck synccheck; do
    run_step "sanitizer_$tool" "$LIMIT_SANITIZER" "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PY" "$OUT_DIR/sanitizer_case.py"
  done
else
  echo "=== compute_sanitizer: not found, skipped"
  STEPS+=("compute_sanitizer|1 (not found)|0|compute-sanitizer not on PATH nor in /usr/local/cuda/bin")
fi

# --- 6-7. the CUDA backend tests and the kernel parity suite on CUDA ------------------------------------------------
run_step tests_cuda_backend "$LIMIT_CUDA_BACKEND" "${PYTEST[@]}" tests/sirl_kernels/backends/test_cuda.py \
  --junitxml="$OUT_DIR/tests_cuda_backend.xml"
run_step tests_kernel_parity "$LIMIT_PARITY" "${PYTEST[@]}" tests/sirl_kernels \
  --ignore=tests/sirl_kernels/backends/test_triton_compile.py --ignore=tests/sirl_kernels/backends/test_triton_sass.py \
  --ignore=tests/sirl_kernels/backends/test_gpu_model.py --ignore=tests/sirl_kernels/backends/test_cuda.py \
  --junitxml="$OUT_DIR/tests_kernel_parity.xml"

# --- 8. the trainer on the GPU (GPU_CHECK_TRAINER=1: outside the kernels' 8-minute budget) ------------------------
# The GPU version of the trainer benchmarks of benchmarks/bench_trainer.py: HF generate against the vLLM engine
# (rollout seconds, generated tokens/s, the per-stage split of a step with each) on SmolLM2-135M-Instruct in bf16,
# and parallel=ddp against parallel=fsdp (step time, peak memory) when the machine has 2 or more GPUs.
if [ "${GPU_CHECK_TRAINER:-0}" = 1 ]; then
  BUDGET_END=$(( $(date +%s) + ${GPU_CHECK_TRAINER_BUDGET:-1200} ))
  run_step trainer_vllm_install 600 "$PY" -m pip install -q "vllm>=0.32,<0.33"
  run_step trainer_engines 600 "$PY" benchmarks/bench_trainer.py --trainers ours ours+vllm --device cuda \
    --steps 3 --warmup 1 --rounds 2 --out-dir "$OUT_DIR/trainer"
  if [ "$("$PY" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    run_step trainer_parallel 600 "$PY" benchmarks/bench_trainer.py --parallel --device cuda --ranks 2 \
      --steps 3 --warmup 1 --rounds 2 --out-dir "$OUT_DIR/trainer"
  else
    STEPS+=("trainer_parallel|skipped (one GPU)|0|parallel=ddp/fsdp needs 2 or more")
  fi
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
  [ -f "$OUT_DIR/bench_gpu.md" ] && { echo; echo "## bench_gpu (measured, next to the model's prediction)"; echo
    cat "$OUT_DIR/bench_gpu.md"; }
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
# 0 passes; "skipped" (set-up by request, a 2-GPU step on one GPU) is not a failure; anything else is, "skipped
# (budget)" included: that check never ran
for s in "${STEPS[@]}"; do
  IFS='|' read -r _ rc _ _ <<<"$s"
  case $rc in 0 | skipped | "skipped (one GPU)") ;; *) FAILED=1 ;; esac
done
cat "$OUT_DIR/summary.md"
exit $FAILED
