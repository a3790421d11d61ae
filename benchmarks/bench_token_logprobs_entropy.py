"""Benchmark token_logprobs_entropy: our backends vs PyTorch eager, torch.compile and TRL.

Times forward and forward+backward (median of --repeats), reports achieved GB/s against the measured read
bandwidth (the floor: bytes that must move / read bandwidth) and the peak memory beyond inputs, outputs and
the gradient. Writes OUT_DIR/token_logprobs_entropy.{json,md}.

    python benchmarks/bench_token_logprobs_entropy.py                      # all default shapes, this machine
    python benchmarks/bench_token_logprobs_entropy.py --n 4096 --v 151936 --dtypes float32
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_peak_extra_bytes, machine_info, measure_read_bandwidth, median_seconds, write_results  # noqa: E402

import sirl_kernels  # noqa: E402

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


def implementations(device, include_compile=True):
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
        impls[f"sirl:{name}"] = (
            lambda logits, labels, _b=name: sirl_kernels.token_logprobs_entropy(logits, labels, backend=_b)
        )
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


def run_case(impl_name, fn, n, v, dtype, mode, device, repeats):
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (torch.randn(n, v, generator=g) * 2).to(dtype).to(device)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    logit_bytes = logits.numel() * logits.element_size()
    row = {"impl": impl_name, "n": n, "v": v, "dtype": str(dtype).removeprefix("torch."), "mode": mode}
    if not impl_name.startswith("sirl") and device.type == "cpu":
        need = BASELINE_FOOTPRINT[mode] * n * v * 4 + logit_bytes
        if need > 0.8 * _available_bytes():
            row["note"] = f"skipped: needs ~{need / 2**30:.0f} GiB"
            return row
    if mode == "fwd":

        def step():
            with torch.no_grad():
                return fn(logits, labels)

        expected_extra = 2 * n * 4
        moved = logit_bytes
    else:
        logits.requires_grad_(True)
        g_lp = torch.randn(n, generator=g).to(device)
        g_h = torch.randn(n, generator=g).to(device)

        def step():
            logits.grad = None
            lp, h = fn(logits, labels)
            (lp * g_lp + h * g_h).sum().backward()
            return logits.grad

        expected_extra = logit_bytes + 2 * n * 4  # the gradient itself and the outputs
        moved = 3 * logit_bytes  # read in forward, read in backward, write the gradient

    step()  # warm-up (and compilation)
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
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--impls", nargs="*", default=None, help="subset of implementation names")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", default="bench_results")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile baseline")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    meta = machine_info(device)
    read_bw = measure_read_bandwidth(device)
    meta["read_bandwidth_gb_s"] = read_bw / 1e9
    print(f"{meta['cpu']} | {meta['threads']} threads | measured read bandwidth {read_bw / 1e9:.1f} GB/s", flush=True)

    impls = implementations(device, include_compile=not args.no_compile)
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
                        row = run_case(name, fn, n, v, DTYPES[dtype_name], mode, device, args.repeats)
                        if "ms" in row:
                            row["x_floor"] = row["ms"] / 1e3 / (row["min_bytes"] / read_bw)
                        rows.append(row)
                        print(row, flush=True)
                    _add_speedups(rows, n, v, dtype_name, mode)

    columns = [
        ("n", "N"), ("v", "V"), ("dtype", "dtype"), ("mode", "mode"), ("impl", "impl"), ("ms", "median ms"),
        ("gb_s", "GB/s"), ("x_floor", "x read floor"), ("speedup_vs_eager", "vs eager"),
        ("speedup_vs_compile", "vs compile"), ("extra_mem_mb", "extra MB"),
        ("extra_mem_pct_of_logits", "extra % of logits"), ("note", "note"),
    ]
    table = write_results(args.out_dir, "token_logprobs_entropy", meta, rows, columns)
    print(f"\nread bandwidth {read_bw / 1e9:.1f} GB/s\n{table}")


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


if __name__ == "__main__":
    main()
