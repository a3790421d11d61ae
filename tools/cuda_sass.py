"""The CUDA backend's kernels (csrc/cuda) counted the way the Triton kernels are (``tools/sass.py``): each kernel's
main loop, in thread-instructions per element, with its load and store widths and barriers, from cubins nvcc
compiles here for sm_80 and sm_90a (no GPU needed).

    python -m tools.cuda_sass [--arch 80 90a] [--out docs/cuda-sass.md]

nvcc is looked for as the build does (``$CUDACXX``, PATH, /usr/local/cuda/bin, the wheels of build/cuda-toolkit).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tools import sass

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("forward.cu", "backward.cu")
ELEM_BYTES = {"float": 4, "__half": 2, "__nv_bfloat16": 2}


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc",
                      *map(str, sorted(ROOT.glob("build/cuda-toolkit/**/bin/nvcc")))):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.strip().split("\n")


def short_name(demangled: str) -> str:
    """``void sirl_cuda::(anonymous namespace)::forward_kernel<__nv_bfloat16, 256>(...)`` -> forward_kernel<...>"""
    m = re.search(r"(\w+_kernel<[^()]*>)", demangled)
    return m.group(1) if m else demangled.split("(")[0]


def compile_cubin(nvcc: str, source: str, arch: str, out: str) -> None:
    cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", f"-I{ROOT / 'csrc' / 'include'}",
           f"-I{ROOT / 'csrc' / 'cuda'}", str(ROOT / "csrc" / "cuda" / source), "-o", out]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


def count(archs=("80", "90a"), nvcc: str | None = None) -> list[dict]:
    """One row per kernel and architecture: its main loop (``tools/sass.py``) per element."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("no nvcc ($CUDACXX, PATH, /usr/local/cuda/bin, build/cuda-toolkit)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            for source in SOURCES:
                cubin = os.path.join(tmp, f"{source}.{arch}.cubin")
                compile_cubin(nvcc, source, arch, cubin)
                text = sass.disassemble(Path(cubin).read_bytes())
                funcs = sass.functions(text)
                for mangled, demangled in zip(funcs, _demangle(list(funcs))):
                    name = short_name(demangled)
                    elem = next((b for t, b in ELEM_BYTES.items() if f"<{t}" in name), 4)
                    loop = sass.main_loop(sass.parse(funcs[mangled]))
                    rows.append({"arch": f"sm_{arch}", "kernel": name, "source": source,
                                 "main_loop": None if loop is None else loop.as_dict(elem)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| kernel | arch | main-loop instructions | elements / iteration / thread | instructions per element | "
             "loads | stores | barriers |", "|---|---|---:|---:|---:|---|---|---:|"]
    for r in rows:
        loop = r["main_loop"]
        if loop is None:
            lines.append(f"| `{r['kernel']}` | {r['arch']} | - | - | - | - | - | - |")
            continue
        lines.append(f"| `{r['kernel']}` | {r['arch']} | {loop['instructions']} | "
                     f"{loop['elements_per_iteration']:g} | {loop['instructions_per_element']:.2f} | "
                     f"{', '.join(sorted(set(loop['loads'])))} | {', '.join(sorted(set(loop['stores']))) or '-'} | "
                     f"{loop['barriers']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["80", "90a"])
    ap.add_argument("--out", help="write the markdown table here")
    args = ap.parse_args(argv)
    table = markdown(count(args.arch))
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
