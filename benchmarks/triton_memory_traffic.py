"""Bytes moved by the Triton kernels' global loads and stores, counted under the interpreter.

Runs every kernel of the Triton backend on CPU tensors with TRITON_INTERPRET=1 and wraps the interpreter's
masked load/store handlers (``InterpreterBuilder.create_masked_load/create_masked_store`` in
triton/runtime/interpreter.py; unmasked ``tl.load``/``tl.store`` go through them too), counting only lanes
whose mask is true, times the element size. Each address is attributed to the tensor it falls in, so the
fused-linear rows report how often the weight and the hidden states are re-read.

Minimums: forward = logits read once + O(N) (labels, three fp32 outputs); backward = logits read once +
gradient written once + O(N) (labels, lse, entropy, two upstream gradients). Targets: forward <= 1.05x,
backward <= 1.1x.

    python benchmarks/triton_memory_traffic.py --out traffic.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before anything creates a @triton.jit function
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton.runtime.interpreter as interp  # noqa: E402

from sirl_kernels.backends import triton as tb  # noqa: E402
from sirl_kernels.backends.triton import utils  # noqa: E402


class Counter:
    """Attributes masked-lane bytes to registered tensors by address range."""

    def __init__(self):
        self.ranges: dict[str, tuple[int, int]] = {}
        self.reset()

    def reset(self):
        self.loads: dict[str, int] = {}
        self.stores: dict[str, int] = {}

    def track(self, **tensors):
        self.ranges = {}
        for name, t in tensors.items():
            if t is not None:
                start = t.data_ptr()
                self.ranges[name] = (start, start + t.untyped_storage().nbytes())

    def add(self, table, ptrs, mask, elem_bytes):
        addr = np.asarray(ptrs).reshape(-1)
        m = np.broadcast_to(np.asarray(mask), np.asarray(ptrs).shape).reshape(-1).astype(bool)
        counted = np.zeros_like(m)
        for name, (lo, hi) in self.ranges.items():
            inside = m & (addr >= lo) & (addr < hi)
            counted |= inside
            table[name] = table.get(name, 0) + int(inside.sum()) * elem_bytes
        rest = int((m & ~counted).sum()) * elem_bytes
        if rest:
            table["other"] = table.get("other", 0) + rest


COUNTER = Counter()
_orig_load = interp.InterpreterBuilder.create_masked_load
_orig_store = interp.InterpreterBuilder.create_masked_store


def _load(self, ptrs, mask, other, cache_policy, is_volatile):
    elem = ptrs.get_element_ty().primitive_bitwidth // 8
    COUNTER.add(COUNTER.loads, ptrs.data, mask.data, elem)
    return _orig_load(self, ptrs, mask, other, cache_policy, is_volatile)


def _store(self, ptrs, value, mask, cache_policy):
    elem = ptrs.get_element_ty().primitive_bitwidth // 8
    COUNTER.add(COUNTER.stores, ptrs.data, mask.data, elem)
    return _orig_store(self, ptrs, value, mask, cache_policy)


interp.InterpreterBuilder.create_masked_load = _load
interp.InterpreterBuilder.create_masked_store = _store


def _total(d):
    return sum(d.values())


def logits_rows(n, v, dtype, splits):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, v, generator=g).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    esz = logits.element_size()
    rows = []
    with utils.force_num_splits(splits):
        COUNTER.track(logits=logits, labels=labels)
        COUNTER.reset()
        lp, h, lse = tb.logits_forward(logits, labels, 1.0, -100)
        minimum = n * v * esz + n * (8 + 3 * 4)
        moved = _total(COUNTER.loads) + _total(COUNTER.stores)
        rows.append({
            "kernel": f"logits forward ({dtype_name(dtype)}, splits={splits})", "shape": f"N={n} V={v}",
            "bytes": moved, "minimum": minimum, "ratio": moved / minimum,
            "logits_read_factor": COUNTER.loads.get("logits", 0) / (n * v * esz), "target": 1.05,
        })
        grad = torch.empty_like(logits)
        COUNTER.track(logits=logits, labels=labels, grad=grad)
        COUNTER.reset()
        with utils.quiet():
            from sirl_kernels.backends.triton import logits as tlog
            tlog.logits_backward(g_lp, g_h, logits, labels, lse, h, 1.0, -100, out=grad)
        minimum = 2 * n * v * esz + n * (8 + 4 * 4)
        moved = _total(COUNTER.loads) + _total(COUNTER.stores)
        rows.append({
            "kernel": f"logits backward ({dtype_name(dtype)}, splits={splits})", "shape": f"N={n} V={v}",
            "bytes": moved, "minimum": minimum, "ratio": moved / minimum,
            "logits_read_factor": COUNTER.loads.get("logits", 0) / (n * v * esz),
            "grad_write_factor": COUNTER.stores.get("grad", 0) / (n * v * esz), "target": 1.1,
        })
    return rows


def linear_rows(n, d, v, dtype, gpu_tiles):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    tiles = "GPU tiles" if gpu_tiles else "interpreter tiles"
    real_blocks = utils.linear_blocks
    if gpu_tiles:
        # the tiles utils.linear_blocks picks on a GPU, measured here under the interpreter
        def fake_blocks(n_, v_, d_, device):
            nx = utils.next_pow2
            return {"BLOCK_N": max(16, min(64, nx(n_))), "BLOCK_V": max(16, min(128, nx(v_))),
                    "BLOCK_D": max(16, min(64, nx(d_))), "BLOCK_DO": max(16, min(256, nx(d_))),
                    "num_warps": 8, "num_stages": 3}

        utils.linear_blocks = fake_blocks
    try:
        cfg = utils.linear_blocks(n, v, d, hidden.device)
        wbytes, hbytes = weight.numel() * weight.element_size(), hidden.numel() * hidden.element_size()
        COUNTER.track(hidden=hidden, weight=weight, bias=bias, labels=labels)
        COUNTER.reset()
        lp, h, lse = tb.linear_forward(hidden, weight, bias, labels, 1.0, -100, 0)
        rows = [{
            "kernel": f"linear forward ({dtype_name(dtype)}, {tiles})", "shape": f"N={n} D={d} V={v}",
            "tiles": {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D", "BLOCK_DO")},
            "bytes": _total(COUNTER.loads) + _total(COUNTER.stores),
            "weight_read_factor": COUNTER.loads.get("weight", 0) / wbytes,
            "hidden_read_factor": COUNTER.loads.get("hidden", 0) / hbytes,
            # everything stored beyond the three fp32 outputs [N] (0: no logits tile reaches memory)
            "logits_bytes_written": _total(COUNTER.stores) - 3 * 4 * n,
        }]
        COUNTER.reset()
        tb.linear_backward(g_lp, g_h, hidden, weight, bias, labels, lse, h, 1.0, -100, 0)
        rows.append({
            "kernel": f"linear backward ({dtype_name(dtype)}, {tiles})", "shape": f"N={n} D={d} V={v}",
            "tiles": {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D", "BLOCK_DO")},
            "bytes": _total(COUNTER.loads) + _total(COUNTER.stores),
            "weight_read_factor": COUNTER.loads.get("weight", 0) / wbytes,
            "hidden_read_factor": COUNTER.loads.get("hidden", 0) / hbytes,
        })
    finally:
        utils.linear_blocks = real_blocks
    return rows


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--v", type=int, default=32768 + 77)
    args = ap.parse_args(argv)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for splits in (1, 4):
            rows += logits_rows(args.n, args.v, dtype, splits)
    rows += linear_rows(128, 64, 4096 + 33, torch.float32, gpu_tiles=False)
    rows += linear_rows(128, 64, 1024 + 33, torch.bfloat16, gpu_tiles=True)

    print("| kernel | shape | bytes moved | minimum | ratio | target | notes |")
    print("|---|---|---:|---:|---:|---:|---|")
    ok = True
    for r in rows:
        if "ratio" in r:
            notes = f"logits read x{r['logits_read_factor']:.3f}"
            if "grad_write_factor" in r:
                notes += f", grad written x{r['grad_write_factor']:.3f}"
            ok &= r["ratio"] <= r["target"]
            print(f"| {r['kernel']} | {r['shape']} | {r['bytes']:,} | {r['minimum']:,} | {r['ratio']:.4f} | "
                  f"<= {r['target']} | {notes} |")
        else:
            notes = (f"weight read x{r['weight_read_factor']:.2f}, hidden read x{r['hidden_read_factor']:.2f}, "
                     f"tiles {r['tiles']}")
            if "logits_bytes_written" in r:
                notes += f", logits bytes written {r['logits_bytes_written']}"
            print(f"| {r['kernel']} | {r['shape']} | {r['bytes']:,} | - | - | - | {notes} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "targets_met": bool(ok)}, f, indent=2)
    print(f"\ntargets met: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
