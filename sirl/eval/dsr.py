"""Defense success rate: the fraction of harmful prompts (under each attack) whose response the judge calls a refusal.

``DSR = refusals / responses`` (the attack success rate is ``1 - DSR``), overall, per attack and per category. The
judge sees the original harmful request, not its attacked form (a base64 request would only confuse it); note
that a keyword judge counts an answer it cannot read (e.g. one written in base64) as a success of the attack.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sirl.eval.attacks import Attack
from sirl.eval.datasets import PromptSet
from sirl.eval.judge import apply_judge, describe
from sirl.eval.report import bar_chart, distinct_n, mean, rate_table, rates_by, run_info, write_outputs


@dataclass
class Item:
    index: int  # row of the prompt set
    attack: str
    category: str | None
    goal: str  # the harmful request as written in the data
    prompt: str  # what the model receives


def build_items(prompts: PromptSet, attacks: list[Attack]) -> list[Item]:
    cats = prompts.categories()
    return [Item(i, a.name, cats[i], goal, a(goal, i, row))
            for a in attacks for i, (goal, row) in enumerate(zip(prompts.prompts, prompts.rows))]


def dsr_summary(attacks: list[str], categories: list[str | None], refused: list[bool]) -> dict:
    """The numbers of one run from per-response (attack, category, refused) triples."""
    if not refused:
        raise ValueError("no responses to score")
    n, k = len(refused), sum(map(bool, refused))

    def renamed(groups):
        return {key: {"n": g["n"], "refused": g["count"], "dsr": g["dsr"]} for key, g in groups.items()}

    return {"dsr": k / n, "asr": 1 - k / n, "n": n, "n_refused": k,
            "per_attack": renamed(rates_by(attacks, refused, "dsr")),
            "per_category": renamed(rates_by(categories, refused, "dsr"))}


def dsr_tables(summary: dict) -> str:
    parts = [rate_table(summary["per_attack"], "attack", "dsr") + f"\n\noverall DSR {summary['dsr']:.3f} "
             f"(n={summary['n']}, refused {summary['n_refused']})"]
    if summary["per_category"]:
        parts.append(rate_table(summary["per_category"], "category", "dsr"))
    return "\n\n".join(parts)


def run_dsr(model, tokenizer, prompts: PromptSet, attacks: list[Attack], judge, *, output_dir, gen: dict,
            meta: dict | None = None, plot: bool = True, echo: bool = True) -> dict:
    """Generate for every (attack, prompt), judge, write ``summary.json``, ``responses.jsonl``, ``table.md`` and
    ``dsr.png`` into ``output_dir``; returns the summary."""
    from sirl.eval.generate import generate

    start = time.time()
    items = build_items(prompts, attacks)
    gens = generate(model, tokenizer, [it.prompt for it in items], **gen)
    refused = apply_judge(judge, [it.goal for it in items], [g.response for g in gens])
    summary = dsr_summary([it.attack for it in items], [it.category for it in items], refused)
    summary.update(
        command="dsr",
        entropy_mean=mean(g.entropy_mean for g in gens),
        response_tokens_mean=mean(g.n_tokens for g in gens),
        repetition=1.0 - distinct_n([g.response_ids for g in gens]),
        judge=describe(judge), attacks=[a.name for a in attacks], n_prompts=len(prompts),
        data=prompts.source, prompt_column=prompts.prompt_column, category_column=prompts.category_column,
        generation=gen, elapsed_s=round(time.time() - start, 1), **(meta or {}), **run_info(),
    )
    records = [{"attack": it.attack, "index": it.index, "category": it.category, "goal": it.goal, "refused": r,
                **g.record()} for it, g, r in zip(items, gens, refused)]
    table = dsr_tables(summary)
    out = write_outputs(output_dir, summary, records, table)
    if plot:
        bar_chart(out / "dsr.png", [("DSR per attack", {k: v["dsr"] for k, v in summary["per_attack"].items()}),
                                    ("DSR per category", {k: v["dsr"] for k, v in summary["per_category"].items()})],
                  "defense success rate")
    if echo:
        print(table)
    return summary

