"""What the real compiler made of a kernel's main loop, read from its SASS (``cuobjdump -sass``): instructions
per element, load and store widths, barriers and shared-memory traffic inside the loop.

A loop is the address range between a backward branch and its target. The *main loop* is the one that moves the
kernel's streaming data: the innermost loop with the most global-load bytes per thread (LDG, or LDGSTS when
Triton pipelines through shared memory); the others (a fill loop, a scalar head or tail, a grid-stride loop
around the row) run once per row or hold the main loop. Instructions per element =
instructions in the loop body / elements each thread loads per iteration (bytes loaded per thread and
iteration / the element size), i.e. thread-instructions per element, the unit of the issue-rate model
(docs/triton-kernels.md). The count is static: every instruction of the body once, predicated ones included,
which is what each iteration issues when the body has no internal branch (the logits loops have none).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"0x([0-9a-f]+)")
# bytes moved per thread by one global memory instruction, from its width suffix
_WIDTHS = {".128": 16, ".64": 8, ".U16": 2, ".S16": 2, ".U8": 1, ".S8": 1}


@dataclass
class Instr:
    addr: int
    op: str  # opcode with modifiers, e.g. LDG.E.128
    args: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


@dataclass
class LoopReport:
    """One loop of a kernel's SASS."""

    start: int
    end: int
    instructions: int
    load_bytes: int  # global bytes loaded per thread per iteration (LDG + LDGSTS)
    store_bytes: int  # global bytes stored per thread per iteration
    loads: list = field(default_factory=list)  # the global-load opcodes, in order
    stores: list = field(default_factory=list)
    barriers: int = 0  # BAR.* in the loop
    shared: int = 0  # LDS / STS / LDSM in the loop
    opcodes: dict = field(default_factory=dict)  # base opcode -> count

    def per_element(self, elem_bytes: int) -> float | None:
        """Thread-instructions per element loaded (None if the loop loads nothing)."""
        elems = self.load_bytes / elem_bytes
        return self.instructions / elems if elems else None

    def as_dict(self, elem_bytes: int | None = None) -> dict:
        out = asdict(self)
        if elem_bytes:
            out["elements_per_iteration"] = self.load_bytes / elem_bytes
            out["instructions_per_element"] = self.per_element(elem_bytes)
        return out


def disassemble(cubin: bytes, cuobjdump: str | None = None) -> str:
    """``cuobjdump -sass`` of a cubin (the cuobjdump shipped with Triton when not given)."""
    if cuobjdump is None:
        from triton import knobs

        cuobjdump = knobs.nvidia.cuobjdump.path
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, "-sass", f.name], check=True, capture_output=True, text=True).stdout


def parse(sass: str) -> list[Instr]:
    return [Instr(int(m.group(1), 16), m.group(3), m.group(4).strip()) for m in _LINE.finditer(sass)]


def _global_bytes(op: str) -> int:
    for suffix, size in _WIDTHS.items():
        if suffix in op:
            return size
    return 4


def loops(instrs: list[Instr]) -> list[LoopReport]:
    """Every loop (backward branch) of a function, in address order."""
    out = []
    for ins in instrs:
        if ins.base != "BRA":
            continue
        target = _TARGET.search(ins.args)
        if not target or int(target.group(1), 16) >= ins.addr:
            continue
        lo = int(target.group(1), 16)
        body = [i for i in instrs if lo <= i.addr <= ins.addr]
        loads = [i.op for i in body if i.base in ("LDG", "LDGSTS")]
        stores = [i.op for i in body if i.base == "STG"]
        ops: dict = {}
        for i in body:
            ops[i.base] = ops.get(i.base, 0) + 1
        out.append(LoopReport(lo, ins.addr, len(body), sum(_global_bytes(o) for o in loads),
                              sum(_global_bytes(o) for o in stores), loads, stores,
                              sum(1 for i in body if i.base == "BAR"),
                              sum(1 for i in body if i.base in ("LDS", "STS", "LDSM")), ops))
    return out


def main_loop(instrs: list[Instr]) -> LoopReport | None:
    """The innermost loading loop with the most global-load bytes per thread (ties: the longer one): a loop that
    holds another loading loop (a grid-stride loop around the row loop, a vocabulary loop around a K loop) is
    not it. None without a loading loop."""
    loading = [lp for lp in loops(instrs) if lp.load_bytes]
    innermost = [lp for lp in loading if not any(o is not lp and lp.start <= o.start and o.end <= lp.end
                                                   for o in loading)]
    return max(innermost, key=lambda lp: (lp.load_bytes, lp.instructions)) if innermost else None


def functions(sass_text: str) -> dict[str, str]:
    """Each function's SASS in a cuobjdump listing, by (mangled) name."""
    return {part.split("\n", 1)[0].strip(): part for part in sass_text.split("Function : ")[1:]}


def analyse(cubin: bytes, elem_bytes: int) -> dict[str, dict | None]:
    """Every function of a cubin: its main loop as a dict (instructions, per element, widths, barriers)."""
    out = {}
    for name, text in functions(disassemble(cubin)).items():
        loop = main_loop(parse(text))
        out[name] = None if loop is None else loop.as_dict(elem_bytes)
    return out
