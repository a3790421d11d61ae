"""The cost of ``batch_invariant=True``: the forward of each backend that runs here, default vs batch-invariant, in
one process (the ratio is the figure; absolute times depend on the machine and its load).

    python benchmarks/bench_batch_invariant.py                 # CPU: the "cpu" and "torch" backends
    python benchmarks/bench_batch_invariant.py --backends cpu --threads 1 2

Logits input: ``token_stats`` (log-prob, entropy) of ``[N, V]`` logits. Fused linear: ``linear_token_stats`` of
``hidden [N, D] @ weight[V, D].T``. GPU backends ("triton", "cuda") are costed by count in the README (their
batch-invariant mode changes split counts and tiles, not the work per logit); run this on a GPU to time them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_seconds  # noqa: E402

import sirl_kernels as sk  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _logits_case(backend, n, v, dtype, invariant):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, v, generator=g) * 3).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    return lambda: sk.token_stats(x, y, backend=backend, batch_invariant=invariant)


def _linear_case(backend, n, d, v, dtype, invariant):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(v, d, generator=g) / d ** 0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    return lambda: sk.linear_token_stats(h, w, y, backend=backend, batch_invariant=invariant)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", default=["cpu", "torch"])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--logits", nargs=2, type=int, default=[256, 151936], metavar=("N", "V"))
    parser.add_argument("--linear", nargs=3, type=int, default=[256, 576, 49152], metavar=("N", "D", "V"))
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    rows = []
    print("| backend | op | shape | dtype | threads | default ms | batch-invariant ms | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for backend in args.backends:
            for dtype_name in args.dtypes:
                dtype = DTYPES[dtype_name]
                cases = [("logits", "N=%d V=%d" % tuple(args.logits),
                          lambda inv: _logits_case(backend, *args.logits, dtype, inv)),
                         ("fused linear", "N=%d D=%d V=%d" % tuple(args.linear),
                          lambda inv: _linear_case(backend, *args.linear, dtype, inv))]
                for op, shape, make in cases:
                    times = [median_seconds(make(inv), args.repeats, torch.device("cpu")) for inv in (False, True)]
                    row = dict(backend=backend, op=op, shape=shape, dtype=dtype_name, threads=threads,
                               default_ms=times[0] * 1e3, invariant_ms=times[1] * 1e3, ratio=times[1] / times[0])
                    rows.append(row)
                    print(f"| {backend} | {op} | {shape} | {dtype_name} | {threads} | {row['default_ms']:.1f} | "
                          f"{row['invariant_ms']:.1f} | {row['ratio']:.2f}x |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
