"""The entropy gap: are refusals more confident than compliant answers? (the observation behind SIRL)

Responses are sampled for harmful and benign prompts (temperature 1, no top-k/top-p: the policy itself), each
judged refusal or compliance, and each response's mean token entropy computed with the fused kernels (the same
quantity as minus the SIRL reward). Two comparisons, each with a two-sided Mann-Whitney U test
(``scipy.stats.mannwhitneyu``):

- refusals vs compliant responses:   ``gap = compliance_entropy_mean - refusal_entropy_mean``
- responses to harmful vs benign prompts: ``prompt_gap = benign_entropy_mean - harmful_entropy_mean``

A positive gap means refusals (resp. answers to harmful prompts) are the more confident, lower-entropy group.
``auc`` is ``U / (n1 n2)``: the probability that a response of the second group has the higher entropy (ties count
half). For refusals vs compliances it is the AUROC of telling a refusal from its entropy alone (lower entropy ->
"refusal"): 0.5 is chance, 1.0 means every refusal is more confident than every compliance; the table shows it.
The same refusal-vs-compliance comparison restricted to harmful prompts is reported under ``harmful_only`` (it
separates the refusal effect from the prompt effect). A group with fewer than ``min_group`` responses makes that
comparison's gap and p-value ``null``, with a ``*_status`` string saying which group is too small (or empty).
"""

from __future__ import annotations

import time
from typing import Sequence

from sirl.eval.datasets import PromptSet
from sirl.eval.judge import apply_judge, describe
from sirl.eval.report import histograms, markdown_table, mean, run_info, write_outputs


def compare_groups(low: Sequence[float], high: Sequence[float], *, names=("low", "high"), min_group: int = 5) -> dict:
    """``gap = mean(high) - mean(low)`` and the two-sided Mann-Whitney U test of ``high`` against ``low``."""
    if min_group < 1:
        raise ValueError(f"min_group must be >= 1, got {min_group}")
    low, high = [float(x) for x in low], [float(x) for x in high]
    out = {"n_" + names[0]: len(low), "n_" + names[1]: len(high), "mean_" + names[0]: mean(low),
           "mean_" + names[1]: mean(high), "gap": None, "u_statistic": None, "p_value": None, "auc": None}
    small = [(name, len(g)) for name, g in zip(names, (low, high)) if len(g) < min_group]
    if small:
        kind = "empty group" if any(n == 0 for _, n in small) else "group too small"
        out["status"] = f"{kind}: " + ", ".join(f"{name} n={n}" for name, n in small) + f" (need >= {min_group})"
        return out
    from scipy.stats import mannwhitneyu

    res = mannwhitneyu(high, low, alternative="two-sided")
    out.update(gap=out["mean_" + names[1]] - out["mean_" + names[0]], u_statistic=float(res.statistic),
               p_value=float(res.pvalue), auc=float(res.statistic) / (len(low) * len(high)), status="ok")
    return out


def entropy_gap_summary(entropy: Sequence[float], refused: Sequence[bool], harmful: Sequence[bool],
                        min_group: int = 5) -> dict:
    """All numbers of the analysis from per-response entropy, verdict and prompt kind."""
    if not (len(entropy) == len(refused) == len(harmful)):
        raise ValueError("entropy, refused and harmful must have one entry per response")
    rows = [(e, bool(r), bool(h)) for e, r, h in zip(entropy, refused, harmful) if e is not None]
    pick = lambda cond: [e for e, r, h in rows if cond(r, h)]  # noqa: E731
    rc = compare_groups(pick(lambda r, h: r), pick(lambda r, h: not r), names=("refusal", "compliance"),
                        min_group=min_group)
    hb = compare_groups(pick(lambda r, h: h), pick(lambda r, h: not h), names=("harmful", "benign"),
                        min_group=min_group)
    ho = compare_groups(pick(lambda r, h: r and h), pick(lambda r, h: h and not r), names=("refusal", "compliance"),
                        min_group=min_group)
    n_h = sum(h for _, _, h in rows)
    return {
        "refusal_entropy_mean": rc["mean_refusal"], "compliance_entropy_mean": rc["mean_compliance"],
        "gap": rc["gap"], "p_value": rc["p_value"], "u_statistic": rc["u_statistic"], "auc": rc["auc"],
        "gap_status": rc["status"], "n_refusal": rc["n_refusal"], "n_compliance": rc["n_compliance"],
        "harmful_entropy_mean": hb["mean_harmful"], "benign_entropy_mean": hb["mean_benign"],
        "prompt_gap": hb["gap"], "prompt_p_value": hb["p_value"], "prompt_u_statistic": hb["u_statistic"],
        "prompt_auc": hb["auc"], "prompt_gap_status": hb["status"], "n_harmful": hb["n_harmful"],
        "n_benign": hb["n_benign"], "n": len(rows),
        "refusal_rate_harmful": mean(float(r) for _, r, h in rows if h) if n_h else None,
        "refusal_rate_benign": mean(float(r) for _, r, h in rows if not h) if len(rows) > n_h else None,
        "harmful_only": ho, "min_group": min_group,
    }


def entropy_gap_table(s: dict) -> str:
    ho = s["harmful_only"]
    rows = [
        ["refusal vs compliance", f"{s['n_refusal']} / {s['n_compliance']}", s["refusal_entropy_mean"],
         s["compliance_entropy_mean"], s["gap"], s["p_value"], s["auc"], s["gap_status"]],
        ["harmful vs benign prompts", f"{s['n_harmful']} / {s['n_benign']}", s["harmful_entropy_mean"],
         s["benign_entropy_mean"], s["prompt_gap"], s["prompt_p_value"], s["prompt_auc"], s["prompt_gap_status"]],
        ["refusal vs compliance (harmful only)", f"{ho['n_refusal']} / {ho['n_compliance']}", ho["mean_refusal"],
         ho["mean_compliance"], ho["gap"], ho["p_value"], ho["auc"], ho["status"]],
    ]
    return markdown_table(["comparison (A vs B)", "n A / n B", "entropy A", "entropy B", "gap B-A", "p (MWU)",
                           "AUROC (B above A)", "status"], rows)


def run_entropy_gap(model, tokenizer, harmful: PromptSet, benign: PromptSet, judge, *, output_dir, gen: dict,
                    min_group: int = 5, meta: dict | None = None, plot: bool = True) -> dict:
    from sirl.eval.generate import generate

    start = time.time()
    prompts = harmful.prompts + benign.prompts
    samples = gen.get("samples_per_prompt", 1)
    kinds = [True] * len(harmful) + [False] * len(benign)
    kinds = [k for k in kinds for _ in range(samples)]
    asked = [p for p in prompts for _ in range(samples)]
    gens = generate(model, tokenizer, prompts, **gen)
    refused = apply_judge(judge, asked, [g.response for g in gens])
    entropy = [g.entropy_mean for g in gens]
    summary = entropy_gap_summary(entropy, refused, kinds, min_group)
    summary.update(command="entropy-gap", judge=describe(judge), harmful_data=harmful.source, benign_data=benign.source,
                   n_harmful_prompts=len(harmful), n_benign_prompts=len(benign), generation=gen,
                   elapsed_s=round(time.time() - start, 1), **(meta or {}), **run_info())
    records = [{"harmful": k, "refused": r, **g.record()} for k, r, g in zip(kinds, refused, gens)]
    table = entropy_gap_table(summary)
    out = write_outputs(output_dir, summary, records, table)
    if plot:
        pick = lambda cond: [e for e, r, k in zip(entropy, refused, kinds) if e is not None and cond(r, k)]  # noqa: E731
        histograms(out / "entropy_gap.png", [
            ("refusals vs compliant responses", {"refusal": pick(lambda r, k: r), "compliance": pick(lambda r, k: not r)}),
            ("by prompt", {"harmful prompts": pick(lambda r, k: k), "benign prompts": pick(lambda r, k: not k)}),
        ], "mean token entropy of the response (nats)")
    print(table)
    return summary
