"""GPU benchmark with speed gates: the Triton (and CUDA) backends against PyTorch eager, torch.compile,
Liger-Kernel and Apple's cut-cross-entropy (CCE), over N in {256, 1024, 4096, 16384} and a V % 8 != 0 case, next
to the copy bandwidth and the cuBLAS bf16 matmul peak measured in the same run, and next to the model's
predictions (tools/gpu_model.py) for the same shapes.

    python benchmarks/bench_gpu.py [--n 256 1024 4096 16384] [--vocab 151936] [--odd-vocab 151665] [--d 4096]
                                   [--reps 5] [--gates] [--profile DIR] [--out gpu.json] [--md gpu.md]

Timing: CUDA events after warm-up, L2 flushed (a 256 MiB write) before every timed run, median. Rooflines from the
same GPU: memory-bound ops (logits input) as % of the measured device-to-device copy bandwidth for their minimum
bytes (logits read once; + gradient written once); fused linear as % of the measured cuBLAS bf16 matmul rate for
its matmul flops (2·NDV forward, 8·NDV forward+backward: the recompute every fused implementation does).

Gates (``--gates``; the script then exits 1 when one fails, listing each):
- logits forward >= 85% of copy bandwidth, logits forward+backward >= 75% (N >= 1024: at N = 256 a forward
  moves 78 MB, ~25 us, where launch latency dominates);
- fused linear forward and forward+backward >= 65% of the measured matmul rate (N >= 1024);
- no sirl op slower than torch.compile, Liger or CCE at the same shape. Liger and CCE compute the cross-entropy
  only (no entropy): they are the closest fused peers and still a gate; a peer that is not installed or fails at
  a shape is reported and, with ``--gates``, fails the run unless ``--allow-missing-peers`` (so a run without
  the peers cannot pass as a run that beat them).

``--profile DIR`` writes a torch.profiler per-kernel table (self CUDA time per kernel) of one forward+backward of
each sirl op at N = 4096. Without CUDA: prints "skipped: no CUDA" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

GATES = {"logits fwd": ("copy", 85.0), "logits fwd+bwd": ("copy", 75.0),
         "linear fwd": ("matmul", 65.0), "linear fwd+bwd": ("matmul", 65.0)}
GATE_MIN_N = 1024
PEERS = ("torch.compile", "liger", "cce")


def _timer(fn, reps, warmup=2, flush=None):
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


def _row(op, impl, n, v, seconds, roof_seconds, unit):
    return {"op": op, "impl": impl, "N": n, "V": v, "ms": seconds * 1e3,
            "roofline_pct": 100 * roof_seconds / seconds, "roofline": unit}


def _time_pair(rows, op, impl, n, v, fwd_fn, fwd_bwd_fn, reps, flush, roofs, unit):
    """Times one implementation's forward and forward+backward; an exception becomes an error row."""
    for mode, fn, roof in (("fwd", fwd_fn, roofs[0]), ("fwd+bwd", fwd_bwd_fn, roofs[1])):
        try:
            rows.append(_row(f"{op} {mode}", impl, n, v, _timer(fn, reps, flush=flush), roof, unit))
        except Exception as exc:  # noqa: BLE001 - a failing implementation must not hide the others
            rows.append({"op": f"{op} {mode}", "impl": impl, "N": n, "V": v,
                         "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        torch.cuda.empty_cache()


def _logits_impls(labels, backends, compiled, liger):
    import sirl_kernels

    impls = {f"sirl {b}": (lambda x, b=b: sirl_kernels.token_logprobs_entropy(x, labels, backend=b,
                                                                            check_labels=False))
             for b in backends}
    impls["eager"] = lambda x: eager_logprobs_entropy(x, labels)
    if compiled is not None:
        impls["torch.compile"] = lambda x: compiled(x, labels)
    if liger is not None:
        ce = liger.LigerCrossEntropyLoss()
        impls["liger"] = lambda x: (ce(x, labels),)
    return impls


def bench_logits(rows, n, v, stride, backends, args, flush, bw, compiled, liger):
    g = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    logits = torch.randn(n, stride, device="cuda", dtype=torch.bfloat16, generator=g)[:, :v]
    nbytes = n * v * 2
    for name, fn in _logits_impls(labels, backends, compiled, liger).items():
        def fwd(fn=fn):
            with torch.no_grad():
                fn(logits)

        def fwd_bwd(fn=fn):
            x = logits.detach().requires_grad_(True)
            sum(o.float().sum() for o in fn(x)).backward()

        _time_pair(rows, "logits", name, n, v, fwd, fwd_bwd, args.reps, flush, (nbytes / bw, 3 * nbytes / bw),
                   "copy")
    del logits
    torch.cuda.empty_cache()


def bench_linear(rows, n, v, d, backends, args, flush, peak, compiled_linear, liger, cce):
    import sirl_kernels

    g = torch.Generator(device="cuda").manual_seed(1)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    hidden = (torch.randn(n, d, device="cuda", generator=g) * 0.5).to(torch.bfloat16).requires_grad_(True)
    weight = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).to(torch.bfloat16).requires_grad_(True)
    impls = {f"sirl {b}": (lambda b=b: sirl_kernels.linear_token_logprobs_entropy(
        hidden, weight, labels, backend=b, check_labels=False)) for b in backends}
    impls["eager"] = lambda: eager_linear(hidden, weight, labels)
    if compiled_linear is not None:
        impls["torch.compile"] = lambda: compiled_linear(hidden, weight, labels)
    if liger is not None:
        loss_fn = liger.LigerFusedLinearCrossEntropyLoss()
        impls["liger"] = lambda: (loss_fn(weight, hidden, labels),)
    if cce is not None:
        impls["cce"] = lambda: (cce.linear_cross_entropy(hidden, weight, labels),)
    ndv = n * v * d
    for name, fn in impls.items():
        def f_only(fn=fn):
            with torch.no_grad():
                fn()

        def f_b(fn=fn):
            sum(o.float().sum() for o in fn()).backward()
            hidden.grad = weight.grad = None

        _time_pair(rows, "linear", name, n, v, f_only, f_b, args.reps, flush, (2 * ndv / peak, 8 * ndv / peak),
                   "matmul")
    del hidden, weight
    torch.cuda.empty_cache()


def gate_failures(rows, allow_missing_peers=False) -> list[str]:
    """Every gate a run fails (see the module docstring)."""
    failures = []
    by_key: dict = {}
    for r in rows:
        by_key.setdefault((r["op"], r["N"], r["V"]), {})[r["impl"]] = r
    for (op, n, v), impls in by_key.items():
        sirl = {k: r for k, r in impls.items() if k.startswith("sirl ")}
        for impl, r in sirl.items():
            if "error" in r:
                failures.append(f"{op} N={n} V={v} {impl}: {r['error']}")
                continue
            kind, floor = GATES[op]
            if n >= GATE_MIN_N and r["roofline_pct"] < floor:
                failures.append(f"{op} N={n} V={v} {impl}: {r['roofline_pct']:.1f}% of the measured {kind} "
                                f"roofline < {floor}%")
            for peer in PEERS:
                other = impls.get(peer)
                if other is None or "error" in other:
                    if not allow_missing_peers and not (peer == "cce" and op.startswith("logits")):
                        why = "not installed" if other is None else other["error"]
                        failures.append(f"{op} N={n} V={v}: peer {peer} not measured ({why})")
                    continue
                if r["ms"] > other["ms"]:
                    failures.append(f"{op} N={n} V={v} {impl}: {r['ms']:.2f} ms, slower than {peer} "
                                    f"({other['ms']:.2f} ms)")
    return failures


def model_predictions(rows, vocab, d) -> dict:
    """The model's predicted ms for the ops and shapes measured (tools/gpu_model.py, H100 SXM): (op, N, V) -> ms."""
    try:
        from tools import gpu_model
    except ImportError:
        return {}
    out = {}
    for (op, n, v) in {(r["op"], r["N"], r["V"]) for r in rows}:
        if op == "logits fwd":
            out[(op, n, v)] = gpu_model.logits_op("fwd", n, v).time_s * 1e3
        elif op == "logits fwd+bwd":
            out[(op, n, v)] = (gpu_model.logits_op("fwd", n, v).time_s + gpu_model.logits_op("bwd", n, v).time_s) * 1e3
        elif op.startswith("linear") and v == vocab and n >= 1024:
            fwd, both = gpu_model.fused_linear_op(n, v, d, 90)
            out[(op, n, v)] = (fwd if op == "linear fwd" else both).time_s * 1e3
    return out


def profile(backends, outdir, v, d):
    """torch.profiler per-kernel table (self CUDA time) of one forward+backward of each sirl op at N = 4096."""
    import sirl_kernels
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    os.makedirs(outdir, exist_ok=True)
    n = 4096
    g = torch.Generator(device="cuda").manual_seed(2)
    labels = torch.randint(0, v, (n,), device="cuda", generator=g)
    for backend in backends:
        logits = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
        hidden = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
        weight = (torch.randn(v, d, device="cuda", generator=g) / d**0.5).to(torch.bfloat16).requires_grad_(True)
        for op, run in (("logits", lambda: sirl_kernels.token_logprobs_entropy(logits, labels, backend=backend)),
                        ("linear", lambda: sirl_kernels.linear_token_logprobs_entropy(hidden, weight, labels,
                                                                                      backend=backend))):
            lp, h = run()  # warm-up (compiles)
            (lp.sum() + h.sum()).backward()
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                lp, h = run()
                (lp.sum() + h.sum()).backward()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)
            with open(os.path.join(outdir, f"profile_{op}_{backend}.txt"), "w") as f:
                f.write(f"{op}, backend {backend}, N={n} V={v} D={d} bf16, forward+backward\n\n{table}\n")
        del logits, hidden, weight
        torch.cuda.empty_cache()


def run(args):
    torch.manual_seed(0)
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    bw = measure_copy_bandwidth(flush)
    peak = measure_matmul_peak(flush)
    rows: list = []
    liger = _optional("liger_kernel.transformers")
    cce = _optional("cut_cross_entropy")
    backends = _sirl_backends()
    compiled = compiled_linear = None
    if args.compile:  # one compile each, dynamic in N (the shapes swept)
        compiled = torch.compile(eager_logprobs_entropy, dynamic=True)
        compiled_linear = torch.compile(eager_linear, dynamic=True)
    for n in args.n:
        bench_logits(rows, n, args.vocab, args.vocab, backends, args, flush, bw, compiled, liger)
        bench_linear(rows, n, args.vocab, args.d, backends, args, flush, peak, compiled_linear, liger, cce)
    if args.odd_vocab:  # V % 8 != 0: a view of wider logits (the weight has that many rows)
        odd_n = 4096
        bench_logits(rows, odd_n, args.odd_vocab, args.vocab, backends, args, flush, bw, compiled, liger)
        bench_linear(rows, odd_n, args.odd_vocab, args.d, backends, args, flush, peak, compiled_linear, liger, cce)
    predicted = model_predictions(rows, args.vocab, args.d)
    for r in rows:
        if "error" not in r and (r["op"], r["N"], r["V"]) in predicted and r["impl"] == "sirl triton":
            r["model_ms"] = predicted[(r["op"], r["N"], r["V"])]
    if args.profile:
        profile(backends, args.profile, args.vocab, args.d)
    return {"device": torch.cuda.get_device_name(), "copy_bandwidth_GBps": bw / 1e9,
            "bf16_matmul_TFLOPs": peak / 1e12, "D": args.d, "rows": rows, "sirl_backends": backends,
            "liger": liger is not None, "cut_cross_entropy": cce is not None, "torch": torch.__version__}


def markdown(res, failures=None) -> str:
    lines = [f"device {res['device']}: copy {res['copy_bandwidth_GBps']:.0f} GB/s, "
             f"bf16 matmul {res['bf16_matmul_TFLOPs']:.0f} TFLOP/s (both measured in this run); D={res['D']}, "
             f"bf16, torch {res['torch']}; Liger {'yes' if res['liger'] else 'NOT INSTALLED'}, "
             f"CCE {'yes' if res['cut_cross_entropy'] else 'NOT INSTALLED'}",
             "", "| op | impl | N | V | measured ms | % measured roofline | model ms (H100 SXM) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['impl']} | {r['N']} | {r['V']} | error: {r['error']} | | |")
        else:
            model = f"{r['model_ms']:.2f}" if "model_ms" in r else ""
            lines.append(f"| {r['op']} | {r['impl']} | {r['N']} | {r['V']} | {r['ms']:.2f} | "
                         f"{r['roofline_pct']:.1f} ({r['roofline']}) | {model} |")
    if failures is not None:
        lines += ["", f"**Gates: {'PASSED' if not failures else f'{len(failures)} FAILED'}**", ""]
        lines += [f"- {f}" for f in failures]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--odd-vocab", type=int, default=151665, help="a V %% 8 != 0 case (0: none)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="leave out torch.compile")
    ap.add_argument("--gates", action="store_true", help="exit 1 when a speed gate fails")
    ap.add_argument("--allow-missing-peers", action="store_true")
    ap.add_argument("--profile", help="write torch.profiler per-kernel tables here")
    ap.add_argument("--out", help="JSON results")
    ap.add_argument("--md", help="markdown table")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("skipped: no CUDA (bench_gpu.py times GPU kernels; tools/gpu_model.py predicts them without one)")
        return 0
    res = run(args)
    failures = gate_failures(res["rows"], args.allow_missing_peers) if args.gates else None
    res["gate_failures"] = failures
    table = markdown(res, failures)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
