"""Model loading for evaluation, batched generation, and per-response scores from the fused kernels.

Generation reuses the trainer's pieces: the chat template (``sirl.data.encode_prompt``), ``sirl.rollout.rollout``
(greedy or sampled) and ``sirl.passes.token_logprobs_entropy`` (the fused log-prob/entropy op; no ``[B, T, V]``
logits). A response's *entropy* is the mean over its tokens (the eos included, as in the SIRL reward) of the
entropy of the next-token distribution that produced each token, at ``score_temperature`` (1.0 = the policy
itself); its *log-prob* is the mean log-probability of its tokens under the scoring model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch


@dataclass
class Generation:
    prompt: str  # the user message the model saw (after any attack transformation)
    response: str
    prompt_ids: list[int] = field(repr=False)
    response_ids: list[int] = field(repr=False)  # completion tokens, up to and including the first eos
    truncated: bool  # no eos within max_new_tokens
    entropy_mean: float | None = None
    logprob_mean: float | None = None

    @property
    def n_tokens(self) -> int:
        return len(self.response_ids)

    def record(self) -> dict:
        """JSON-ready, without token ids."""
        out = {k: v for k, v in asdict(self).items() if not k.endswith("_ids")}
        out["n_tokens"] = self.n_tokens
        return out


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_adapter(model, path: str):
    """A LoRA (or other PEFT) adapter saved by ``sirl train`` (``OUTPUT_DIR/final``) on top of ``model``: checked
    against its manifest when it has one, its weights read as data (safetensors, or weights-only ``.bin``)."""
    import pickle

    from sirl.files import check_saved_dir, load_error

    try:
        import peft
        from safetensors import SafetensorError
    except ImportError as exc:
        raise ImportError("--adapter needs peft: pip install peft") from exc
    check_saved_dir(Path(path))
    try:
        return peft.PeftModel.from_pretrained(model, path, is_trainable=False)
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as exc:
        raise load_error(exc, path, "adapter") from None


def load_model(name: str, adapter: str | None = None, *, device: str = "auto", dtype: str = "auto", seed: int = 0):
    """-> (model in eval mode, tokenizer); ``name`` as in ``sirl.models.load_model_and_tokenizer``."""
    from sirl.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(name, device=pick_device(device), dtype=dtype, seed=seed)
    if adapter:
        model = load_adapter(model, adapter)
    return model.eval(), tokenizer


def pack(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int, device="cpu"):
    """Token id lists -> a ``Rollout`` (left-padded prompts | right-padded responses) for scoring."""
    from sirl.rollout import Rollout, left_pad

    prompt, prompt_mask = left_pad(prompt_ids, pad_id)
    comp, comp_mask = left_pad([r[::-1] for r in response_ids], pad_id)  # right padding = left padding, mirrored
    comp, comp_mask = comp.flip(-1), comp_mask.flip(-1)
    n = len(prompt_ids)
    return Rollout(
        input_ids=torch.cat([prompt, comp], 1).to(device),
        attention_mask=torch.cat([prompt_mask, comp_mask], 1).to(device),
        completion_mask=torch.cat([torch.zeros_like(prompt_mask), comp_mask], 1).to(device),
        truncated=torch.zeros(n, dtype=torch.bool, device=device),
        prompt_index=torch.arange(n, device=device),
        prompt_length=prompt.shape[1],
    )


def row_means(values: torch.Tensor, mask: torch.Tensor) -> list[float | None]:
    """Mean of ``values`` over each row's masked positions (None for a row with none)."""
    m = mask.to(values.dtype)
    counts = m.sum(-1)
    means = (values * m).sum(-1) / counts.clamp_min(1)
    return [None if c == 0 else float(v) for v, c in zip(means.tolist(), counts.tolist())]


@torch.no_grad()
def score(model, rollout, temperature: float = 1.0, token_budget: int = 8192) -> tuple[list, list]:
    """Per-row (mean log-prob, mean entropy) over the completion tokens, via the fused kernels."""
    from sirl.passes import token_logprobs_entropy

    logprobs, entropy = token_logprobs_entropy(model, rollout, temperature, token_budget)
    return row_means(logprobs, rollout.completion_mask), row_means(entropy, rollout.completion_mask)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    samples_per_prompt: int = 1,
    system_prompt: str | None = None,
    max_prompt_tokens: int = 2048,
    score_temperature: float | None = 1.0,
    token_budget: int = 8192,
    progress: bool = False,
) -> list[Generation]:
    """``samples_per_prompt`` responses per prompt (contiguous, in prompt order). Prompts are batched by length
    (less padding); ``score_temperature=None`` skips the entropy/log-prob pass."""
    from tqdm.auto import tqdm

    from sirl.data import encode_prompt
    from sirl.rollout import rollout

    encoded = [encode_prompt(tokenizer, p, system_prompt, max_prompt_tokens) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    out: list[list[Generation]] = [[] for _ in prompts]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    bar = tqdm(total=len(prompts) * samples_per_prompt, desc="generating", unit="answer", disable=not progress,
               dynamic_ncols=True)
    for idx in batches:
        r = rollout(model, tokenizer, [encoded[i] for i in idx], group_size=samples_per_prompt,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=0, do_sample=do_sample)
        lp, ent = score(model, r, score_temperature, token_budget) if score_temperature else ([None] * len(r),) * 2
        comp = r.completion_mask.bool()
        for row in range(len(r)):
            i = idx[row // samples_per_prompt]
            ids = r.input_ids[row][comp[row]].tolist()
            out[i].append(Generation(
                prompt=prompts[i], response=tokenizer.decode(ids, skip_special_tokens=True).strip(),
                prompt_ids=encoded[i], response_ids=ids, truncated=bool(r.truncated[row]),
                entropy_mean=ent[row], logprob_mean=lp[row],
            ))
        bar.update(len(r))
    bar.close()
    return [g for per_prompt in out for g in per_prompt]


def reencode(generations: list[Generation], tokenizer, system_prompt: str | None = None,
             max_prompt_tokens: int = 2048) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt and response token ids under another tokenizer (text round trip; an eos ends complete responses)."""
    from sirl.data import encode_prompt

    prompts = [encode_prompt(tokenizer, g.prompt, system_prompt, max_prompt_tokens) for g in generations]
    responses = [tokenizer(g.response, add_special_tokens=False)["input_ids"]
                 + ([] if g.truncated or tokenizer.eos_token_id is None else [tokenizer.eos_token_id])
                 for g in generations]
    return prompts, [r or [tokenizer.eos_token_id] for r in responses]


@torch.no_grad()
def logprob_under(model, generations: list[Generation], pad_id: int, *, prompt_ids=None, response_ids=None,
                  batch_size: int = 16, token_budget: int = 8192) -> list[float | None]:
    """Mean log-prob of each response under ``model`` (temperature 1), from the generations' own token ids unless
    ``prompt_ids``/``response_ids`` are given (e.g. from ``reencode`` for a model with another tokenizer)."""
    device = next(model.parameters()).device
    prompt_ids = prompt_ids or [g.prompt_ids for g in generations]
    response_ids = response_ids or [g.response_ids for g in generations]
    out: list[float | None] = []
    for s in range(0, len(generations), batch_size):
        r = pack(prompt_ids[s:s + batch_size], response_ids[s:s + batch_size], pad_id, device)
        out += score(model, r, 1.0, token_budget)[0]
    return out


def perplexity(logprob_means: list[float | None], lengths: list[int]) -> float | None:
    """exp of the token-weighted mean negative log-prob over all responses (None when nothing was scored)."""
    pairs = [(lp, n) for lp, n in zip(logprob_means, lengths) if lp is not None and n > 0]
    total = sum(n for _, n in pairs)
    return math.exp(-sum(lp * n for lp, n in pairs) / total) if total else None
