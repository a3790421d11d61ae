"""Benchmark token_logprobs_entropy: our backends vs PyTorch eager, torch.compile and TRL.

Times forward and forward+backward (median of --repeats), reports achieved GB/s against the measured read
bandwidth (the floor: bytes that must move / read bandwidth) and the peak memory beyond inputs, outputs and
the gradient. Writes OUT_DIR/token_logprobs_entropy.{json,md}.

On each sirl kernel backend (not the "torch" reference) it also times the optional statistics in the same run
(``--no-stats`` leaves them out): ``token_stats`` with log-prob + entropy alone, + self-certainty, + varentropy,
+ both, and with K = 8 labels; ``top_k_logprobs`` (k = 64); ``sampler_logprobs_entropy`` (top_k = 64, top_p = 0.9).
Column "x plain" is each one's time over the plain ``token_logprobs_entropy`` of the same backend, case and mode.
The top-k ids behind the last two are torch ops over the whole [N, V] (tens of times the kernels' time on a CPU),
so they run only where N x V <= --top-k-max-elems.

    python benchmarks/bench_token_logprobs_entropy.py                      # all default shapes, this machine
    python benchmarks/bench_token_logprobs_entropy.py --n 4096 --v 151936 --dtypes float32

    # This build's CPU kernels against another build's, in alternating processes (--old-build: a checkout whose
    # torch extension sirl_kernels/_C_cpu*.so was built in place against this torch, e.g. commit 0adc168):
    python benchmarks/bench_token_logprobs_entropy.py --old-build /tmp/old --n 4096 --v 151936 --rounds 3
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_peak_extra_bytes, machine_info, measure_read_bandwidth, median_seconds, write_results  # noqa: E402

import sirl_kernels  # noqa: E402
from sirl_kernels.backends.rows import Rows

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def eager_logprobs_entropy(logits, labels):
    """What a careful eager user writes: fp32 log_softmax, gather, entropy from the log-probabilities."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    logprobs = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return logprobs, entropy


def _trl_impl():
    try:
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax
    except Exception:  # noqa: BLE001 - trl absent or broken: no column
        return None

    def trl_logprobs_entropy(logits, labels):
        return selective_log_softmax(logits, labels), entropy_from_logits(logits)

    return trl_logprobs_entropy


# The optional statistics' cases: K labels a row, the top-k width, the sampler's top-k / top-p
K_LABELS, TOP_K, SAMPLER_TOP_K, SAMPLER_TOP_P = 8, 64, 64, 0.9
STATS = {  # name suffix -> what token_stats is asked for, beside the plain pair
    "stats": (), "stats+sc": ("self_certainty",), "stats+ve": ("varentropy",),
    "stats+sc+ve": ("self_certainty", "varentropy"),
}


def _case(fn, plain, k_labels=None, top_k=False):
    """Tags an implementation with the plain one its time is divided by, with K when it takes [N, K] labels, and
    whether it ranks the top-k ids (capped by --top-k-max-elems)."""
    fn.plain, fn.k_labels, fn.top_k = plain, k_labels, top_k
    return fn


def stats_implementations(backend: str, plain: str) -> dict:
    """The optional statistics on ``backend``: each returns its float outputs (every one differentiable)."""

    def token_stats(extra):
        want = ("logprobs", "entropy", *extra)

        def run(logits, labels):
            out = sirl_kernels.token_stats(logits, labels, want=want, backend=backend)
            return tuple(getattr(out, name) for name in want)

        return run

    impls = {f"{plain} {suffix}": _case(token_stats(extra), plain) for suffix, extra in STATS.items()}
    impls[f"{plain} stats K={K_LABELS}"] = _case(token_stats(()), plain, k_labels=K_LABELS)
    impls[f"{plain} top_k_logprobs k={TOP_K}"] = _case(
        lambda logits, labels: (sirl_kernels.top_k_logprobs(logits, TOP_K, backend=backend)[1],), plain, top_k=True)
    return impls


def sampler_logprobs_entropy(logits, labels):
    lp, h = sirl_kernels.sampler_logprobs_entropy(logits, labels, top_k=SAMPLER_TOP_K, top_p=SAMPLER_TOP_P)
    # a label outside the sampler's support has log-prob -inf: kept out of the loss so that the backward stays
    # finite (random labels mostly are); an O(N) select, nothing next to the [N, V] work
    return torch.where(torch.isfinite(lp), lp, 0.0), h


def implementations(device, include_compile=True, include_stats=True):
    impls = {"eager": eager_logprobs_entropy}
    if include_compile:
        impls["torch.compile"] = torch.compile(eager_logprobs_entropy, dynamic=False)
    trl = _trl_impl()
    if trl is not None:
        impls["trl"] = trl
    for name, status in sirl_kernels.available_backends().items():
        if not status.available:
            continue
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter's timings mean nothing
        if name == "cpu" and device.type != "cpu":
            continue
        impls[f"sirl:{name}"] = _case(
            lambda logits, labels, _b=name: sirl_kernels.token_logprobs_entropy(logits, labels, backend=_b),
            f"sirl:{name}")
    # the kernel backends: the "torch" reference's statistics are eager PyTorch, timed by the baselines already
    plains = [k for k in impls if k.startswith("sirl:") and k != "sirl:torch"]
    if include_stats:
        for plain in plains:
            impls.update(stats_implementations(plain.removeprefix("sirl:"), plain))
        if plains:  # not a backend kernel (top-k ids and a gather): timed once, against the first backend
            impls[f"sirl sampler k={SAMPLER_TOP_K} p={SAMPLER_TOP_P}"] = _case(sampler_logprobs_entropy, plains[0],
                                                                              top_k=True)
    return impls


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


# Peak of the materialising baselines beyond the input logits, in multiples of the fp32 logits' size (measured
# here at [1024, 151936]: eager fwd adds 3x, fwd+bwd 3x plus the gradient; bf16 up to 4.5x), used to skip
# shapes that would not fit instead of swapping or being killed.
BASELINE_FOOTPRINT = {"fwd": 3, "fwd+bwd": 5}


def run_case(impl_name, fn, n, v, dtype, mode, device, repeats, top_k_max_elems=0):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(n, v, generator=g) * 2).to(dtype).to(device)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    k = getattr(fn, "k_labels", None)
    if k:  # [N, K]: the label first, then K - 1 more (their own generator: the other cases' inputs stay the same)
        more = torch.randint(0, v, (n, k - 1), generator=torch.Generator().manual_seed(1)).to(device)
        labels = torch.cat([labels[:, None], more], dim=1)
    logit_bytes = logits.numel() * logits.element_size()
    row = {"impl": impl_name, "n": n, "v": v, "dtype": str(dtype).removeprefix("torch."), "mode": mode}
    if getattr(fn, "plain", None):
        row["plain"] = fn.plain
    if getattr(fn, "top_k", False) and top_k_max_elems and n * v > top_k_max_elems:
        row["note"] = "skipped: N x V > --top-k-max-elems"
        return row
    if not impl_name.startswith("sirl") and device.type == "cpu":
        need = BASELINE_FOOTPRINT[mode] * n * v * 4 + logit_bytes
        if need > 0.8 * _available_bytes():
            row["note"] = f"skipped: needs ~{need / 2**30:.0f} GiB"
            return row
    # the outputs' bytes (they count in the peak), known after the warm-up; the upstream gradients too, drawn
    # there in output order (for (logprobs, entropy): g_lp then g_h, as ever)
    out_bytes, upstream = [], []

    def record(outs):
        if not out_bytes:
            out_bytes.append(sum(o.numel() * o.element_size() for o in outs))
        return outs

    if mode == "fwd":

        def step():
            with torch.no_grad():
                return record(fn(logits, labels))

        moved = logit_bytes
    else:
        logits.requires_grad_(True)

        def step():
            logits.grad = None
            outs = record(fn(logits, labels))
            if not upstream:
                upstream.extend(torch.randn(o.shape, generator=g).to(device) for o in outs)
            sum((o * w).sum() for o, w in zip(outs, upstream)).backward()
            return logits.grad

        moved = 3 * logit_bytes  # read in forward, read in backward, write the gradient

    step()  # warm-up (and compilation)
    # the outputs, and in fwd+bwd the gradient itself
    expected_extra = out_bytes[0] + (logit_bytes if mode != "fwd" else 0)
    if device.type == "cpu":
        extra = cpu_peak_extra_bytes(step)
        if extra is not None:
            extra = max(0, extra - expected_extra)
            row["extra_mem_mb"] = extra / 2**20
            row["extra_mem_pct_of_logits"] = 100.0 * extra / logit_bytes
    else:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        extra = max(0, torch.cuda.max_memory_allocated() - base - expected_extra)
        row["extra_mem_mb"] = extra / 2**20
        row["extra_mem_pct_of_logits"] = 100.0 * extra / logit_bytes
    t = median_seconds(step, repeats, device, warmup=0)
    row["ms"] = t * 1e3
    row["gb_s"] = moved / t / 1e9
    row["min_bytes"] = moved
    logits.grad = None
    del logits
    gc.collect()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--v", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd", "bwd-into"],
                        help="bwd-into (with --old-build only): the backward into one reused gradient buffer")
    parser.add_argument("--impls", nargs="*", default=None, help="subset of implementation names")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", default="bench_results")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    parser.add_argument("--no-stats", action="store_true",
                        help="leave out the optional statistics (token_stats, top_k_logprobs, the sampler)")
    parser.add_argument("--top-k-max-elems", type=int, default=1 << 25,
                        help="top_k_logprobs and the sampler only where N x V is at most this (0: everywhere); the "
                             "default keeps them to the smallest default shape, [1024, 32000]")
    parser.add_argument("--old-build", default=None,
                        help="checkout whose in-place torch extension sirl_kernels/_C_cpu*.so to compare with this "
                             "build's libsirl_cpu, alternating (only the 'cpu' kernels are timed)")
    parser.add_argument("--rounds", type=int, default=3, help="with --old-build: processes per build and case")
    parser.add_argument("--time-one", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.time_one:
        return time_one_build(args)
    if args.old_build:
        return compare_builds(args)

    device = torch.device(args.device)
    meta = machine_info(device)
    read_bw = measure_read_bandwidth(device)
    meta["read_bandwidth_gb_s"] = read_bw / 1e9
    print(f"{meta['cpu']} | {meta['threads']} threads | measured read bandwidth {read_bw / 1e9:.1f} GB/s", flush=True)

    impls = implementations(device, include_compile=not args.no_compile, include_stats=not args.no_stats)
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls}
    rows = []
    for n in args.n:
        for v in args.v:
            for dtype_name in args.dtypes:
                for mode in args.modes:
                    for name, fn in impls.items():
                        if name == "torch.compile":
                            # A fresh static-shape compile per case (the wrapper is dynamic=False): otherwise dynamo
                            # switches to dynamic shapes after the first shape, whose kernels ran up to 3x slower
                            # here, or hits its recompile limit and falls back to eager.
                            torch._dynamo.reset()
                        row = run_case(name, fn, n, v, DTYPES[dtype_name], mode, device, args.repeats,
                                       args.top_k_max_elems)
                        if "ms" in row:
                            row["x_floor"] = row["ms"] / 1e3 / (row["min_bytes"] / read_bw)
                        rows.append(row)
                        print(row, flush=True)
                    _add_speedups(rows, n, v, dtype_name, mode)

    columns = [
        ("n", "N"), ("v", "V"), ("dtype", "dtype"), ("mode", "mode"), ("impl", "impl"), ("ms", "median ms"),
        ("gb_s", "GB/s"), ("x_floor", "x read floor"), ("x_plain", "x plain"), ("speedup_vs_eager", "vs eager"),
        ("speedup_vs_compile", "vs compile"), ("extra_mem_mb", "extra MB"),
        ("extra_mem_pct_of_logits", "extra % of logits"), ("note", "note"),
    ]
    table = write_results(args.out_dir, "token_logprobs_entropy", meta, rows, columns)
    print(f"\nread bandwidth {read_bw / 1e9:.1f} GB/s\n{table}")


def _old_cpu_ops(checkout: str):
    """The torch.ops of an earlier build's torch extension (forward -> (lp, h, lse); backward -> grad)."""
    found = sorted(Path(checkout, "sirl_kernels").glob("_C_cpu*.so"))
    if not found:
        raise SystemExit(f"no sirl_kernels/_C_cpu*.so in {checkout}: build it there with "
                         "`python setup.py build_ext --inplace`")
    torch.ops.load_library(str(found[0]))
    return torch.ops.sirl_kernels_cpu


def time_one_build(args) -> None:
    """Child of compare_builds: times one build's kernels on one case, prints {"ms": [...]} (after a warm-up)."""
    build, n, v, dtype_name, mode = args.time_one
    n, v = int(n), int(v)
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, v, generator=gen) * 2).to(DTYPES[dtype_name])
    labels = torch.randint(0, v, (n,), generator=gen)
    g = torch.randn(n, generator=gen)
    grad = torch.zeros_like(logits) if mode == "bwd-into" else None  # faulted in once, reused by every call
    if build == "old":
        old = _old_cpu_ops(args.old_build)
        _, h, lse = old.forward(logits, labels, 1.0, -100)

        def step(logits, labels, g):
            if mode == "bwd-into":
                return old.backward_out(g, g, logits, labels, lse, h, 1.0, -100, grad, None)
            lp, h_, lse_ = old.forward(logits, labels, 1.0, -100)
            return old.backward(g, g, logits, labels, lse_, h_, 1.0, -100) if mode == "fwd+bwd" else lp
    else:
        from sirl_kernels.backends import cpu
        from sirl_kernels.backends.rows import logprob_entropy_coefficients

        _, h, stats = cpu.logits_forward(Rows(logits, labels, 1.0, -100))

        def step(logits, labels, g):
            if mode == "bwd-into":
                coef = logprob_entropy_coefficients(g, g, h)
                return cpu.logits_backward(Rows(logits, labels, 1.0, -100), stats, coef, out=grad)
            lp, h_, stats_ = cpu.logits_forward(Rows(logits, labels, 1.0, -100))
            return (cpu.logits_backward(Rows(logits, labels, 1.0, -100), stats_, logprob_entropy_coefficients(g, g, h_))
                    if mode == "fwd+bwd" else lp)

    times = []
    for i in range(args.repeats + 1):  # the first call warms up (and faults in) everything
        start = time.perf_counter()
        out = step(logits, labels, g)
        elapsed = time.perf_counter() - start
        del out
        if i:
            times.append(elapsed * 1e3)
    print(json.dumps({"ms": times}))


def compare_builds(args) -> None:
    """Old build's kernels vs this build's on the same cases: each timing in a fresh process (the same logits, seed
    0), old and new alternating round by round (the order flipped every round) so that drift of the machine hits
    both alike; per case the ratios new / old of the medians and of the best runs. Separate processes, because fresh
    multi-GB gradients fault in pages whose cost depends on what the same process freed before; "bwd-into" leaves
    that cost (the same torch allocation and huge-page advice in both builds) out."""
    from sirl_kernels.backends import cpu

    print(f"old: {args.old_build} | new: {cpu.library().path} ({cpu.isa()}) | {torch.get_num_threads()} threads",
          flush=True)
    rows = []
    for n in args.n:
        for v in args.v:
            for dtype_name in args.dtypes:
                for mode in args.modes:
                    times = {"old": [], "new": []}
                    for r in range(args.rounds):
                        for build in ("old", "new") if r % 2 == 0 else ("new", "old"):
                            cmd = [sys.executable, __file__, "--old-build", args.old_build, "--repeats",
                                   str(args.repeats), "--time-one", build, str(n), str(v), dtype_name, mode]
                            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                            times[build] += json.loads(out.strip().splitlines()[-1])["ms"]
                    old_ms, new_ms = (statistics.median(times[k]) for k in ("old", "new"))
                    old_min, new_min = (min(times[k]) for k in ("old", "new"))
                    row = {"n": n, "v": v, "dtype": dtype_name, "mode": mode, "old_ms": old_ms, "new_ms": new_ms,
                           "ratio": new_ms / old_ms, "old_min_ms": old_min, "new_min_ms": new_min,
                           "ratio_min": new_min / old_min, "runs": len(times["new"]),
                           "old_all": [round(t) for t in times["old"]], "new_all": [round(t) for t in times["new"]]}
                    rows.append(row)
                    print(row, flush=True)
    meta = machine_info(torch.device("cpu"))
    meta.update(old_build=str(args.old_build), new_library=str(cpu.library().path), isa=cpu.isa())
    columns = [("n", "N"), ("v", "V"), ("dtype", "dtype"), ("mode", "mode"), ("old_ms", "old median ms"),
               ("new_ms", "new median ms"), ("ratio", "new / old (medians)"), ("old_min_ms", "old best ms"),
               ("new_min_ms", "new best ms"), ("ratio_min", "new / old (best)"), ("runs", "runs each")]
    table = write_results(args.out_dir, "cpu_old_vs_new_build", meta, rows, columns)
    print(f"\n{table}")


def _add_speedups(rows, n, v, dtype_name, mode):
    case = [r for r in rows if (r["n"], r["v"], r["dtype"], r["mode"]) == (n, v, dtype_name, mode)]
    base = {r["impl"]: r.get("ms") for r in case}
    for r in case:
        if "ms" not in r:
            continue
        if base.get("eager"):
            r["speedup_vs_eager"] = base["eager"] / r["ms"]
        if base.get("torch.compile"):
            r["speedup_vs_compile"] = base["torch.compile"] / r["ms"]
        if base.get(r.get("plain")):  # time over the plain token_logprobs_entropy of the same backend
            r["x_plain"] = r["ms"] / base[r["plain"]]


if __name__ == "__main__":
    main()
