"""Bytes moved by the Triton kernels' optional-statistics specialisations, counted under the interpreter against the
plain specialisation on the same inputs (``benchmarks/triton_memory_traffic.py``'s counter: the active lanes of
every global load and store, attributed to the tensors they fall in).

The design's budget, asserted exactly at one small shape per kernel, unsplit and split-V:

- a forward asked for k of self-certainty / varentropy (``rows.Extras``) reads exactly what the plain one reads (the
  logits, or hidden / weight / bias, once: no second pass) and writes 4 B x N more per extra output; split-V, each
  extra also has a partial state [N, S] written by the split kernel and read back by the merge (8 B x N x S);
- a backward with k of the gamma / delta terms (``rows.Coefficients``) reads 4 B x N more per extra coefficient per
  program that reads a row's coefficients (the S splits of the logits backward, every vocabulary tile of the
  fused-linear dlogits kernel) and writes the same gradient; the matmul flops are the plain ones.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from sirl_kernels.backends import triton as tb
from sirl_kernels.backends.rows import LinearRows, Rows, logprob_entropy_coefficients

ROOT = Path(__file__).resolve().parents[3]
OUT_B = COEF_B = 4  # one fp32 value a row: an extra output, a partial state, a coefficient
OUTPUTS = {"sc": ("self_certainty",), "ve": ("varentropy",), "both": ("self_certainty", "varentropy")}
TERMS = {"gamma": ("gamma",), "delta": ("delta",), "both": ("gamma", "delta")}


def _interpreting() -> bool:
    if tb._IMPORT_ERROR is not None:
        return False
    from sirl_kernels.backends.triton import utils

    return utils.INTERPRET


pytestmark = pytest.mark.skipif(not _interpreting(),
                                reason="counts the Triton interpreter's loads and stores (TRITON_INTERPRET=1)")


@pytest.fixture(scope="module")
def traffic():
    """benchmarks/triton_memory_traffic.py as a module: its ``Counter``, ``measure`` and the instrumentation."""
    path = ROOT / "benchmarks" / "triton_memory_traffic.py"
    if not (path.exists() and (ROOT / "tools" / "triton_instrument.py").exists()):
        pytest.skip("needs the checkout's benchmarks/ and tools/ (not installed)")
    spec = importlib.util.spec_from_file_location("_sirl_triton_memory_traffic", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _count(traffic, fn, **tensors):
    """(result, loads, stores) of ``fn()``, bytes by tracked tensor ("other": what the backend allocates)."""
    with traffic.instrument.watch_memory(traffic.COUNTER.on_access):
        return traffic.measure(fn, **tensors)


def _total(loads, stores):
    return sum(loads.values()) + sum(stores.values())


def _splits_run(traffic, v, block_v, wanted):
    """The split count a kernel runs with ``wanted`` forced, over vocabulary tiles of ``block_v``; the split cases
    must really split, or they would test the unsplit path twice."""
    s = traffic.utils.split_chunk(v, block_v, min(wanted, traffic.utils.cdiv(v, block_v)))[1]
    assert (s > 1) == (wanted > 1), (v, block_v, wanted, s)
    return s


# --- logits kernels: N = 4 bf16 rows of V = 8200 (three tiles of 4096 under the interpreter) ------------------
N, V = 4, 8200


def _logits_case():
    g = torch.Generator().manual_seed(30)
    logits = (torch.randn(N, V, generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=g)
    return logits, labels, g


def _logits_split(traffic, splits):
    tile = traffic.utils.tile_width(traffic.utils.logits_tiles(V, torch.bfloat16, traffic.utils.INTERPRETER))
    return _splits_run(traffic, V, tile, splits)


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("which", list(OUTPUTS))
def test_logits_forward_extras_write_4_bytes_a_row_each(traffic, which, splits):
    logits, labels, _ = _logits_case()
    s = _logits_split(traffic, splits)
    rows = Rows(logits, labels, 1.0, -100)
    extras = traffic.extras_for(N, OUTPUTS[which])
    with traffic.utils.force_num_splits(splits):
        _, plain_loads, plain_stores = _count(traffic, lambda: tb.logits_forward(rows), logits=logits, labels=labels)
        _, loads, stores = _count(traffic, lambda: tb.logits_forward(rows, extras), logits=logits, labels=labels,
                                  **extras._asdict())
    # one pass over the logits plus the label's logit, as the plain kernel: a second pass fails here
    assert loads["logits"] == plain_loads["logits"] == N * V * logits.element_size() + N * logits.element_size()
    assert loads["labels"] == plain_loads["labels"]
    for name in OUTPUTS[which]:
        assert stores[name] == OUT_B * N, name
    k = len(OUTPUTS[which])
    partial_states = 2 * OUT_B * N * s if s > 1 else 0  # each extra's [N, S] written, then read by the merge
    assert _total(loads, stores) - _total(plain_loads, plain_stores) == k * (OUT_B * N + partial_states)
    assert sum(loads.values()) - sum(plain_loads.values()) == k * partial_states // 2


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("which", list(TERMS))
def test_logits_backward_terms_read_4_bytes_a_row_each(traffic, which, splits):
    logits, labels, g = _logits_case()
    s = _logits_split(traffic, splits)
    rows = Rows(logits, labels, 1.0, -100)
    _, h, stats = tb.logits_forward(rows)
    plain = logprob_entropy_coefficients(torch.randn(N, generator=g), torch.randn(N, generator=g), h)
    coef = traffic.with_terms(plain, TERMS[which], g)
    grad = torch.empty_like(logits)
    tracked = dict(logits=logits, labels=labels, stats=stats, grad=grad)
    with traffic.utils.force_num_splits(splits):
        _, plain_loads, plain_stores = _count(traffic, lambda: tb.logits_backward(rows, stats, plain, out=grad),
                                              **tracked)
        _, loads, stores = _count(traffic, lambda: tb.logits_backward(rows, stats, coef, out=grad), **tracked,
                                  **{name: getattr(coef, name) for name in TERMS[which]})
    esz = logits.element_size()
    assert loads["logits"] == plain_loads["logits"] == N * V * esz + N * esz
    # the gradient once, the label's column rewritten after the loop, as by the plain kernel
    assert stores["grad"] == plain_stores["grad"] == N * V * esz + N * esz
    assert loads["stats"] == plain_loads["stats"] and loads["labels"] == plain_loads["labels"]
    for name in TERMS[which]:
        assert loads[name] == COEF_B * N * s, name  # once per program of the row (its split)
    assert _total(stores, {}) == _total(plain_stores, {})
    assert _total(loads, stores) - _total(plain_loads, plain_stores) == len(TERMS[which]) * COEF_B * N * s


# --- the fused linear: N = 16, D = 32, V = 2100 fp32 (three vocabulary tiles of 1024 under the interpreter) ----
LN, LD, LV, CHUNK = 16, 32, 2100, 4096  # CHUNK >= N: the backward runs one vocabulary chunk


def _linear_case():
    g = torch.Generator().manual_seed(31)
    hidden = torch.randn(LN, LD, generator=g)
    weight = torch.randn(LV, LD, generator=g) / LD**0.5
    bias = torch.randn(LV, generator=g)
    labels = torch.randint(0, LV, (LN,), generator=g)
    return dict(hidden=hidden, weight=weight, bias=bias, labels=labels), g


def _block_v(traffic):
    return traffic.utils.linear_logits_blocks(LN, LV, LD, torch.float32, traffic.utils.INTERPRETER)["BLOCK_V"]


@pytest.mark.parametrize("splits", [1, 2])
@pytest.mark.parametrize("which", list(OUTPUTS))
def test_linear_forward_extras_write_4_bytes_a_row_each(traffic, which, splits):
    inputs, _ = _linear_case()
    s = _splits_run(traffic, LV, _block_v(traffic), splits)
    rows = LinearRows(*inputs.values(), 1.0, -100)
    extras = traffic.extras_for(LN, OUTPUTS[which])
    with traffic.utils.force_num_splits(splits), traffic.instrument.count_dot_flops() as dots:
        _, plain_loads, plain_stores = _count(traffic, lambda: tb.linear_forward(rows, CHUNK), **inputs)
        plain_flops = dots["flops"]
        _, loads, stores = _count(traffic, lambda: tb.linear_forward(rows, CHUNK, extras), **inputs,
                                  **extras._asdict())
        flops = dots["flops"] - plain_flops
    for name in inputs:  # hidden and weight tiles read as often as by the plain kernel: no second pass
        assert loads[name] == plain_loads[name], name
    for name in OUTPUTS[which]:
        assert stores[name] == OUT_B * LN, name
    k = len(OUTPUTS[which])
    partial_states = 2 * OUT_B * LN * s if s > 1 else 0
    assert _total(loads, stores) - _total(plain_loads, plain_stores) == k * (OUT_B * LN + partial_states)
    assert flops == plain_flops > 0


@pytest.mark.parametrize("which", list(TERMS))
def test_linear_backward_terms_read_4_bytes_a_row_each_per_vocabulary_tile(traffic, which):
    inputs, g = _linear_case()
    rows = LinearRows(*inputs.values(), 1.0, -100)
    _, h, stats = tb.linear_forward(rows, CHUNK)
    plain = logprob_entropy_coefficients(torch.randn(LN, generator=g), torch.randn(LN, generator=g), h)
    coef = traffic.with_terms(plain, TERMS[which], g)
    tiles = traffic.utils.cdiv(LV, _block_v(traffic))  # dlogits programs per row: one chunk of all columns
    assert tiles > 1

    def run(c):
        return traffic.instrument.torch_matmul_flops(lambda: tb.linear_backward(rows, stats, c, CHUNK,
                                                                                (True, True, True)))

    with traffic.instrument.count_dot_flops() as dots:
        plain_mm, plain_loads, plain_stores = _count(traffic, lambda: run(plain), **inputs, stats=stats)
        plain_dots = dots["flops"]
        mm, loads, stores = _count(traffic, lambda: run(coef), **inputs, stats=stats,
                                   **{name: getattr(coef, name) for name in TERMS[which]})
        dot_flops = dots["flops"] - plain_dots
    for name in (*inputs, "stats"):
        assert loads[name] == plain_loads[name], name
    for name in TERMS[which]:
        assert loads[name] == COEF_B * LN * tiles, name
    assert _total(loads, stores) - _total(plain_loads, plain_stores) == len(TERMS[which]) * COEF_B * LN * tiles
    assert (dot_flops, mm) == (plain_dots, plain_mm)
