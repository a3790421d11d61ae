"""ptxas' verdict on every CUDA kernel of libsirl_cuda, collected during the CMake build (csrc/cuda/CMakeLists.txt).

    ptxas_report.py capture -- NVCC ARGS...     the compiler launcher of each .cu: runs nvcc (whose flags include
                                                -Xptxas -v), passes its output through except ptxas' info lines,
                                                and keeps those in OBJECT.ptxas.txt next to the object (-o OBJECT)
    ptxas_report.py report --out FILE OBJ...    after the link: one markdown table of registers, stack frame,
                                                spills, shared memory and barriers per kernel and architecture from
                                                the kept lines; exits 1, failing the build, on any spill or stack
                                                frame (local memory) and when no kernel was reported at all

Regenerate the table in the docs from a build: python csrc/cuda/ptxas_report.py report --out
docs/cuda-resources.md build/cmake/csrc/cuda/CMakeFiles/sirl_cuda_objs.dir/*.o (scripts/build_csrc.sh prints the
build's own copy).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '(?P<name>[^']+)' for '(?P<arch>sm_\w+)'")
PROPERTIES = re.compile(r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
                        r"(?P<loads>\d+) bytes spill loads")
USED = re.compile(r"ptxas info\s*: Used (?P<regs>\d+) registers(?P<rest>.*)")
SMEM = re.compile(r"(\d+) bytes smem")
BARRIERS = re.compile(r"used (\d+) barriers")


def log_path(obj: str) -> Path:
    return Path(obj + ".ptxas.txt")


def capture(command: list[str]) -> int:
    obj = command[command.index("-o") + 1] if "-o" in command else None
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kept, passed = [], []
    for line in (proc.stdout + proc.stderr).splitlines():
        is_info = line.startswith("ptxas info") or PROPERTIES.search(line) is not None
        (kept if is_info else passed).append(line)
    if passed:
        print("\n".join(passed), file=sys.stderr)
    if obj is not None and proc.returncode == 0:
        log_path(obj).write_text("\n".join(kept) + "\n")
    return proc.returncode


@dataclass
class Kernel:
    name: str
    arch: str
    registers: int = -1
    stack: int = -1
    spill_stores: int = -1
    spill_loads: int = -1
    smem: int = 0
    barriers: int = 0


def parse(text: str) -> list[Kernel]:
    kernels: list[Kernel] = []
    current: Kernel | None = None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current = Kernel(m["name"], m["arch"])
            kernels.append(current)
        elif current is not None and (m := PROPERTIES.search(line)):
            current.stack, current.spill_stores, current.spill_loads = int(m["stack"]), int(m["stores"]), int(m["loads"])
        elif current is not None and (m := USED.search(line)):
            current.registers = int(m["regs"])
            current.smem = int(s[1]) if (s := SMEM.search(m["rest"])) else 0
            current.barriers = int(b[1]) if (b := BARRIERS.search(m["rest"])) else 0
    return kernels


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name: str) -> str:
    """`void sirl_cuda::(anonymous namespace)::forward_kernel<float, 256>(...)` -> `forward_kernel<float, 256>`."""
    name = name.replace("(anonymous namespace)::", "").split("(", 1)[0].removeprefix("void ")
    return re.sub(r"^(\w+::)+", "", name) or name


def report(out: Path, objects: list[str]) -> int:
    kernels = []
    for obj in objects:
        if log_path(obj).is_file():
            kernels += parse(log_path(obj).read_text())
    if not kernels:
        print("ptxas_report: no kernel was reported: was -Xptxas -v lost from the CUDA flags?", file=sys.stderr)
        return 1
    names = demangle(sorted({k.name for k in kernels}))
    rows = sorted(kernels, key=lambda k: (short(names[k.name]), k.arch))
    bad = [k for k in rows if k.spill_stores or k.spill_loads or k.stack or k.registers < 0]
    lines = [
        "# libsirl_cuda: ptxas resources per kernel",
        "",
        "Written by the CMake build (`-Xptxas -v`, csrc/cuda/ptxas_report.py); the build fails on any spill or stack "
        "frame. compute_90 is shipped as PTX and compiled by the driver, so it has no row here.",
        "",
        "| kernel | arch | registers | stack (B) | spill stores (B) | spill loads (B) | smem (B) | barriers |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k in rows:
        lines.append(f"| `{short(names[k.name])}` | {k.arch} | {k.registers} | {k.stack} | {k.spill_stores} | "
                     f"{k.spill_loads} | {k.smem} | {k.barriers} |")
    out.write_text("\n".join(lines) + "\n")
    for k in bad:
        print(f"ptxas_report: {short(names[k.name])} for {k.arch} uses local memory: stack {k.stack} B, spill "
              f"stores {k.spill_stores} B, spill loads {k.spill_loads} B", file=sys.stderr)
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if argv[:2] == ["capture", "--"]:
        return capture(argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report")
    rep.add_argument("--out", type=Path, required=True)
    rep.add_argument("objects", nargs="+")
    args = parser.parse_args(argv)
    return report(args.out, args.objects)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
