"""Capability spot checks on instruction or MT-Bench-style questions (MT-Bench: the first turn only).

Per response: its length in tokens and words, whether it hit ``max_new_tokens``, whether the refusal judge (keyword by
default) calls it a refusal, and its log-probability under the *base* model (the model with its adapter disabled, or
``--base-model``); overall ``perplexity = exp(-sum log p / tokens)`` over all response tokens. A fluent answer
keeps a low base-model perplexity; a training run that drifts into gibberish or repetition shows up here.

External judge hook: ``score_fn(questions, responses) -> list[float | None]`` (e.g. a call to a GPT-4 grader with
the MT-Bench prompt, or a reward model); ``--score-fn MODULE:FUNCTION`` on the command line. Its mean, overall and
per category, goes into the summary as ``judge_score_mean``.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import nullcontext

from sirl.eval.datasets import PromptSet
from sirl.eval.judge import KEYWORD_SETS, apply_judge, describe
from sirl.eval.report import bar_chart, distinct_n, markdown_table, mean, run_info, write_outputs


def capability_summary(categories, n_tokens, truncated, words, base_logprobs, refused, scores=None) -> dict:
    """Means over all responses and per category; ``base_logprobs`` are per-response mean log-probs."""
    from sirl.eval.generate import perplexity

    def block(idx):
        lp = [base_logprobs[i] for i in idx]
        out = {"n": len(idx), "response_tokens_mean": mean(n_tokens[i] for i in idx),
               "response_words_mean": mean(words[i] for i in idx),
               "truncated_frac": mean(float(truncated[i]) for i in idx),
               "refusal_rate": mean(float(refused[i]) for i in idx),
               "perplexity": perplexity(lp, [n_tokens[i] for i in idx])}
        if scores is not None:
            out["judge_score_mean"] = mean(scores[i] for i in idx)
        return out

    if not n_tokens:
        raise ValueError("no responses to score")
    summary = block(range(len(n_tokens)))
    summary["response_tokens_median"] = statistics.median(n_tokens)
    per_response = [math.exp(-lp) for lp in base_logprobs if lp is not None]
    summary["perplexity_median"] = statistics.median(per_response) if per_response else None
    cats: dict = {}
    for i, c in enumerate(categories):
        if c is not None:
            cats.setdefault(str(c), []).append(i)
    summary["per_category"] = {c: block(idx) for c, idx in cats.items()}
    return summary


def capability_tables(summary: dict) -> str:
    keys = [k for k in ("n", "response_tokens_mean", "response_words_mean", "truncated_frac", "refusal_rate",
                        "perplexity", "judge_score_mean") if k in summary]
    rows = [["all", *(summary[k] for k in keys)]]
    rows += [[c, *(v.get(k) for k in keys)] for c, v in summary["per_category"].items()]
    return markdown_table(["category", *keys], rows)


def base_logprobs(model, tokenizer, gens, base=None, system_prompt=None, max_prompt_tokens=2048) -> list:
    """Each response's mean log-prob under the base model: ``base=(model, tokenizer)`` when given (re-tokenised
    from the text when its vocabulary differs), else ``model`` with its adapters disabled, else ``model`` itself."""
    from sirl.eval.generate import logprob_under, reencode

    if base is not None:
        base_model, base_tok = base
        pad = base_tok.pad_token_id if base_tok.pad_token_id is not None else base_tok.eos_token_id
        if base_tok.get_vocab() == tokenizer.get_vocab():
            return logprob_under(base_model, gens, pad)
        prompt_ids, response_ids = reencode(gens, base_tok, system_prompt, max_prompt_tokens)
        return logprob_under(base_model, gens, pad, prompt_ids=prompt_ids, response_ids=response_ids)
    disable = getattr(model, "disable_adapter", None)
    if not callable(disable) and all(g.logprob_mean is not None for g in gens):
        return [g.logprob_mean for g in gens]  # scored at temperature 1 during generation: the same numbers
    with disable() if callable(disable) else nullcontext():
        return logprob_under(model, gens, tokenizer.pad_token_id)


def perplexity_model(model, meta: dict | None) -> str:
    if meta and meta.get("base_model"):
        return meta["base_model"]
    if callable(getattr(model, "disable_adapter", None)):
        return "the evaluated model with its adapter disabled"
    return "the evaluated model"


def run_capability(model, tokenizer, prompts: PromptSet, *, output_dir, gen: dict, base=None, score_fn=None,
                   judge=None, meta: dict | None = None, plot: bool = True, echo: bool = True) -> dict:
    from sirl.eval.generate import generate

    start = time.time()
    gen = {**gen, "score_temperature": 1.0}
    gens = generate(model, tokenizer, prompts.prompts, **gen)
    responses = [g.response for g in gens]
    lps = base_logprobs(model, tokenizer, gens, base, gen.get("system_prompt"), gen.get("max_prompt_tokens", 2048))
    judge = judge or KEYWORD_SETS["default"]
    refused = apply_judge(judge, prompts.prompts, responses)
    scores = None
    if score_fn is not None:
        scores = list(score_fn(list(prompts.prompts), responses))
        if len(scores) != len(responses):
            raise ValueError(f"score_fn returned {len(scores)} scores for {len(responses)} responses")
    categories = prompts.categories()
    summary = capability_summary(categories, [g.n_tokens for g in gens], [g.truncated for g in gens],
                                 [len(r.split()) for r in responses], lps, refused, scores)
    summary.update(command="capability", entropy_mean=mean(g.entropy_mean for g in gens),
                   repetition=1.0 - distinct_n([g.response_ids for g in gens]), data=prompts.source,
                   prompt_column=prompts.prompt_column, category_column=prompts.category_column,
                   perplexity_model=perplexity_model(model, meta), refusal_judge=describe(judge),
                   generation=gen, elapsed_s=round(time.time() - start, 1), **(meta or {}), **run_info())
    records = [{"index": i, "category": c, "refused": r, "base_logprob_mean": lp,
                **({"judge_score": scores[i]} if scores is not None else {}), **g.record()}
               for i, (c, g, r, lp) in enumerate(zip(categories, gens, refused, lps))]
    table = capability_tables(summary)
    out = write_outputs(output_dir, summary, records, table)
    if plot:
        per = summary["per_category"] or {"all": summary}
        bar_chart(out / "capability.png", [("refusal rate", {k: v["refusal_rate"] for k, v in per.items()}),
                                           ("truncated fraction", {k: v["truncated_frac"] for k, v in per.items()})],
                  "fraction of responses")
    if echo:
        print(table)
    return summary
