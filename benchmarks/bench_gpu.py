"""GPU benchmark of the Triton (and CUDA) backends against PyTorch eager, torch.compile, Liger-Kernel and Apple's
cut_cross_entropy (the last two when installed).

Times forward and forward+backward with CUDA events after warm-up, flushing L2 (writing a 256 MiB buffer)
before every timed run, and reports each time next to rooflines measured on the same GPU:
- memory-bound kernels (logits input): % of the measured device-to-device copy bandwidth for the minimum
  bytes (logits read once, gradient written once);
- fused linear: % of the measured bf16 matmul peak for the matmul flops (2NVD forward, 8NVD forward+backward
  with the recompute every fused implementation does).

Baselines: "eager" is fp32 ``log_softmax`` + gather + entropy on the (materialised) logits, "torch.compile" the
same function compiled (static shapes; its compile time is excluded), both computing log-prob and entropy like
sirl. Liger's LigerFusedLinearCrossEntropyLoss and cut_cross_entropy's linear_cross_entropy compute the
cross-entropy only (no entropy); they are the closest fused-linear peers and are labelled as such. A baseline
that fails (e.g. out of memory) is reported with its error, never hides the others. Without CUDA the script
prints "skipped: no CUDA" and exits 0.

    python benchmarks/bench_gpu.py [--n 16384 --d 4096 --vocab 128256 151936 --reps 10] [--out gpu.json]
                                   [--md gpu.md] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _timer(fn, reps, warmup=3, flush=None):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if flush is not None:
            flush.zero_()  # evicts L2
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def measure_copy_bandwidth(flush):
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = _timer(lambda: dst.copy_(src), 10, flush=flush)
    return 2 * src.numel() / t  # bytes/s (read + write)


def measure_matmul_peak(flush):
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = _timer(lambda: a @ b, 10, flush=flush)
    return 2 * 8192**3 / t  # flop/s


def _optional(name):
    try:
        return __import__(name, fromlist=["_"])
    except Exception:  # noqa: BLE001
        return None


def eager_logprobs_entropy(logits, labels):
    """The materialising baseline: fp32 log_softmax, gather, entropy."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp = logp.gather(-1, labels[:, None]).squeeze(-1)
    return lp, -(logp.exp() * logp).sum(-1)


def eager_linear(hidden, weight, labels):
    return eager_logprobs_entropy(hidden @ weight.t(), labels)


def _sirl_backends():
    import sirl_kernels

    report = sirl_kernels.available_backends()
    return [name for name in ("triton", "cuda") if report[name].available and "cuda" in report[name].reason]


def _time_pair(rows, op, name, v, fwd_fn, fwd_bwd_fn, reps, flush, roof_fwd, roof_fb):
    """Times one implementation's forward and forward+backward; an exception becomes an error row."""
    try:
        t = _timer(fwd_fn, reps, flush=flush)
        rows.append({"op": f"{op} fwd", "impl": name, "V": v, "ms": t * 1e3, "roofline_pct": 100 * roof_fwd / t})
        t = _timer(fwd_bwd_fn, reps, flush=flush)
        rows.append({"op": f"{op} fwd+bwd", "impl": name, "V": v, "ms": t * 1e3, "roofline_pct": 100 * roof_fb / t})
    except Exception as exc:  # noqa: BLE001 - a failing implementation must not hide the others
        rows.append({"op": op, "impl": name, "V": v, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    torch.cuda.empty_cache()


def run(args):
    import sirl_kernels

    torch.manual_seed(0)
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    bw = measure_copy_bandwidth(flush)
    peak = measure_matmul_peak(flush)
    rows = []
    liger = _optional("liger_kernel.transformers")
    cce = _optional("cut_cross_entropy")
    backends = _sirl_backends()
    n, d = args.n, args.d
    for v in args.vocab:
        g = torch.Generator(device="cuda").manual_seed(0)
        labels = torch.randint(0, v, (n,), device="cuda", generator=g)
        # --- logits input (memory bound) ---
        logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=g)
        nbytes = logits.numel() * logits.element_size()
        impls = {f"sirl {b}": (lambda x, b=b: sirl_kernels.token_logprobs_entropy(x, labels, backend=b,
                                                                                 check_labels=False))
                 for b in backends}
        impls["eager"] = lambda x: eager_logprobs_entropy(x, labels)
        if args.compile:
            compiled = torch.compile(eager_logprobs_entropy, dynamic=False)
            impls["torch.compile"] = lambda x: compiled(x, labels)
        for name, fn in impls.items():
            def fwd(fn=fn):
                with torch.no_grad():
                    fn(logits)

            def fwd_bwd(fn=fn):
                x = logits.detach().requires_grad_(True)
                lp, h = fn(x)
                (lp.sum() + h.sum()).backward()

            _time_pair(rows, "logits", name, v, fwd, fwd_bwd, args.reps, flush, nbytes / bw, 3 * nbytes / bw)
        del logits
        torch.cuda.empty_cache()
        # --- fused linear (compute bound) ---
        hidden = (torch.randn(n, d, device="cuda", generator=g) * 0.5).to(torch.bfloat16).requires_grad_(True)
        weight = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).to(torch.bfloat16).requires_grad_(True)
        impls = {f"sirl {b}": (lambda b=b: sirl_kernels.linear_token_logprobs_entropy(
            hidden, weight, labels, backend=b, check_labels=False)) for b in backends}
        impls["eager"] = lambda: eager_linear(hidden, weight, labels)
        if args.compile:
            compiled_linear = torch.compile(eager_linear, dynamic=False)
            impls["torch.compile"] = lambda: compiled_linear(hidden, weight, labels)
        if liger is not None:
            loss_fn = liger.LigerFusedLinearCrossEntropyLoss()
            impls["liger FLCE (CE only)"] = lambda: (loss_fn(weight, hidden, labels),)
        if cce is not None:
            impls["cut_cross_entropy (CE only)"] = lambda: (cce.linear_cross_entropy(hidden, weight, labels),)
        for name, fn in impls.items():
            def f_only(fn=fn):
                with torch.no_grad():
                    fn()

            def f_b(fn=fn):
                outs = fn()
                sum(o.float().sum() for o in outs).backward()
                hidden.grad = weight.grad = None

            _time_pair(rows, "linear", name, v, f_only, f_b, args.reps, flush, 2 * n * v * d / peak,
                       8 * n * v * d / peak)
        del hidden, weight
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "copy_bandwidth_GBps": bw / 1e9,
            "bf16_matmul_TFLOPs": peak / 1e12, "N": n, "D": d, "rows": rows, "sirl_backends": backends,
            "liger": liger is not None, "cut_cross_entropy": cce is not None, "torch": torch.__version__}


def markdown(res) -> str:
    lines = [f"device {res['device']}: copy {res['copy_bandwidth_GBps']:.0f} GB/s, "
             f"bf16 matmul {res['bf16_matmul_TFLOPs']:.0f} TFLOP/s; N={res['N']} D={res['D']}, bf16, "
             f"torch {res['torch']}",
             "", "| op | impl | V | ms | % roofline |", "|---|---|---:|---:|---:|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['impl']} | {r['V']} | error: {r['error']} | |")
        else:
            lines.append(f"| {r['op']} | {r['impl']} | {r['V']} | {r['ms']:.2f} | {r['roofline_pct']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 151936])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="leave out torch.compile")
    ap.add_argument("--out", help="JSON results")
    ap.add_argument("--md", help="markdown table")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA (bench_gpu.py times GPU kernels; see triton_memory_traffic.py for a CPU check)")
        return 0
    res = run(args)
    table = markdown(res)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
