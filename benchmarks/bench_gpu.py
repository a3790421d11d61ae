"""GPU benchmark of the Triton backend against Liger-Kernel and Apple's cut_cross_entropy (when installed).

Times forward and forward+backward with CUDA events after warm-up, flushing L2 (writing a 256 MiB buffer)
before every timed run, and reports each time next to rooflines measured on the same GPU:
- memory-bound kernels (logits input): % of the measured device-to-device copy bandwidth for the minimum
  bytes (logits read once, gradient written once);
- fused linear: % of the measured bf16 matmul peak for the matmul flops (2NVD forward, 6NVD forward+backward).

Shapes: N = 16384 tokens, D = 4096, V in {128256, 151936}, bf16. Liger's LigerFusedLinearCrossEntropyLoss and
cut_cross_entropy's linear_cross_entropy compute the cross-entropy only (no entropy); they are the closest
comparable fused-linear baselines and are labelled as such. Without CUDA the script prints
"skipped: no CUDA" and exits 0.

    python benchmarks/bench_gpu.py [--n 16384 --d 4096 --vocab 128256 151936 --reps 10] [--out gpu.json]
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
        return __import__(name)
    except Exception:  # noqa: BLE001
        return None


def run(args):
    import sirl_kernels

    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    bw = measure_copy_bandwidth(flush)
    peak = measure_matmul_peak(flush)
    rows = []
    liger = _optional("liger_kernel.transformers")
    cce = _optional("cut_cross_entropy")
    n, d = args.n, args.d
    for v in args.vocab:
        g = torch.Generator(device="cuda").manual_seed(0)
        labels = torch.randint(0, v, (n,), device="cuda", generator=g)
        # --- logits input (memory bound) ---
        logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=g)
        x = logits.requires_grad_(True)

        def fwd():
            with torch.no_grad():
                sirl_kernels.token_logprobs_entropy(x, labels, backend="triton")

        def fwd_bwd(inplace=False):
            y = x.detach().requires_grad_(True) if not inplace else x.detach().clone().requires_grad_(True)
            lp, h = sirl_kernels.token_logprobs_entropy(y, labels, backend="triton", inplace_backward=inplace)
            (lp.sum() + h.sum()).backward()

        nbytes = logits.numel() * logits.element_size()
        t = _timer(fwd, args.reps, flush=flush)
        rows.append({"op": "logits fwd", "impl": "sirl triton", "V": v, "ms": t * 1e3,
                     "roofline_pct": 100 * nbytes / bw / t})
        t = _timer(fwd_bwd, args.reps, flush=flush)
        rows.append({"op": "logits fwd+bwd", "impl": "sirl triton", "V": v, "ms": t * 1e3,
                     "roofline_pct": 100 * 3 * nbytes / bw / t})
        del logits, x
        torch.cuda.empty_cache()
        # --- fused linear (compute bound) ---
        hidden = (torch.randn(n, d, device="cuda", generator=g) * 0.5).to(torch.bfloat16).requires_grad_(True)
        weight = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).to(torch.bfloat16).requires_grad_(True)
        flops_f, flops_fb = 2 * n * v * d, 6 * n * v * d
        impls = {
            "sirl triton": lambda: sirl_kernels.linear_token_logprobs_entropy(hidden, weight, labels,
                                                                              backend="triton"),
        }
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

            try:
                t = _timer(f_only, args.reps, flush=flush)
                rows.append({"op": "linear fwd", "impl": name, "V": v, "ms": t * 1e3,
                             "roofline_pct": 100 * flops_f / peak / t})
                t = _timer(f_b, args.reps, flush=flush)
                rows.append({"op": "linear fwd+bwd", "impl": name, "V": v, "ms": t * 1e3,
                             "roofline_pct": 100 * flops_fb / peak / t})
            except Exception as exc:  # noqa: BLE001 - a baseline failing must not hide the others
                rows.append({"op": "linear", "impl": name, "V": v, "error": f"{type(exc).__name__}: {exc}"})
        del hidden, weight
        torch.cuda.empty_cache()
    return {"device": torch.cuda.get_device_name(), "copy_bandwidth_GBps": bw / 1e9,
            "bf16_matmul_TFLOPs": peak / 1e12, "N": n, "D": d, "rows": rows,
            "liger": liger is not None, "cut_cross_entropy": cce is not None}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--vocab", type=int, nargs="+", default=[128256, 151936])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA (bench_gpu.py times GPU kernels; see triton_memory_traffic.py for a CPU check)")
        return 0
    res = run(args)
    print(f"device {res['device']}: copy {res['copy_bandwidth_GBps']:.0f} GB/s, "
          f"bf16 matmul {res['bf16_matmul_TFLOPs']:.0f} TFLOP/s; N={res['N']} D={res['D']}")
    print("| op | impl | V | ms | % roofline |")
    print("|---|---|---:|---:|---:|")
    for r in res["rows"]:
        if "error" in r:
            print(f"| {r['op']} | {r['impl']} | {r['V']} | error: {r['error']} | |")
        else:
            print(f"| {r['op']} | {r['impl']} | {r['V']} | {r['ms']:.2f} | {r['roofline_pct']:.1f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
