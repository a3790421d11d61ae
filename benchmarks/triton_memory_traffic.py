"""Bytes moved by the Triton kernels' global loads and stores, and their matmul flops, counted under the
interpreter.

Runs every kernel of the Triton backend on CPU tensors with TRITON_INTERPRET=1 and wraps the interpreter's
masked load/store handlers (``instrument.watch_memory``; unmasked ``tl.load``/``tl.store`` go through them too),
counting only lanes whose mask is true, times the element size. Each address is attributed to the tensor it
falls in, so the fused-linear rows report how often the weight and the hidden states are re-read.

Minimums: forward = logits read once + O(N) (int64 labels read; fp32 logprob, entropy and [N, 2] row stats
written: 8 + 4 + 4 + 8 bytes a row); backward = logits read once + gradient written once + O(N) (int64 labels,
the [N, 2] fp32 row stats (max, log-sum), fp32 entropy and the two fp32 upstream gradients read: 8 + 8 + 3 x 4
bytes a row). Targets: forward <= 1.05x, backward <= 1.1x.

It also counts the matmul work: every ``tl.dot`` the interpreter runs (``instrument.count_dot_flops``, 2·M·N·K of the
tile shapes as launched) and every torch matmul (``instrument.torch_matmul_flops``: the backward's dX and dW
products, cuBLAS on a GPU). The fused-linear rows with "GPU tiles" use the tile table the launchers pick for an
H100 (``utils.tile_target``), at D = 1024 and D = 4096; target forward + backward <= 8.2·N·D·V. (HBM traffic through
the L2 at realistic sizes is the model's: ``python -m tools.gpu_model``.)

The optional statistics' specialisations (self-certainty / varentropy outputs through ``rows.Extras``, the
backward's gamma / delta terms through ``rows.Coefficients``) are counted against the plain kernel on the same
inputs, and must differ from it by exactly the design's per-row bytes (``extra_bytes_expected``): a forward with k
extra outputs reads what the plain one reads and writes 4·k bytes a row more (split-V: plus the k partial states
[N, S] written and read back by the merge, 8·k·S bytes a row); a backward with k extra coefficients reads 4·k bytes
more per program that reads the row's coefficients (the S splits of the logits backward; every vocabulary tile of
the fused-linear dlogits kernel). Their matmul flops must be the plain ones.

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

from sirl_kernels.backends import triton as tb  # noqa: E402
from sirl_kernels.backends.rows import Extras, LinearRows, Rows, logprob_entropy_coefficients  # noqa: E402
from sirl_kernels.backends.triton import linear as tlin  # noqa: E402
from sirl_kernels.backends.triton import utils  # noqa: E402
from tools import triton_instrument as instrument  # noqa: E402

# O(N) bytes a row: int64 label, fp32 logprob and entropy, the [N, 2] fp32 row stats, fp32 backward coefficients
LABEL_B, OUT_B, STATS_B, GRAD_B = 8, 4, 2 * 4, 4
FWD_ROW_BYTES = LABEL_B + 2 * OUT_B + STATS_B  # labels read; logprob, entropy and stats written
BWD_ROW_BYTES = LABEL_B + STATS_B + 3 * GRAD_B  # labels, stats and the three coefficients (alpha, beta, lam) read


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

    def on_access(self, kind, addresses, elem_bytes):
        """``instrument.watch_memory`` callback: the active lanes' byte addresses of one load or store."""
        table = self.loads if kind == "load" else self.stores
        counted = np.zeros(addresses.shape, dtype=bool)
        for name, (lo, hi) in self.ranges.items():
            inside = (addresses >= lo) & (addresses < hi)
            counted |= inside
            table[name] = table.get(name, 0) + int(inside.sum()) * elem_bytes
        rest = int((~counted).sum()) * elem_bytes
        if rest:
            table["other"] = table.get("other", 0) + rest


COUNTER = Counter()


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
        lp, h, stats = tb.logits_forward(Rows(logits, labels, 1.0, -100))
        minimum = n * v * esz + n * FWD_ROW_BYTES
        moved = _total(COUNTER.loads) + _total(COUNTER.stores)
        rows.append({
            "kernel": f"logits forward ({dtype_name(dtype)}, splits={splits})", "shape": f"N={n} V={v}",
            "bytes": moved, "minimum": minimum, "ratio": moved / minimum,
            "logits_read_factor": COUNTER.loads.get("logits", 0) / (n * v * esz), "target": 1.05,
        })
        grad = torch.empty_like(logits)
        COUNTER.track(logits=logits, labels=labels, grad=grad)
        COUNTER.reset()
        tb.logits_backward(Rows(logits, labels, 1.0, -100), stats, logprob_entropy_coefficients(g_lp, g_h, h), out=grad)
        minimum = 2 * n * v * esz + n * BWD_ROW_BYTES
        moved = _total(COUNTER.loads) + _total(COUNTER.stores)
        rows.append({
            "kernel": f"logits backward ({dtype_name(dtype)}, splits={splits})", "shape": f"N={n} V={v}",
            "bytes": moved, "minimum": minimum, "ratio": moved / minimum,
            "logits_read_factor": COUNTER.loads.get("logits", 0) / (n * v * esz),
            "grad_write_factor": COUNTER.stores.get("grad", 0) / (n * v * esz), "target": 1.1,
        })
    return rows


def _linear_case(n, d, v, dtype, seed):
    """hidden, weight (scaled by 1/sqrt(D)), bias, labels, the two upstream gradients, and the generator."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) / d**0.5).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, bias, labels, torch.randn(n, generator=g), torch.randn(n, generator=g), g


def linear_rows(n, d, v, dtype, gpu_tiles, chunk_size=4096, needs=(True, True, True)):
    """Bytes and ``tl.dot`` flops (as multiples of N·D·V) of the fused-linear forward and backward."""
    hidden, weight, bias, labels, g_lp, g_h, g = _linear_case(n, d, v, dtype, seed=1)
    # the tiles the launchers pick for an H100 (sm_90), measured here under the interpreter
    target = utils.GPU_TARGETS[90] if gpu_tiles else utils.INTERPRETER
    tiles = "GPU tiles" if gpu_tiles else "interpreter tiles"
    frozen = {(True, False, False): ", frozen weight", (True, True, True): ""}[tuple(needs)]
    ndv = n * d * v
    wbytes, hbytes = weight.numel() * weight.element_size(), hidden.numel() * hidden.element_size()
    cfg = utils.linear_logits_blocks(n, v, d, dtype, target)
    with utils.tile_target(target), instrument.count_dot_flops() as dots:
        COUNTER.track(hidden=hidden, weight=weight, bias=bias, labels=labels)
        COUNTER.reset()
        lp, h, stats = tb.linear_forward(LinearRows(hidden, weight, bias, labels, 1.0, -100), chunk_size)
        fwd_flops = dots["flops"]
        rows = [{
            "kernel": f"linear forward ({dtype_name(dtype)}, {tiles})", "shape": f"N={n} D={d} V={v}",
            "tiles": {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")},
            "bytes": _total(COUNTER.loads) + _total(COUNTER.stores),
            "flops_per_ndv": fwd_flops / ndv,
            "weight_read_factor": COUNTER.loads.get("weight", 0) / wbytes,
            "hidden_read_factor": COUNTER.loads.get("hidden", 0) / hbytes,
            # all the forward stores: the outputs and, split-V, the partial states; no logits tile
            "bytes_stored": _total(COUNTER.stores), "logits_fp32_bytes": 4 * n * v,
        }]
        COUNTER.reset()
        mm_flops = instrument.torch_matmul_flops(
            lambda: tb.linear_backward(LinearRows(hidden, weight, bias, labels, 1.0, -100), stats,
                                       logprob_entropy_coefficients(g_lp, g_h, h), chunk_size, needs))
        rows.append({
            "kernel": f"linear backward ({dtype_name(dtype)}, {tiles}{frozen})", "shape": f"N={n} D={d} V={v}",
            "tiles": {k: cfg[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_D")},
            "bytes": _total(COUNTER.loads) + _total(COUNTER.stores),
            "flops_per_ndv": (dots["flops"] - fwd_flops + mm_flops) / ndv,
            "weight_read_factor": COUNTER.loads.get("weight", 0) / wbytes,
            "hidden_read_factor": COUNTER.loads.get("hidden", 0) / hbytes,
            # what the backend allocates, so untracked: the dz workspace, the fp32 accumulators and the gradients
            "untracked_bytes_moved": COUNTER.loads.get("other", 0) + COUNTER.stores.get("other", 0),
            "workspace_bytes": min(chunk_size, n) * v * hidden.element_size(),
        })
    return rows


# --- the optional statistics: extra forward outputs and backward terms against the plain specialisation ---------
# named as in rows.Extras / rows.Coefficients
EXTRA_OUTPUTS = {"self-certainty": ("self_certainty",), "varentropy": ("varentropy",),
                 "self-certainty + varentropy": ("self_certainty", "varentropy")}
EXTRA_TERMS = {"gamma": ("gamma",), "delta": ("delta",), "gamma + delta": ("gamma", "delta")}


def extras_for(n, names):
    """``rows.Extras`` with fresh [n] fp32 outputs for ``names``, or None (the plain specialisation)."""
    return Extras(**{name: torch.empty(n, dtype=torch.float32) for name in names}) if names else None


def with_terms(coef, names, gen):
    """``coef`` with random [N] fp32 coefficients for ``names`` (gamma: varentropy's term, delta: self-certainty's)."""
    return coef._replace(**{name: torch.randn(coef.alpha.shape[0], generator=gen) for name in names})


def measure(fn, **tensors):
    """(result of ``fn()``, loads, stores): bytes by tracked tensor (``Counter``; "other" for the rest). Call it
    within ``instrument.watch_memory(COUNTER.on_access)``."""
    COUNTER.track(**tensors)
    COUNTER.reset()
    result = fn()
    return result, dict(COUNTER.loads), dict(COUNTER.stores)


def extra_bytes_expected(kind, n, k, programs_per_row):
    """Bytes the design says a specialisation with ``k`` extra outputs (forward) or coefficients (backward) moves
    beyond the plain one: ``programs_per_row`` is the splits S of a forward (S > 1: each extra also has a partial
    state [N, S] written and read back by the merge), the programs that read a row's coefficients in a backward."""
    if kind == "forward":
        return k * OUT_B * n * (1 + (2 * programs_per_row if programs_per_row > 1 else 0))
    return k * GRAD_B * n * programs_per_row


def logits_splits(v, dtype, splits):
    """The split count the logits kernels run with ``splits`` forced (``utils.split_chunk`` of their tiles)."""
    tile = utils.tile_width(utils.logits_tiles(v, dtype, utils.INTERPRETER))
    return utils.split_chunk(v, tile, max(1, min(splits, utils.cdiv(v, tile))))[1]


def linear_vocab_tiles(n, d, v, dtype, chunk_size):
    """Vocabulary tiles of the fused-linear backward per row: each dlogits program reads its rows' coefficients."""
    cfg = utils.linear_logits_blocks(n, v, d, dtype, utils.target_of(torch.device("cpu")))
    _, cols = tlin.chunk_plan(n, v, chunk_size, cfg["BLOCK_N"], cfg["BLOCK_V"])
    return sum(utils.cdiv(min(cols, v - v0), cfg["BLOCK_V"]) for v0 in range(0, v, cols))


def _extras_row(kernel, shape, plain, counted, inputs, expected, k, n, flops=None):
    """One row of the extras table: ``plain`` and ``counted`` are (loads, stores) dicts of the same inputs."""
    (pl, ps), (cl, cs) = plain, counted
    extra = _total(cl) + _total(cs) - _total(pl) - _total(ps)
    # "the same reads": every input (logits or hidden / weight / bias, labels) loaded exactly as often
    same_inputs = all(cl.get(name, 0) == pl.get(name, 0) for name in inputs)
    row = {"kernel": kernel, "shape": shape, "plain_bytes": _total(pl) + _total(ps), "bytes": _total(cl) + _total(cs),
           "extra_loaded": _total(cl) - _total(pl), "extra_stored": _total(cs) - _total(ps),
           "extra_expected": expected, "extra_per_row_each": extra / (n * k), "inputs_read_as_plain": same_inputs,
           "exact": extra == expected and same_inputs}
    if flops is not None:
        row["flops"], row["plain_flops"] = flops
        row["exact"] &= flops[0] == flops[1]
    return row


def logits_extras_rows(n, v, dtype, splits):
    """The logits forward with each ``EXTRA_OUTPUTS`` and the backward with each ``EXTRA_TERMS``, against plain."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(n, v, generator=g).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    g_lp, g_h = torch.randn(n, generator=g), torch.randn(n, generator=g)
    shape, s = f"N={n} V={v}", logits_splits(v, dtype, splits)
    tag = f"{dtype_name(dtype)}, splits={splits}" + ("" if s == splits else f": {s} run")
    rows = []
    with utils.force_num_splits(splits):
        def forward(names):
            ex = extras_for(n, names)
            return measure(lambda: tb.logits_forward(Rows(logits, labels, 1.0, -100), ex), logits=logits,
                           labels=labels, **(ex._asdict() if ex else {}))

        (lp, h, stats), *plain = forward(())
        for label, names in EXTRA_OUTPUTS.items():
            _, *counted = forward(names)
            rows.append(_extras_row(f"logits forward + {label} ({tag})", shape, plain, counted, ("logits", "labels"),
                                    extra_bytes_expected("forward", n, len(names), s), len(names), n))
        coef = logprob_entropy_coefficients(g_lp, g_h, h)
        grad = torch.empty_like(logits)

        def backward(names):
            c = with_terms(coef, names, g)
            return measure(lambda: tb.logits_backward(Rows(logits, labels, 1.0, -100), stats, c, out=grad),
                           logits=logits, labels=labels, grad=grad, stats=stats)

        _, *plain = backward(())
        for label, names in EXTRA_TERMS.items():
            _, *counted = backward(names)
            rows.append(_extras_row(f"logits backward + {label} ({tag})", shape, plain, counted,
                                    ("logits", "labels", "stats"), extra_bytes_expected("backward", n, len(names), s),
                                    len(names), n))
    return rows


def linear_extras_rows(n, d, v, dtype, splits, gpu_tiles=False, chunk_size=4096, outputs=EXTRA_OUTPUTS,
                       terms=EXTRA_TERMS):
    """The fused-linear forward with each of ``outputs`` and the backward with each of ``terms``, against plain:
    bytes and flops (``tl.dot`` and, in the backward, the torch matmuls)."""
    hidden, weight, bias, labels, g_lp, g_h, g = _linear_case(n, d, v, dtype, seed=3)
    target = utils.GPU_TARGETS[90] if gpu_tiles else utils.INTERPRETER
    shape = f"N={n} D={d} V={v}"
    tiles_of = "GPU" if gpu_tiles else "interpreter"
    inputs = dict(hidden=hidden, weight=weight, bias=bias, labels=labels)
    lin = LinearRows(hidden, weight, bias, labels, 1.0, -100)
    rows = []
    with utils.tile_target(target), utils.force_num_splits(splits):
        cfg = utils.linear_logits_blocks(n, v, d, dtype, target)
        s = utils.split_chunk(v, cfg["BLOCK_V"], max(1, min(splits, utils.cdiv(v, cfg["BLOCK_V"]))))[1]
        tag = f"{dtype_name(dtype)}, {tiles_of} tiles, splits={splits}" + ("" if s == splits else f": {s} run")

        def forward(names):
            ex = extras_for(n, names)
            with instrument.count_dot_flops() as dots:
                out = measure(lambda: tb.linear_forward(lin, chunk_size, ex), **inputs, **(ex._asdict() if ex else {}))
            return (*out, dots["flops"])

        (lp, h, stats), *plain, plain_flops = forward(())
        for label, names in outputs.items():
            _, *counted, flops = forward(names)
            rows.append(_extras_row(f"linear forward + {label} ({tag})", shape, plain, counted, tuple(inputs),
                                    extra_bytes_expected("forward", n, len(names), s), len(names), n,
                                    (flops, plain_flops)))
        if not terms:
            return rows
        coef = logprob_entropy_coefficients(g_lp, g_h, h)
        tiles = linear_vocab_tiles(n, d, v, dtype, chunk_size)

        def backward(names):
            """(loads, stores, flops): the tl.dot flops and the torch matmuls' (dX, dW)."""
            c = with_terms(coef, names, g)
            run = lambda: tb.linear_backward(lin, stats, c, chunk_size, (True, True, True))  # noqa: E731
            with instrument.count_dot_flops() as dots:
                mm, loads, stores = measure(lambda: instrument.torch_matmul_flops(run), **inputs, stats=stats)
            return loads, stores, dots["flops"] + mm

        *plain, plain_flops = backward(())
        for label, names in terms.items():
            *counted, flops = backward(names)
            rows.append(_extras_row(f"linear backward + {label} ({dtype_name(dtype)}, {tiles_of} tiles)", shape,
                                    plain, counted, (*inputs, "stats"),
                                    extra_bytes_expected("backward", n, len(names), tiles), len(names), n,
                                    (flops, plain_flops)))
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
    with instrument.watch_memory(COUNTER.on_access):
        for dtype in (torch.float32, torch.bfloat16):
            for splits in (1, 4):
                rows += logits_rows(args.n, args.v, dtype, splits)
        rows += linear_rows(128, 64, 4096 + 33, torch.float32, gpu_tiles=False)
        # the fused-linear work with the GPU tile table at D >= 1024: forward 2, backward 6 (4 with a frozen
        # weight) times N·D·V; target forward + backward <= 8.2
        rows += linear_rows(64, 1024, 2048, torch.bfloat16, gpu_tiles=True)
        rows += linear_rows(64, 4096, 512, torch.bfloat16, gpu_tiles=True)
        rows += linear_rows(64, 1024, 2048, torch.bfloat16, gpu_tiles=True, needs=(True, False, False))[1:]
        extras = []
        for dtype in (torch.float32, torch.bfloat16):
            for splits in (1, 4):
                extras += logits_extras_rows(args.n, args.v, dtype, splits)
        extras += linear_extras_rows(128, 64, 4096 + 33, torch.float32, 1)
        extras += linear_extras_rows(128, 64, 4096 + 33, torch.float32, 3, terms={})  # the backward does not split
        # the GPU tile table: the flops stay 2 + 6 times N·D·V with both statistics
        both = {k: v for k, v in EXTRA_OUTPUTS.items() if len(v) == 2}
        extras += linear_extras_rows(64, 1024, 2048, torch.bfloat16, 1, gpu_tiles=True, outputs=both,
                                     terms={"gamma + delta": ("gamma", "delta")})

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
            notes = (f"**{r['flops_per_ndv']:.2f}·NDV flops**, weight read x{r['weight_read_factor']:.2f}, "
                     f"hidden read x{r['hidden_read_factor']:.2f}, tiles {r['tiles']}")
            if "bytes_stored" in r:
                notes += f", {r['bytes_stored']:,} B stored (the fp32 logits: {r['logits_fp32_bytes']:,} B)"
            if "workspace_bytes" in r:
                notes += (f", workspace {r['workspace_bytes']:,} B (dz); {r['untracked_bytes_moved']:,} B moved "
                          "through it, the fp32 accumulators and the gradients")
            print(f"| {r['kernel']} | {r['shape']} | {r['bytes']:,} | - | - | - | {notes} |")
    # forward + backward flops of each GPU-tile shape (full gradients)
    for fwd, bwd in zip(rows, rows[1:]):
        if "GPU tiles" in fwd["kernel"] and "forward" in fwd["kernel"] and "frozen" not in bwd["kernel"]:
            total = fwd["flops_per_ndv"] + bwd["flops_per_ndv"]
            ok &= total <= 8.2
            print(f"fused linear {fwd['shape']}: forward + backward = {total:.2f}·NDV flops (target <= 8.2)")
    print("\nThe optional statistics against the plain specialisation (same inputs): bytes beyond plain, by the design "
          "4 B a row per extra output or coefficient (split-V forward: plus its partial states; backward: per "
          "program reading the row)\n")
    print("| kernel | shape | plain bytes | bytes | extra loaded | extra stored | expected extra | B/row each | "
          "inputs read as plain | flops as plain | exact |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---|---|")
    for r in extras:
        ok &= r["exact"]
        same_flops = "-" if "flops" not in r else str(r["flops"] == r["plain_flops"])
        print(f"| {r['kernel']} | {r['shape']} | {r['plain_bytes']:,} | {r['bytes']:,} | {r['extra_loaded']:,} | "
              f"{r['extra_stored']:,} | {r['extra_expected']:,} | {r['extra_per_row_each']:.1f} | "
              f"{r['inputs_read_as_plain']} | {same_flops} | {r['exact']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "extras": extras, "targets_met": bool(ok)}, f, indent=2)
    print(f"\ntargets met: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
