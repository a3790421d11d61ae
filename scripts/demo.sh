#!/usr/bin/env bash
# The main job: SIRL on SmolLM2-135M-Instruct (LoRA, G=4) with the cpu-demo preset, then the reward curves.
# Sets itself up first, with only what the demo needs (scripts/setup.sh demo). Extra arguments go to `sirl train`
# (e.g. scripts/demo.sh --steps 30).
#   OUTPUT_DIR  where the run goes (default runs/cpu-demo-<time>; pass --resume with an existing one to continue)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh demo
# shellcheck disable=SC1091
source .venv/bin/activate
# One thread unless told otherwise (OMP_NUM_THREADS=2 ... to override): the README's timing is measured with
# exactly this setting, and on a small shared CPU more threads than free cores make every step slower.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
out="${OUTPUT_DIR:-runs/cpu-demo-$(date +%Y%m%d-%H%M%S)}"
sirl train --preset cpu-demo --steps 10 --output-dir "$out" "$@"
sirl plot "$out"
echo "metrics: $out/metrics.jsonl   curves: $out/*.png"
