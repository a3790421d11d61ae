"""Run by torch.multiprocessing.spawn from test_ddp.py (a plain module so the children can import it)."""

import os

import torch


def fixed_batch(vocab, rows=8, width=10):
    from sirl.rollout import Rollout

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    comp = torch.zeros_like(ids)
    for i in range(rows):
        comp[i, 4:4 + 2 + i % 5] = 1  # unequal lengths: token-mean normalisation must be global
    attn = torch.ones_like(ids)
    return Rollout(ids, attn, comp, torch.zeros(rows, dtype=torch.bool), torch.arange(rows) // 4, 4)


def gradient_pass(dd, rows):
    """Gradients of one policy_gradient_pass over ``rows`` of the fixed batch, as this rank sees them."""
    from contextlib import nullcontext

    from sirl.config import SIRLConfig
    from sirl.models import tiny_random_llama, tiny_tokenizer
    from sirl.passes import policy_gradient_pass, token_logprobs_entropy

    tok = tiny_tokenizer()
    model = tiny_random_llama(tok, seed=0)
    batch = fixed_batch(model.config.vocab_size).select(rows)
    old, _ = token_logprobs_entropy(model, batch, 1.0, 1000)
    old = old - 0.3 * batch.completion_mask  # off-policy, so clipping and ratios matter
    ref = old + 0.1 * batch.completion_mask
    adv = torch.linspace(-1, 1, 8)[rows]
    cfg = SIRLConfig(micro_batch_tokens=20, kl_beta=0.1)
    stats = policy_gradient_pass(model, batch, old, ref, adv, batch.completion_mask.bool(), cfg, dd, nullcontext())
    return {n: p.grad.clone() for n, p in model.named_parameters()}, stats


def run(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import sirl.train as train_mod
    from sirl.dist import init_distributed
    from sirl.config import load_config

    dd = init_distributed(torch.device("cpu"))
    half = slice(rank * 4, (rank + 1) * 4)  # whole groups of 4 per rank
    grads, stats = gradient_pass(dd, half)
    torch.save({"grads": grads, "stats": stats}, os.path.join(out_dir, f"grads{rank}.pt"))

    cfg = load_config(preset="tiny", overrides=dict(
        steps=2, save_every=2, max_new_tokens=5, prompts_per_step=4, output_dir=os.path.join(out_dir, "run"),
        progress=False, log_completions_every=0, kl_beta=0.01,
        # rank 0 evaluates at steps 0 and 2 while rank 1 waits; both must agree on the early-stop decision
        eval_every=2, eval_overrefusal="overrefusal_cpu_demo.jsonl", eval_limit=2, eval_max_new_tokens=2,
        keep_best="eval/response_len", early_stop_patience=1,
    ))
    judge_loads, real_load = [], train_mod.load_llm_judge

    def counted_load(*args, **kwargs):  # only rank 0 evaluates, so only rank 0 may load an LLM judge
        judge_loads.append(rank)
        return real_load(*args, **kwargs)

    train_mod.load_llm_judge = counted_load
    rows = train_mod.train(cfg)
    torch.save({"rows": rows, "judge_loads": judge_loads}, os.path.join(out_dir, f"rows{rank}.pt"))
    torch.distributed.destroy_process_group()
