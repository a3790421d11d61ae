"""The collectives' tensors live where the backend can reduce them (NCCL: CUDA only; gloo: CPU), and the process
group waits long enough for rank 0's evaluation."""

import datetime

import pytest
import torch
import torch.distributed as dist

from sirl.dist import COLLECTIVE_TIMEOUT, Dist, init_distributed


class Reduced(Exception):
    """Raised by the fake all_reduce: the test only looks at the tensor it was given."""


def test_every_sum_reduces_a_tensor_on_the_dist_device(monkeypatch):
    seen = []

    def fake_all_reduce(t, *args, **kwargs):
        seen.append(t.device)
        raise Reduced

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    device = torch.device("meta")  # stands in for a CUDA device (NCCL) on a machine without one
    calls = (lambda d: d.all_sum([1.0, 2.0]), lambda d: d.rank0_flag(True), lambda d: d.all_sum_tensor(torch.ones(2)))
    for call in calls:
        with pytest.raises(Reduced):
            call(Dist(0, 2, device))
    assert seen == [device] * len(calls)
    assert Dist().all_sum([1.0, 2.0]) == [1.0, 2.0]  # one process: nothing to reduce


@pytest.mark.parametrize("device, backend", [(torch.device("cuda", 1), "nccl"), (torch.device("cpu"), "gloo")])
def test_init_distributed_picks_the_backend_and_collective_device_of_the_training_device(monkeypatch, device,
                                                                                         backend):
    calls, initialized = {}, []

    def init_process_group(name, **kwargs):
        calls.update(backend=name, **kwargs)
        initialized.append(True)

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: bool(initialized))
    monkeypatch.setattr(dist, "init_process_group", init_process_group)
    monkeypatch.setattr(dist, "get_backend", lambda *args: calls["backend"])
    monkeypatch.setattr(dist, "get_rank", lambda *args: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *args: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.update(current=d))
    dd = init_distributed(device)
    assert calls["backend"] == backend and calls.get("current") == (device if backend == "nccl" else None)
    assert (dd.rank, dd.world, dd.device) == (1, 2, device if backend == "nccl" else torch.device("cpu"))
    # rank 0 evaluates while the others wait in a barrier: longer than NCCL's default 10 minutes
    assert calls["timeout"] == COLLECTIVE_TIMEOUT >= datetime.timedelta(minutes=30)
