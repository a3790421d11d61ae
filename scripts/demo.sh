#!/usr/bin/env bash
# The main job: SIRL on SmolLM2-135M-Instruct (LoRA, G=4) with the cpu-demo preset, then the reward curves.
# Sets itself up first. Extra arguments go to `sirl train` (e.g. scripts/demo.sh --steps 30).
#   OUTPUT_DIR  where the run goes (default runs/cpu-demo-<time>; pass --resume with an existing one to continue)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
source .venv/bin/activate
out="${OUTPUT_DIR:-runs/cpu-demo-$(date +%Y%m%d-%H%M%S)}"
sirl train --preset cpu-demo --steps 10 --output-dir "$out" "$@"
sirl plot "$out"
echo "metrics: $out/metrics.jsonl   curves: $out/*.png"
