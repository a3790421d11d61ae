"""``parallel=fsdp``: parameters, gradients and optimizer state sharded over the ranks with FSDP2
(``torch.distributed.fsdp.fully_shard``), and the full copy of the policy that sampling, evaluation and export use.

Units: each decoder layer, and the root: the :class:`~sirl.passes.TokenScorer` around the model, which owns the
rest (embeddings, final norm, lm_head; tied weights stay in one unit). Every pass calls the root, so its forward
unshards lm_head for the fused head and its backward reduce-scatters lm_head's gradient like any other: the fused
head goes through FSDP's own hooks. Gradients are summed, not averaged (``set_gradient_divide_factor(1)``): the
loss is already normalised by the token count of all ranks, exactly as in the DDP path.

Mixed precision on CUDA with ``bf16=true``: parameters kept (and optimized) in fp32 shards, gathered in bf16 for
compute, gradients reduced in fp32 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``). On CPU the
compute is fp32.

Generation (the ``hf`` engine), evaluation and saving ``final/`` / ``best/`` need the whole model on one rank,
which a sharded model only has for the duration of one unit's forward: they use a **full copy**, a plain copy of
the policy made before sharding, into which :func:`refresh_full_copy` gathers the current weights (one all-gather
per parameter, every rank) after each update. The ``vllm`` engine reads its weights from the same copy. Frozen
parameters never change: the copy has had them since it was made, and only the trainable ones are gathered.
"""

from __future__ import annotations

import copy

import torch

from sirl.passes import TokenScorer
from sirl_kernels.hf import unwrap_model


def decoder_layers(model) -> list[torch.nn.Module]:
    decoder = unwrap_model(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise NotImplementedError(f"parallel=fsdp needs the decoder's layers as `.layers`; "
                                  f"{type(decoder).__name__} has none")
    return list(layers)


def shard(model, device: torch.device, bf16: bool) -> TokenScorer:
    """``model`` sharded in place (each decoder layer a unit) under a :class:`TokenScorer` root unit."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    compute = torch.bfloat16 if device.type == "cuda" and bf16 else None
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, mp_policy=policy)
    scorer = TokenScorer(model)
    fully_shard(scorer, mp_policy=policy)
    for unit in scorer.modules():
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    return scorer


def full_copy(model):
    """The copy that generation, evaluation and export use: made before ``model`` is sharded."""
    return copy.deepcopy(model)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded parameter (DTensor) gathered whole on every rank (a collective); a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def refresh_full_copy(sharded, copy_) -> None:
    """The sharded model's trainable weights into its full copy (every rank calls this: each is gathered with a
    collective; the frozen ones never change and were copied with the model). Names match: the copy was made from
    the same module before sharding."""
    params = dict(copy_.named_parameters())
    for name, p in sharded.named_parameters():
        if p.requires_grad:
            params[name].copy_(full_tensor(p.detach()))
