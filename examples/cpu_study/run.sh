#!/usr/bin/env bash
# The CPU study of SIRL (docs/results/cpu-study.md): a weakly aligned SmolLM2-135M-Instruct, its entropy gap, and its
# defense under held-out jailbreaks before and after SIRL, with the reversed- and random-reward ablations.
#   bash examples/cpu_study/run.sh              every stage, in order; a stage already done with the same inputs is skipped
#   bash examples/cpu_study/run.sh --list       the stages and whether each is done
#   bash examples/cpu_study/run.sh --seeds 0 1 2  more seeds (the default, 0 1, fits in 3 hours; each adds ~50 min)
# DATA: the shared data folder (default ../shared/data); RUN_DIR: where the stages write (default runs/cpu_study).
# Every job runs on one thread at nice 10 (the machine is shared); about 3 hours on a 2-core CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}" TOKENIZERS_PARALLELISM=false
export DATA="${DATA:-../shared/data}" HF_HUB_OFFLINE=1
# The study needs the test profile's packages (TRL and datasets for the SFT stage): set it up when they are missing.
if ! .venv/bin/python -c "import sirl, trl, datasets, peft" 2>/dev/null; then bash scripts/setup.sh test; fi
exec nice -n "${NICE:-10}" .venv/bin/python examples/cpu_study/study.py --run-dir "${RUN_DIR:-runs/cpu_study}" \
    --data "$DATA" "$@"
