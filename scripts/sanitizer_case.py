"""A small forward+backward of every Triton kernel family (split and unsplit, bf16, a V % 8 != 0 view, fused
linear with bias over several vocabulary chunks and over row chunks, in place) and of the CUDA backend (one block
per row and split-V, fp32 and bf16 rows that start off their 16-byte alignment, an ignored and an out-of-range
label, in place), for compute-sanitizer (scripts/gpu_check.sh runs it under memcheck, racecheck, initcheck and
synccheck)."""
import torch
import sirl_kernels
from sirl_kernels.backends import cuda as cuda_backend
from sirl_kernels.backends.rows import Rows, logprob_entropy_coefficients
from sirl_kernels.backends.triton import utils

torch.manual_seed(0)
for splits in (None, 3):
    with utils.force_num_splits(splits):
        x = (torch.randn(7, 3001, device="cuda") * 3).bfloat16().requires_grad_(True)
        y = torch.randint(0, 3001, (7,), device="cuda"); y[2] = -100
        lp, h = sirl_kernels.token_logprobs_entropy(x * 1, y, backend="triton", inplace_backward=True)
        (lp.sum() + h.sum()).backward()
        hid = torch.randn(37, 64, device="cuda").bfloat16().requires_grad_(True)
        w = (torch.randn(999, 64, device="cuda") / 8).bfloat16().requires_grad_(True)
        b = torch.randn(999, device="cuda").bfloat16().requires_grad_(True)
        y = torch.randint(0, 999, (37,), device="cuda"); y[5] = -100
        for chunk in (16, 3):  # vocabulary chunks of all 37 rows; then row chunks too
            lp, h = sirl_kernels.linear_token_logprobs_entropy(hid, w, y, bias=b, backend="triton", chunk_size=chunk)
            (lp.sum() + h.sum()).backward()
        wide = (torch.randn(5, 3008, device="cuda") * 3).bfloat16().requires_grad_(True)
        y = torch.randint(0, 3001, (5,), device="cuda")
        for inplace in (False, True):  # V % 8 != 0 with a 16-byte-aligned stride of 3008
            x = wide[:, :3001] * 1 if inplace else wide[:, :3001]
            lp, h = sirl_kernels.token_logprobs_entropy(x, y, backend="triton", inplace_backward=inplace)
            (lp.sum() + h.sum()).backward()

# CUDA: rows of big[:, 1:3002] start one element past an aligned one (the kernels' scalar head, vectors, tail).
for dtype in (torch.float32, torch.bfloat16):
    big = (torch.randn(7, 3003, device="cuda") * 3).to(dtype)
    x = big[:, 1:3002]
    y = torch.randint(0, 3001, (7,), device="cuda"); y[2] = -100; y[4] = 3001  # ignored; out of range (NaN row)
    g = torch.randn(7, device="cuda")
    outs = {}
    for splits in (1, 3):
        lp, h, stats = cuda_backend.logits_forward(Rows(x, y, 0.7, -100), num_splits=splits)
        grad = cuda_backend.logits_backward(Rows(x, y, 0.7, -100), stats, logprob_entropy_coefficients(g, g, h))
        outs[splits] = (lp, h, grad)
    inplace = big.clone()[:, 1:3002]
    cuda_backend.logits_backward(Rows(inplace, y, 0.7, -100), stats, logprob_entropy_coefficients(g, g, h), out=inplace)
    ok = torch.tensor([r not in (2, 4) for r in range(7)], device="cuda")
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2**-6, atol=2**-6)  # grads in dtype
    for one, split, t in zip(outs[1], outs[3], (dict(rtol=1e-5, atol=1e-5),) * 2 + (tol,)):
        torch.testing.assert_close(split[ok], one[ok], **t)
    torch.testing.assert_close(inplace[ok], outs[3][2][ok], **tol)
    assert bool(torch.isnan(outs[3][0][4])) and bool(torch.isnan(outs[3][2][4]).all())
    assert bool((outs[3][0][2] == 0).all()) and bool((outs[3][2][2] == 0).all())
    leaf = big.clone().requires_grad_(True)  # the public API and autograd on the misaligned view
    lp, h = sirl_kernels.token_logprobs_entropy(leaf[:, 1:3002], y.clamp(max=3000), temperature=0.7,
                                                backend="cuda")
    (lp.sum() + h.sum()).backward()
torch.cuda.synchronize()
print("ok")
