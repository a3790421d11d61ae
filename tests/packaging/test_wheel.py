"""The package as users install it: the release wheel and sdist of scripts/build_wheel.sh, the wheel installed into a
fresh virtual environment with a torch other than the dev venv's, and the kernel tests (tests/sirl_kernels) run
against that installed package from outside the repository.

The artifact tests run when $SIRL_KERNELS_WHEEL names the wheel (scripts/test.sh builds it and sets it) and skip
with that reason otherwise. $SIRL_KERNELS_WHEEL_TORCH is the torch installed beside it (default torch==2.14.1, a
CUDA build: the libraries must load, and the "cuda" backend explain itself, beside a torch built for CUDA on a
machine without a GPU). Timings (install, tests) go to build/wheel-test.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WHEEL = os.environ.get("SIRL_KERNELS_WHEEL")
TORCH_SPEC = os.environ.get("SIRL_KERNELS_WHEEL_TORCH", "torch==2.14.1")
needs_wheel = pytest.mark.skipif(not WHEEL, reason="set SIRL_KERNELS_WHEEL to a wheel of scripts/build_wheel.sh "
                                                   "(scripts/test.sh does) to test the release artifacts")


def test_the_train_extra_is_what_the_sirl_command_checks():
    """sirl/_entry.py names the [train] extra's distributions when one is missing: the two lists must agree."""
    from sirl._entry import TRAIN_MODULES

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    declared = {re.split(r"[\s<>=!~\[]", r, maxsplit=1)[0].lower() for r in extras["train"]}
    assert declared == set(TRAIN_MODULES)


def test_sirl_without_the_train_extra_names_it_in_one_line(monkeypatch, capsys):
    import sirl._entry as entry

    monkeypatch.setattr(entry.importlib.util, "find_spec", lambda name: None if name == "yaml" else object())
    assert entry.main(["train", "--preset", "cpu-demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[train] extra" in err and "pip install" in err and "pyyaml" in err


@needs_wheel
def test_the_wheel_holds_both_native_libraries_and_the_license():
    wheel = Path(WHEEL)
    assert re.fullmatch(r"sirl_kernels-[\w.]+-py3-none-manylinux_\d+_\d+_x86_64\.whl", wheel.name), wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"sirl_kernels/libsirl_cpu.so", "sirl_kernels/libsirl_cuda.so", "sirl_kernels/_native.py",
            "sirl/presets/cpu-demo.yaml"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "csrc/")) or "_C_cpu" in n for n in names)


@needs_wheel
def test_the_sdist_holds_every_source_and_header():
    sdists = sorted(Path(WHEEL).parent.glob("sirl_kernels-*.tar.gz"))
    assert sdists, f"no sdist beside {WHEEL}"
    with tarfile.open(sdists[-1]) as tar:
        held = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    sources = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    sources |= {"CMakeLists.txt", "pyproject.toml", "LICENSE", "README.md"}
    missing = sorted(sources - held)
    assert not missing, f"the sdist lacks {missing}"


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


@needs_wheel
def test_the_installed_wheel_passes_the_kernel_tests_outside_the_repo(tmp_path):
    venv, work = tmp_path / "venv", tmp_path / "outside"
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "SIRL_KERNELS_LIB_DIR")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    timings = {"torch": TORCH_SPEC, "wheel": Path(WHEEL).name, "wheel_kib": Path(WHEEL).stat().st_size // 1024}

    start = time.monotonic()
    _run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = _run([str(python), "-m", "pip", "install", "-q", TORCH_SPEC, "numpy", "pytest"], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    timings["torch_install_s"] = round(time.monotonic() - start, 1)
    start = time.monotonic()
    done = _run([str(python), "-m", "pip", "install", "-q", WHEEL], env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    timings["wheel_install_s"] = round(time.monotonic() - start, 1)

    # The tests, copied out of the repository with the same pytest settings, and the checkout's tools/ beside them
    # (test-side instrumentation: the interpreter's FLOP and byte counters, the launch recorder, the GPU model; never
    # part of the wheel, and importing only the installed sirl_kernels): nothing else of the checkout on the path.
    work.mkdir()
    shutil.copytree(ROOT / "tests" / "sirl_kernels", work / "tests" / "sirl_kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "tools", work / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    # the byte counter the extras-traffic test loads (test-side, like tools/)
    (work / "benchmarks").mkdir()
    shutil.copy(ROOT / "benchmarks" / "triton_memory_traffic.py", work / "benchmarks" / "triton_memory_traffic.py")
    for name in ("conftest.py", "reference_impl.py", "statistics_reference.py", "cpu_isas.py", "cpu_backends.py"):
        shutil.copy(ROOT / "tests" / name, work / "tests" / name)
    (work / "pytest.ini").write_text("[pytest]\naddopts = --import-mode=importlib\npythonpath = tests .\n"
                                     "markers =\n    gpu: needs a CUDA device\n    slow: slow\n")
    probe = _run([str(python), "-c", "import sirl_kernels, torch; from sirl_kernels import _native; "
                  "print(sirl_kernels.__file__); print(torch.__version__); "
                  "print({k: (v.available, v.reason) for k, v in sirl_kernels.available_backends().items()}); "
                  "print(_native.load('cuda').probe(_native.Launch()))"], cwd=work, env=env)
    assert probe.returncode == 0, probe.stderr
    location, torch_version, backends, cuda_probe = probe.stdout.strip().splitlines()[:4]
    assert Path(location).is_relative_to(venv) and not Path(location).is_relative_to(ROOT), location
    assert "'cpu': (True" in backends, backends
    timings.update(torch_version=torch_version, backends=backends, cuda_probe=cuda_probe)
    # The wheel's libsirl_cuda loaded (else .probe above raised) and its probe says "None" (it runs on device 0) or,
    # in words, why not (no driver, a driver too old, no device, no kernel image): never an empty or garbled reason.
    assert cuda_probe == "None" or re.fullmatch(r"sirl_probe: \S.{10,}", cuda_probe), cuda_probe
    # ... and agrees with the "cuda" backend: it is usable exactly when the probe passes (and torch sees the GPU).
    if "'cuda': (True" in backends:
        assert cuda_probe == "None", (backends, cuda_probe)

    # test_triton_compile.py, test_triton_sass.py and test_gpu_model.py check the Triton compiler's output (and the
    # model's inputs counted from it) against docs/ of the checkout with the Triton the dev venv pins (3.9); they are
    # about the source tree, not the installed package (torch 2.14.1 brings Triton 3.8), and would compile every
    # kernel for three architectures again.
    start = time.monotonic()
    tests = _run([str(python), "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/sirl_kernels",
                  *(f"--ignore=tests/sirl_kernels/backends/{name}.py"
                    for name in ("test_triton_compile", "test_triton_sass", "test_gpu_model"))], cwd=work, env=env)
    timings["tests_s"] = round(time.monotonic() - start, 1)
    timings["tests_summary"] = tests.stdout.strip().splitlines()[-1] if tests.stdout.strip() else ""
    # no test may skip for want of the checkout's tools/ (they are copied above)
    timings["skipped_for_tools"] = [ln for ln in tests.stdout.splitlines() if "SKIPPED" in ln and "tools/" in ln]
    # Without [train], `sirl` says which extra to install, in one line.
    sirl = _run([str(venv / "bin" / "sirl"), "train", "--preset", "cpu-demo"], cwd=work, env=env)
    timings["sirl_without_train"] = sirl.stderr.strip()
    (ROOT / "build").mkdir(exist_ok=True)
    (ROOT / "build" / "wheel-test.json").write_text(json.dumps(timings, indent=1))
    print(json.dumps(timings, indent=1))
    assert tests.returncode == 0, tests.stdout[-6000:] + tests.stderr[-3000:]
    assert not timings["skipped_for_tools"], timings["skipped_for_tools"]
    assert sirl.returncode == 2 and sirl.stderr.count("\n") == 1 and "[train]" in sirl.stderr, sirl.stderr
