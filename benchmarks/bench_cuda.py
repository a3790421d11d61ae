"""GPU benchmark of the "cuda" backend against eager PyTorch (log_softmax + gather + entropy in fp32).

    python benchmarks/bench_cuda.py [--n 16384] [--v 151936] [--dtype bfloat16] [--iters 20] [--json out.json]

Times with CUDA events after warm-up; prints one line per op. Without a usable CUDA backend it prints
"skipped: no CUDA (...)" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from sirl_kernels.backends.rows import Rows


def _time_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def _eager_forward(logits, labels, inv_t):
    z = logits.float() * inv_t
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    entropy = -(p * logp).nan_to_num().sum(-1)
    return logp.gather(1, labels[:, None]).squeeze(1), entropy


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--v", type=int, default=151936)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-eager", action="store_true", help="skip eager (it needs ~3 fp32 copies of the logits)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    try:
        from sirl_kernels.backends import cuda as cuda_backend
    except ImportError:  # run from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from sirl_kernels.backends import cuda as cuda_backend
    from sirl_kernels.backends.rows import logprob_entropy_coefficients

    why = cuda_backend.unavailable_reason(torch.device("cuda"))
    if why is not None:
        print(f"skipped: no CUDA ({why})")
        return 0

    dtype = getattr(torch, args.dtype)
    n, v, t = args.n, args.v, args.temperature
    logits = (torch.randn(n, v, device="cuda") * 4).to(dtype)
    labels = torch.randint(0, v, (n,), device="cuda")
    g_lp = torch.randn(n, device="cuda")
    g_h = torch.randn(n, device="cuda")
    bytes_in = logits.numel() * logits.element_size()
    results = {"device": torch.cuda.get_device_name(), "n": n, "v": v, "dtype": args.dtype, "ops": {}}

    def report(name, ms, traffic_bytes):
        gbs = traffic_bytes / ms / 1e6
        results["ops"][name] = {"ms": ms, "GB/s": gbs}
        print(f"{name:<28} {ms:9.3f} ms  {gbs:8.1f} GB/s")

    _, h, stats = cuda_backend.logits_forward(Rows(logits, labels, t, -100))
    coef = logprob_entropy_coefficients(g_lp, g_h, h)
    report("cuda forward", _time_ms(lambda: cuda_backend.logits_forward(Rows(logits, labels, t, -100)), args.warmup,
                                    args.iters), bytes_in)
    report("cuda backward", _time_ms(
        lambda: cuda_backend.logits_backward(Rows(logits, labels, t, -100), stats, coef), args.warmup, args.iters
    ), 2 * bytes_in)
    work = logits.clone()
    report("cuda backward (in place)", _time_ms(
        lambda: cuda_backend.logits_backward(Rows(work, labels, t, -100), stats, coef, out=work), args.warmup,
        args.iters
    ), 2 * bytes_in)
    del work
    small = logits[:64]
    report("cuda forward N=64 (split-V)", _time_ms(
        lambda: cuda_backend.logits_forward(Rows(small, labels[:64], t, -100)), args.warmup, args.iters
    ), small.numel() * small.element_size())
    if not args.no_eager:
        try:
            report("eager forward", _time_ms(lambda: _eager_forward(logits, labels, 1.0 / t), args.warmup,
                                             args.iters), bytes_in)
        except torch.OutOfMemoryError:
            print("eager forward: out of memory")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
