#!/usr/bin/env bash
# The one command for the day a GPU is lent (about 8 minutes on an H200 once set up):
#
#   bash scripts/gpu_check.sh            # results in $OUT if set, else gpu_check_results/
#
# 1. set-up: `bash scripts/setup.sh gpu` (the test set-up, with a CUDA build of torch (TORCH_SPEC, default torch)
#    in place of a CPU-only one, and libsirl_cuda required in the build); fast when nothing changed. Then a GATE:
#    unless torch sees a CUDA device and the "cuda" and "triton" backends run on it, the script stops here, with
#    the reason, and fails (no test would run on the GPU, so no step may pass);
# 2. environment: nvidia-smi, torch / triton / CUDA versions, sirl_kernels.available_backends();
# 3. tests/gpu (Triton parity at realistic shapes, sync-free path, CUDA-graph capture);
# 4. the CUDA backend tests (tests/sirl_kernels/backends/test_cuda.py);
# 5. the rest of the kernel parity suite on CUDA (tests/sirl_kernels without step 4's file and the CPU-only AOT
#    compile test);
# 6. a short benchmarks/bench_gpu.py (Triton and CUDA backends vs eager, torch.compile, Liger / CCE when installed);
# 7. compute-sanitizer memcheck of a small forward+backward of the Triton and CUDA backends (split-V, misaligned
#    rows, in place), when compute-sanitizer is on PATH or in /usr/local/cuda/bin.
# Every step after the gate runs under a time limit, its log and exit code are kept, a failing step does not stop
# the next; summary.md / summary.json list them all and the script exits non-zero if any step failed.
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
else
  run_step setup 900 env TORCH_SPEC="${TORCH_SPEC:-torch}" bash scripts/setup.sh gpu
fi
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || PY=$(command -v python3)

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
  --ignore=tests/sirl_kernels/backends/test_triton_compile.py --ignore=tests/sirl_kernels/backends/test_cuda.py \
  --junitxml="$OUT_DIR/tests_kernel_parity.xml"

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
several chunks, in place) and of the CUDA backend (one block per row and split-V, fp32 and bf16 rows that start
off their 16-byte alignment, an ignored and an out-of-range label, in place), for compute-sanitizer."""
import torch
import sirl_kernels
from sirl_kernels.backends import cuda as cuda_backend
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

# CUDA: rows of big[:, 1:3002] start one element past an aligned one (the kernels' scalar head, vectors, tail).
for dtype in (torch.float32, torch.bfloat16):
    big = (torch.randn(7, 3003, device="cuda") * 3).to(dtype)
    x = big[:, 1:3002]
    y = torch.randint(0, 3001, (7,), device="cuda"); y[2] = -100; y[4] = 3001  # ignored; out of range (NaN row)
    g = torch.randn(7, device="cuda")
    outs = {}
    for splits in (1, 3):
        lp, h, stats = cuda_backend.logits_forward(x, y, 0.7, -100, num_splits=splits)
        grad = cuda_backend.logits_backward(g, g, x, y, stats, h, 0.7, -100)
        outs[splits] = (lp, h, grad)
    inplace = big.clone()[:, 1:3002]
    cuda_backend.logits_backward(g, g, inplace, y, stats, h, 0.7, -100, out=inplace)
    ok = torch.tensor([r not in (2, 4) for r in range(7)], device="cuda")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2**-6, atol=2**-6)  # grads in dtype
    for one, split, t in zip(outs[1], outs[3], (dict(rtol=1e-5, atol=1e-5),) * 2 + (tol,)):
        torch.testing.assert_close(split[ok], one[ok], **t)
    torch.testing.assert_close(inplace[ok], outs[3][2][ok], **tol)
    assert bool(torch.isnan(outs[3][0][4])) and bool(torch.isnan(outs[3][2][4]).all())
    assert bool((outs[3][0][2] == 0).all()) and bool((outs[3][2][2] == 0).all())
    leaf = big.clone().requires_grad_(True)  # the public API and autograd on the misaligned view
    lp, h = sirl_kernels.token_logprobs_entropy(leaf[:, 1:3002], y.clamp(max=3000), temperature=0.7,
                                                backend="cuda")
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
