"""Processes and devices: the process group under torchrun, the collectives the loop needs, the training device.

Every helper is a no-op in a single process, so the loop reads the same with one rank or many.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    # Where the tensors of a collective live: NCCL (the backend on CUDA) only reduces CUDA tensors, gloo CPU ones.
    device: torch.device = torch.device("cpu")
    sharded: bool = False  # parallel=fsdp over more than one rank (sirl.sharding)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over ranks, on this rank's collective device (``t`` itself in a single process)."""
        if self.world == 1:
            return t
        t = t.to(self.device, torch.float64)
        dist.all_reduce(t)
        return t

    def all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        return self.all_sum_tensor(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    def all_cat(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenation over ranks in rank order (every rank holds the same number of rows)."""
        if self.world == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    def run_on_main(self, fn):
        """``fn()`` on rank 0 only, its result returned there (None elsewhere). Every rank learns whether it
        succeeded: rank 0 re-raises its exception, the others raise RuntimeError, so no rank waits forever in a
        later collective for one that failed."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, once every rank knows
                error = exc
        failed = self.all_sum([1.0 if error is not None else 0.0])[0] > 0
        if error is not None:
            raise error
        if failed:
            raise RuntimeError("rank 0 failed (its error says why)")
        return result

    def rank0_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag`` on every rank (e.g. rank 0's evaluation decided to stop)."""
        return self.all_sum([float(flag) if self.main else 0.0])[0] > 0

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


# Rank 0 evaluates while the other ranks wait in a barrier: an evaluation (generation on every held-out set, an
# LLM judge) can outlast NCCL's default 10-minute collective timeout, which would abort the waiting ranks.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def init_distributed(device: torch.device, parallel: str = "ddp") -> Dist:
    """The process group under torchrun (NCCL when ``device`` is CUDA, else gloo); a single-process Dist without.
    ``parallel="fsdp"`` shards the model when there is more than one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's barrier and communicators use the current device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    if dist.is_initialized():
        collective = device if dist.get_backend() == "nccl" else torch.device("cpu")
        world = dist.get_world_size()
        return Dist(dist.get_rank(), world, collective, sharded=parallel == "fsdp" and world > 1)
    return Dist()


def pick_device(device: str) -> torch.device:
    """The config's ``device``: ``auto`` is this rank's GPU (``LOCAL_RANK``) when there is one, else the CPU."""
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
