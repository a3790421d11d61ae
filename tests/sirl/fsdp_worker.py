"""Run by torch.multiprocessing.spawn from test_fsdp.py: the policy sharded with FSDP2 over 2 gloo ranks."""

import os
import sys

import torch


def passes(dd, rows, lora: bool, shard: bool):
    """One no-grad scoring pass and one policy-gradient pass over ``rows`` of ddp_worker's fixed batch: the scores
    of those rows and the full gradient of every trainable parameter, as this rank sees them."""
    from contextlib import nullcontext

    from ddp_worker import fixed_batch
    from sirl.config import SIRLConfig
    from sirl.models import add_lora, tiny_random_llama, tiny_tokenizer
    from sirl.passes import TokenScorer, policy_gradient_pass, token_logprobs_entropy
    from sirl.sharding import full_tensor
    from sirl.sharding import shard as shard_model

    model = tiny_random_llama(tiny_tokenizer(), seed=0)
    if lora:
        model = add_lora(model, 4, 8, 0.0, ["q_proj", "v_proj"])
        with torch.no_grad():  # a trained-looking adapter, the same in every process (not the global RNG's)
            g = torch.Generator().manual_seed(3)
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    scorer = shard_model(model, torch.device("cpu"), bf16=False) if shard else TokenScorer(model)
    batch = fixed_batch(model.config.vocab_size).select(rows)
    logprobs, entropy = token_logprobs_entropy(scorer, batch, 1.0, 1000)
    old = logprobs - 0.3 * batch.completion_mask  # off-policy, so clipping and ratios matter
    ref = logprobs + 0.1 * batch.completion_mask
    adv = torch.linspace(-1, 1, 8)[rows]
    cfg = SIRLConfig(micro_batch_tokens=20, kl_beta=0.1)
    stats = policy_gradient_pass(scorer, batch, old, ref, adv, batch.completion_mask.bool(), cfg, dd, nullcontext())
    grads = {n: full_tensor(p.grad).clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"logprobs": logprobs, "entropy": entropy, "grads": grads, "stats": stats}


def run(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from sirl.dist import init_distributed

    dd = init_distributed(torch.device("cpu"), "fsdp")
    assert dd.sharded
    half = slice(rank * 4, (rank + 1) * 4)  # whole groups of 4 per rank
    for lora in (False, True):
        torch.save(passes(dd, half, lora, shard=True), os.path.join(out_dir, f"fsdp{int(lora)}-rank{rank}.pt"))
    # Leave the group together and explicitly: a rank that exits while gloo's threads still serve the other one
    # aborts ("terminate called without an active exception", SIGABRT; 1 run in 4 here without this).
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    # Then leave without the interpreter's and the C++ runtime's exit-time teardown, where a loaded machine still
    # met a joinable thread now and then (the same SIGABRT in 1 CI run of about 3 even with the two calls above).
    # The results are on disk already (torch.save closed its files): nothing is lost by skipping it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
