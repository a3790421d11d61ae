"""The logits kernels' main loops, as ptxas compiled them for sm_90, within their instruction budget.

An H100 issues about 9 thread-instructions per byte of HBM bandwidth (132 SMs x 4 schedulers x 32 lanes x ~1.8
GHz against 3.35 TB/s): 18 per bf16 logit read, 37 per logit read and written. So the main loops must cost at
most ``aot.INSTRUCTION_BUDGET`` = 12 thread-instructions per logit (docs/triton-kernels.md, "Main loops"), with
16-byte loads (and stores) and, in the forward, no block barrier. The SASS comes from the AOT compile shared with
test_triton_compile.py (``tools/triton_aot.py``, counted by ``tools/sass.py``): every logits kernel, bf16 / fp16
/ fp32, V = 151936 and a V = 151665 view with row stride 151936 (out of place: the gradient the launcher
allocates, rows padded to 16 bytes; in place: the logits' own rows), compiled twice: with Triton's fp-fusion on
(what ``utils.launch`` pins) and off (Triton's default from 3.10 on). Every one of them is held to the budget; the
tests look them up through the recorded launches of each case (an identical specialisation compiles once, so a
binary names only the first case that made it).

The one layout outside the budget is one no launcher allocates: logits whose row stride is not a multiple of 16
bytes (a contiguous [N, 50257] GPT-2 tensor). Its rows cannot all start aligned, so its loads fall back to the
element width; the test below says so and what it costs (docs/triton-kernels.md, "Alignment").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sirl_kernels.backends import triton as tb

try:
    from tools import triton_aot as aot
except ImportError:  # the installed-wheel run, outside the checkout
    aot = None

pytestmark = pytest.mark.skipif(aot is None or tb._IMPORT_ERROR is not None,
                                reason="needs triton and the checkout's tools/")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# the cases whose main loops the budget holds: V = 151936, the V = 151665 view (out of place and in place)
BUDGET_CASES = [f"logits {name}{variant}" for name in DTYPES
                for variant in ("", f", V={aot.VIEW_VOCAB} view" if aot else "",
                                f", V={aot.VIEW_VOCAB} view, in-place backward" if aot else "")]
UNALIGNED_CASE = f"logits bf16, V={aot.UNALIGNED_VOCAB} contiguous, in-place backward" if aot else ""


def _streaming(binaries):
    return [b for b in binaries if b["kernel"] in aot.STREAMING_KERNELS and not b["error"]]


def _describe(b):
    loop = b["main_loop"] or {}
    return (f"{b['kernel']} {b['dtypes'].split(',')[0]} ({b['case']}; fusion {b['fp_fusion']}; {b['constexprs']}): "
            f"{loop.get('instructions')} instructions / {loop.get('elements_per_iteration')} elements, "
            f"loads {sorted(set(loop.get('loads', [])))}, stores {sorted(set(loop.get('stores', [])))}, "
            f"{loop.get('barriers')} barriers")


def _aligned(b):
    """Rows 16-byte aligned on every side the kernel touches: the logits (UNIT) and, in the backward, the
    gradient (OUT_UNIT) are passed in units of 16 bytes."""
    c = b["constexprs"]
    return c.get("UNIT", 1) > 1 and (b["kernel"] == "_logits_fwd_kernel" or c.get("OUT_UNIT", 1) > 1)


def _case_binaries(compiled, arch, case):
    """(kernel, fp_fusion, binary) of every streaming-kernel launch a case recorded on sm_``arch``."""
    res = compiled["archs"][str(arch)]
    by_hash = {b["hash"]: b for b in res["binaries"] if b["hash"]}
    return [(launch["kernel"], launch["fp_fusion"], by_hash[launch["hash"]]) for launch in res["launches"]
            if launch["case"] == case and launch["kernel"] in aot.STREAMING_KERNELS]


def test_every_budget_case_is_compiled_both_ways(compiled, binaries_of):
    """Every case of the budget, forward and backward, fusion on and off, has its own recorded launches, each
    naming a binary that compiled: none is satisfied by another case's binary."""
    binaries_of(90)  # fails if sm_90 did not compile at all
    missing = []
    for case in BUDGET_CASES:
        found = {(kernel, fusion) for kernel, fusion, b in _case_binaries(compiled, 90, case) if not b["error"]}
        missing += [(case, kernel, fusion) for kernel in aot.STREAMING_KERNELS for fusion in (True, False)
                    if (kernel, fusion) not in found]
    assert not missing, missing


def test_budget_cases_are_16_byte_aligned_and_within_the_instruction_budget_on_sm90(compiled, binaries_of):
    """The launches of every budget case (the out-of-place view's padded gradient included): <= 12 per logit,
    16-byte loads and stores, fusion on and off."""
    binaries_of(90)
    over = []
    for case in BUDGET_CASES:
        for _, _, b in _case_binaries(compiled, 90, case):
            loop = b["main_loop"]
            if not (_aligned(b) and loop["instructions_per_element"] <= aot.instruction_budget(b)
                    and set(loop["loads"]) == {"LDG.E.128"}
                    and (b["kernel"] == "_logits_fwd_kernel" or set(loop["stores"]) == {"STG.E.128"})):
                over.append(f"{case}: {_describe(b)}")
    assert not over, "\n".join(over)


def test_main_loops_within_the_instruction_budget_on_sm90(binaries_of):
    """Every aligned specialisation compiled for sm_90 (those the launchers compiled only to read their occupancy
    and the split-V forward included); the forward with the self-certainty / varentropy accumulators to
    ``aot.EXTRAS_INSTRUCTION_BUDGET`` (``aot.instruction_budget``)."""
    binaries = [b for b in _streaming(binaries_of(90)) if _aligned(b)]
    assert binaries
    over = [_describe(b) for b in binaries
            if not b["main_loop"]["instructions_per_element"] <= aot.instruction_budget(b)]
    assert not over, "\n".join(over)


def test_extras_specialisations_are_compiled_and_the_defaults_carry_no_extras_code(binaries_of):
    """The self-certainty / varentropy forward and the gamma / delta backward compile as their own specialisations
    (16-byte loads, within their budgets: the tests above), and a default one costs no more than before them: the
    extras are constexpr-guarded, so each default main loop is strictly cheaper than its extras twin."""
    binaries = [b for b in _streaming(binaries_of(90)) if _aligned(b) and b["fp_fusion"]]
    flags = ("HAS_SC", "HAS_VE", "HAS_GAMMA", "HAS_DELTA")
    extras = [b for b in binaries if any(b["constexprs"].get(f) for f in flags)]
    assert {b["kernel"] for b in extras} == set(aot.STREAMING_KERNELS), [_describe(b) for b in extras]
    for b in extras:
        key = {k: v for k, v in b["constexprs"].items() if k not in flags}
        twins = [d for d in binaries if d["kernel"] == b["kernel"] and d["dtypes"] == b["dtypes"]
                 and not any(d["constexprs"].get(f) for f in flags)
                 and {k: v for k, v in d["constexprs"].items() if k not in flags} == key]
        for d in twins:
            assert d["main_loop"]["instructions"] < b["main_loop"]["instructions"], (_describe(d), _describe(b))


# The sm_90 main loops of the streaming kernels before issue 23 added the self-certainty / varentropy / gamma / delta
# specialisations (docs/triton-kernels.md at fdd372e, parsed once into this file).
BEFORE_ISSUE_23 = Path(__file__).parent / "data" / "triton_sm90_before_issue23.json"


def test_default_specialisations_are_no_worse_than_before_the_extras(binaries_of):
    """Issue 23: the logprob + entropy specialisations keep their instructions per logit and their registers.
    Every sm_90 streaming binary of the baseline is compiled again (flags off) and none has more main-loop
    instructions per element or more registers than it had."""
    baseline = json.loads(BEFORE_ISSUE_23.read_text())["binaries"]
    flags = ("HAS_SC", "HAS_VE", "HAS_GAMMA", "HAS_DELTA")
    now = [b for b in _streaming(binaries_of(90)) if not any(b["constexprs"].get(f) for f in flags)]
    missing, worse = [], []
    for old in baseline:
        match = [b for b in now if b["kernel"] == old["kernel"] and b["dtypes"].split(",")[0] == old["dtype"]
                 and b["case"] == old["case"] and b["fp_fusion"] == old["fp_fusion"]
                 and all(b["constexprs"].get(k) == v for k, v in old["flags"].items())]
        if not match:
            missing.append(old)
        for b in match:
            loop = b["main_loop"]
            per_element = loop["instructions"] / loop["elements_per_iteration"]
            if per_element > old["instructions"] / old["elements"] or b["registers"] > old["registers"]:
                worse.append(f"{_describe(b)}, {b['registers']} registers; before: {old}")
    assert not missing, f"baseline binaries no longer compiled: {missing}"
    assert not worse, "\n".join(worse)


@pytest.mark.parametrize("arch", [80, 90, 100])
def test_main_loops_use_16_byte_loads_and_stores(binaries_of, arch):
    """Every global load of an aligned logits main loop is 16 bytes wide (LDG.E.128), and so is every store of the
    backward."""
    bad = []
    for b in _streaming(binaries_of(arch)):
        loop = b["main_loop"]
        if not _aligned(b):
            continue
        if set(loop["loads"]) != {"LDG.E.128"}:
            bad.append(_describe(b))
        if b["kernel"] == "_logits_bwd_kernel" and set(loop["stores"]) != {"STG.E.128"}:
            bad.append(_describe(b))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("arch", [80, 90, 100])
def test_no_barrier_or_shared_memory_in_the_main_loops(binaries_of, arch):
    """The forward keeps a per-thread state (one block reduction per row, after the loop); the backward is
    elementwise. Neither may synchronise or stage through shared memory inside its loop, whatever the layout."""
    bad = [_describe(b) for b in _streaming(binaries_of(arch))
           if b["main_loop"]["barriers"] or b["main_loop"]["shared"]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("arch", [80, 90, 100])
def test_backward_orders_the_label_column_before_its_loop(binaries_of, arch):
    """In place, the label's logit is read before the loop by one thread while another warp may store that column
    in its loop: a block barrier between the read and the loop orders them (outside the loop, once per row)."""
    backward = [b for b in _streaming(binaries_of(arch)) if b["kernel"] == "_logits_bwd_kernel"]
    assert backward
    bad = [_describe(b) for b in backward if b["main_loop"]["barriers_before"] < 1]
    assert not bad, "\n".join(bad)


def test_unaligned_row_strides_fall_back_to_element_loads(compiled, binaries_of):
    """Logits whose row stride is not a multiple of 16 bytes (a contiguous [N, 50257] bf16 tensor, in place): the
    kernels take UNIT = 1, their loads and stores are 2 bytes wide, and they compile for every architecture (no
    spills: test_triton_compile.py); their cost per logit is in docs/triton-kernels.md, not held to the budget.
    Nothing the launchers allocate has such rows (the out-of-place gradient is padded to 16 bytes)."""
    for arch in (80, 90):
        binaries_of(arch)
        launched = _case_binaries(compiled, arch, UNALIGNED_CASE)
        assert {kernel for kernel, _, _ in launched} == set(aot.STREAMING_KERNELS), (arch, launched)
        for kernel, _, b in launched:
            assert not b["error"] and not _aligned(b), _describe(b)
            assert set(b["main_loop"]["loads"]) == {"LDG.E.U16"}, _describe(b)
