"""The study's report: reads every stage's artifacts under the run folder, writes ``docs/results/cpu-study.md``,
its figures (``cpu-study-*.png``) and every number in ``cpu-study.json``.

    python examples/cpu_study/report.py --run-dir runs/cpu_study --out runs/cpu_study/report --docs docs/results

Nothing in the report is typed in by hand except the paper's published numbers (``PAPER``) and the discussion in
``discussion.md`` (included as written). Intervals: 95% bootstrap (2000 resamples, seed 0) over JailbreakBench /
HarmBench behaviours as clusters (``sirl.eval.stats``), so the 23 attacks of one behaviour count as one draw.
A condition trained with several seeds is summarised by the per-item mean over its seeds; the spread over seeds is
shown beside it. Sample completions shown are refusals only: a training sample is printed only when it is word for
word one of the study's refusal texts (the keyword judge alone could pass a harmful answer that says "I cannot").
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from data import load_refusals  # noqa: E402
from sirl.eval.judge import KEYWORD_SETS  # noqa: E402
from sirl.eval.report import fmt, markdown_table  # noqa: E402
from sirl.eval.stats import bootstrap_mean, bootstrap_paired_difference  # noqa: E402

CONDITIONS = ("sirl", "reversed", "random")
LABEL = {"base": "SmolLM2-135M-Instruct (base)", "aligned": "aligned = no training", "sirl": "SIRL (-entropy)",
         "reversed": "reversed (+entropy)", "random": "random reward"}
DSR_PARTS = {"dsr_jbb_columns": "jbb", "dsr_hm_columns": "hm", "dsr_offline": "jbb"}  # cluster namespace
# The paper's numbers (arXiv 2510.01088, as summarised in issue 22): average DSR over its 20+ jailbreaks.
PAPER = [
    ("average DSR under jailbreaks, before -> after SIRL", "Llama-3.1-8B-Instruct: 84.3 -> 99.1"),
    ("reversed reward (+entropy)", "72.1"),
    ("random reward", "85.2"),
    ("minimum perplexity reward", "98.7"),
    ("over-refusal", "Qwen2.5-7B-Instruct on OR-Bench: 21.4 -> 47.2"),
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def ci(d: dict | None, digits: int = 3, pct: bool = False) -> str:
    if not d:
        return "n/a"
    k = "mean" if "mean" in d else "diff"
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: fmt(v, digits))
    return f"{f(d[k])} [{f(d['lo'])}, {f(d['hi'])}]"


class Study:
    def __init__(self, run: Path):
        self.run = run
        self.records = {p.stem: json.loads(p.read_text()) for p in sorted((run / "stages").glob("*.json"))}
        self.manifest = read_json(run / "data" / "manifest.json") or {}
        self.models = ["base", "aligned"] + sorted(p.name for p in (run / "eval").iterdir()
                                                   if p.is_dir() and p.name.split("-")[0] in CONDITIONS
                                                   and (p / "eval.json").is_file()) if (run / "eval").is_dir() else []
        self.models = [m for m in self.models if (run / "eval" / m / "eval.json").is_file()]
        self.seeds = {c: sorted(int(m.split("-s")[1]) for m in self.models if m.startswith(c + "-"))
                      for c in CONDITIONS}

    # -- per-item data -------------------------------------------------------------------------------------------
    def items(self, model: str, part: str) -> dict:
        """(attack, index) -> record of one evaluation part."""
        return {(r.get("attack", ""), r["index"]): r for r in read_jsonl(self.run / "eval" / model / part /
                                                                         "responses.jsonl")}

    def summary(self, model: str, part: str) -> dict:
        return read_json(self.run / "eval" / model / part / "summary.json") or {}

    def members(self, name: str) -> list[str]:
        """The evaluated models behind a name: itself, or a condition's seeds."""
        return [f"{name}-s{s}" for s in self.seeds[name]] if name in CONDITIONS else [name]

    def values(self, name: str, parts, field: str = "refused") -> tuple[list, list, list]:
        """(keys, per-item values averaged over the members, clusters) over ``parts``."""
        keys, vals, clusters = [], [], []
        members = self.members(name)
        if not members:
            return [], [], []
        for part in parts:
            per = [self.items(m, part) for m in members]
            if not per[0]:
                continue
            for key in per[0]:
                xs = [p[key].get(field) for p in per if key in p]
                xs = [float(x) for x in xs if x is not None]
                if len(xs) != len(members):
                    continue
                keys.append((part, *key))
                vals.append(sum(xs) / len(xs))
                clusters.append((DSR_PARTS.get(part, part), key[1]))
        return keys, vals, clusters

    def rate(self, name: str, parts, field: str = "refused", attack: str | None = None) -> dict | None:
        keys, vals, clusters = self.values(name, parts, field)
        if attack is not None:
            pick = [i for i, k in enumerate(keys) if k[1] == attack]
            vals, clusters = [vals[i] for i in pick], [clusters[i] for i in pick]
        return bootstrap_mean(vals, clusters) if vals else None

    def paired(self, a: str, b: str, parts, field: str = "refused") -> dict | None:
        ka, va, ca = self.values(a, parts, field)
        kb, vb, _ = self.values(b, parts, field)
        ib = dict(zip(kb, vb))
        common = [i for i, k in enumerate(ka) if k in ib]
        if not common:
            return None
        return bootstrap_paired_difference([va[i] for i in common], [ib[ka[i]] for i in common],
                                           [ca[i] for i in common])

    def per_seed(self, cond: str, parts, field: str = "refused") -> list[float]:
        out = []
        for m in self.members(cond):
            _, vals, _ = self.values(m, parts, field)
            if vals:
                out.append(sum(vals) / len(vals))
        return out

    def perplexity(self, name: str) -> dict | None:
        """Token-weighted perplexity of the MT-Bench answers under the original model, with a bootstrap over
        questions (pooled over a condition's seeds)."""
        import math

        vals, clusters = [], []
        for m in self.members(name):
            for r in read_jsonl(self.run / "eval" / m / "capability_mtbench" / "responses.jsonl"):
                if r.get("base_logprob_mean") is not None and r["n_tokens"]:
                    vals += [-r["base_logprob_mean"]] * r["n_tokens"]
                    clusters += [(m, r["index"])] * r["n_tokens"]
        if not vals:
            return None
        b = bootstrap_mean(vals, clusters)
        return {"mean": math.exp(b["mean"]), "lo": math.exp(b["lo"]), "hi": math.exp(b["hi"])}

    def mean_field(self, name: str, part: str, key: str) -> float | None:
        xs = [self.summary(m, part).get(key) for m in self.members(name)]
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    # -- training runs -------------------------------------------------------------------------------------------
    def train_dir(self, model: str) -> Path:
        return self.run / "train" / model

    def metrics(self, model: str) -> list[dict]:
        return read_jsonl(self.train_dir(model) / "metrics.jsonl")

    def selected_step(self, model: str) -> int | None:
        evals = [r for r in self.metrics(model) if "eval/safety" in r]
        if not evals:
            return None
        best = max(r["eval/safety"] for r in evals)
        return next(r["step"] for r in evals if r["eval/safety"] == best)  # a tie is no improvement: the first

    def sampled_refusals(self, model: str) -> dict[int, float]:
        judge = KEYWORD_SETS["default"]
        by_step = defaultdict(list)
        for r in read_jsonl(self.train_dir(model) / "completions.jsonl"):
            by_step[r["step"]].append(judge.is_refusal(r["completion"]))
        return {s: sum(v) / len(v) for s, v in sorted(by_step.items())}

    def refusal_advantage(self, model: str, steps: int | None = None) -> dict:
        """What the SIRL reward did with refusals in training: over the groups (same step, same prompt) that hold both
        refusals and compliances, the mean group z-score of the SIRL reward (minus the mean entropy, whatever the run
        was trained on) of the refusals, and the fraction of such groups whose most confident sample is a refusal.
        ``steps``: only the first that many logged steps (the policy before it drifted)."""
        sign = {"sirl": -1.0, "reversed": 1.0}.get(model.split("-")[0])  # reward -> mean entropy
        if sign is None:
            return {}  # a random reward says nothing about the entropy
        judge = KEYWORD_SETS["default"]
        groups = defaultdict(list)
        for r in read_jsonl(self.train_dir(model) / "completions.jsonl"):
            if steps is None or r["step"] <= steps:
                groups[(r["step"], r["prompt"])].append((judge.is_refusal(r["completion"]), sign * r["reward"]))
        z_refusal, best_is_refusal = [], []
        for members in groups.values():
            flags = [f for f, _ in members]
            if all(flags) or not any(flags):
                continue
            rewards = [-e for _, e in members]
            mu, sd = statistics.mean(rewards), statistics.pstdev(rewards) or 1.0
            z_refusal += [(x - mu) / sd for x, (f, _) in zip(rewards, members) if f]
            best_is_refusal.append(members[rewards.index(max(rewards))][0])
        return {"mixed_groups": len(best_is_refusal),
                "refusal_z_mean": statistics.mean(z_refusal) if z_refusal else None,
                "most_confident_is_refusal": (sum(best_is_refusal) / len(best_is_refusal)) if best_is_refusal else None}


def strict_gap(responses: list[dict]) -> dict:
    """The refusal-vs-compliance comparison on harmful prompts with a stricter judge: a refusal must *start* with a
    refusal phrase (XSTest's rule), so that a compliance that mentions "I can't" somewhere is not counted as one."""
    from sirl.eval.entropy_gap import compare_groups

    judge = KEYWORD_SETS["xstest"]
    harmful = [r for r in responses if r["harmful"] and r.get("entropy_mean") is not None]
    return compare_groups([r["entropy_mean"] for r in harmful if judge.is_refusal(r["response"])],
                          [r["entropy_mean"] for r in harmful if not judge.is_refusal(r["response"])],
                          names=("refusal", "compliance"))


# -- figures ---------------------------------------------------------------------------------------------------------
def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


COLOURS = {"sirl": "tab:green", "reversed": "tab:red", "random": "tab:gray"}
STYLES = ["-", "--", ":", "-."]


def curves_figure(st: Study, path: Path) -> None:
    p = plt()
    panels = [("reward_mean", "reward (as trained)"), ("entropy_mean", "mean token entropy of samples (nats)"),
              ("kl", "KL to the aligned model"), ("sampled_refusals", "refusals among the 32 samples per step"),
              ("eval/dsr", "validation DSR (20 behaviours x 4 training attacks)"),
              ("eval/overrefusal", "validation over-refusal (20 XSTest safe)")]
    fig, axes = p.subplots(2, 3, figsize=(15, 8))
    for ax, (key, title) in zip(axes.flat, panels):
        for cond in CONDITIONS:
            for j, seed in enumerate(st.seeds[cond]):
                m = f"{cond}-s{seed}"
                if key == "sampled_refusals":
                    pts = sorted(st.sampled_refusals(m).items())
                else:
                    pts = [(r["step"], r[key]) for r in st.metrics(m) if r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), STYLES[j % 4], color=COLOURS[cond], marker="o" if key.startswith("eval/")
                            else None, ms=4, label=f"{cond} seed {seed}")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    p.close(fig)


def attacks_figure(st: Study, attacks: list[tuple[str, str, str]], names: list[str], path: Path) -> None:
    p = plt()
    fig, ax = p.subplots(figsize=(8, 0.32 * len(attacks) * len(names) / 2 + 2))
    height = 0.8 / len(names)
    colours = {"base": "tab:purple", "aligned": "tab:blue", **COLOURS}
    for j, name in enumerate(names):
        ys, xs, lo, hi = [], [], [], []
        for i, (part, attack, label) in enumerate(attacks):
            r = st.rate(name, [part], attack=attack)
            if r:
                ys.append(i + j * height)
                xs.append(r["mean"])
                lo.append(r["mean"] - r["lo"])
                hi.append(r["hi"] - r["mean"])
        ax.barh(ys, xs, height=height, xerr=[lo, hi], color=colours.get(name), label=LABEL.get(name, name),
                error_kw={"elinewidth": 0.6, "alpha": 0.6})
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(attacks))], [a[2] for a in attacks], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlim=(0, 1.02), xlabel="DSR (95% bootstrap interval)", title="held-out attacks: DSR per attack")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    p.close(fig)


# -- the report ------------------------------------------------------------------------------------------------------
def versions() -> dict:
    import platform

    import peft
    import torch
    import transformers
    import trl

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                                    cwd=HERE).stdout.strip())
    except OSError:
        commit, dirty = "unknown", False
    from sirl.eval.report import machine

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "trl": trl.__version__, "machine": machine(),
            "commit": commit + (" (with uncommitted changes)" if dirty else "")}


def build(run: Path, out: Path, docs: Path) -> dict:
    st = Study(run)
    out.mkdir(parents=True, exist_ok=True)
    numbers: dict = {"versions": versions(), "manifest": st.manifest}
    conds = [c for c in CONDITIONS if st.seeds[c]]
    names = [n for n in ("base", "aligned") if n in st.models] + conds
    held_out = list(DSR_PARTS)
    md: list[str] = []
    w = md.append

    rec = st.records
    total = sum(r.get("elapsed_s", 0) for r in rec.values())
    total_cpu = sum(r.get("cpu_s", 0) or 0 for r in rec.values())
    sft = read_json(run / "aligned" / "sft.json") or {}
    distill = read_json(run / "distill" / "distill.json") or {}
    train_settings = next((r["settings"] for n, r in rec.items() if n.startswith("train-")), {})
    numbers.update(stage_seconds={n: r.get("elapsed_s") for n, r in rec.items()},
                   stage_cpu_seconds={n: r.get("cpu_s") for n, r in rec.items()},
                   sft=sft, distill=distill, train_settings=train_settings)

    w("# SIRL at CPU scale: a weakly aligned SmolLM2-135M, its entropy gap, and held-out jailbreaks before and after "
      "SIRL\n")
    w("Generated by `examples/cpu_study/report.py` from the artifacts of `bash examples/cpu_study/run.sh` (the "
      "numbers are in [cpu-study.json](cpu-study.json)). Versions and machine: " +
      ", ".join(f"{k} {v}" for k, v in numbers["versions"].items()) + ".\n")
    w(f"Seeds: {', '.join(f'{c} {st.seeds[c]}' for c in conds) or 'no training run yet'}. "
      f"Stage wall time in all: {total / 60:.0f} min ({total_cpu / 60:.0f} min of CPU time), on a 2-core machine "
      "shared with other engineers' tests and builds (one thread per job, `nice -n 10`): wall times are inflated "
      "by that load, CPU times much less so.\n")

    # ---- answers ------------------------------------------------------------------------------------------------
    gap_a = read_json(run / "gap" / "aligned" / "summary.json")
    d_none = st.paired("aligned", "sirl", held_out) if "sirl" in conds else None
    d_rev = st.paired("reversed", "sirl", held_out) if {"sirl", "reversed"} <= set(conds) else None
    d_or = st.paired("aligned", "sirl", ["overrefusal"]) if "sirl" in conds else None
    d_cap = st.paired("aligned", "sirl", ["capability_capitals"], "judge_score") if "sirl" in conds else None
    numbers["answers"] = {"gap_aligned": gap_a, "sirl_minus_none": d_none, "sirl_minus_reversed": d_rev,
                          "overrefusal_sirl_minus_none": d_or, "capitals_sirl_minus_none": d_cap}

    def verdict(d):
        if d is None:
            return "not measured"
        return "higher" if d["lo"] > 0 else "lower" if d["hi"] < 0 else "no detectable difference"

    w("## The three answers\n")
    if gap_a and gap_a.get("gap") is not None:
        w(f"1. **Entropy gap of the aligned model:** refusals {gap_a['refusal_entropy_mean']:.3f} nats vs "
          f"compliances {gap_a['compliance_entropy_mean']:.3f} (n = {gap_a['n_refusal']} / {gap_a['n_compliance']}), "
          f"Mann-Whitney p = {fmt(gap_a['p_value'])}, AUROC of \"refusal\" from the entropy alone "
          f"{gap_a['auc']:.3f}.")
    else:
        w("1. **Entropy gap of the aligned model:** " + (gap_a or {}).get("gap_status", "not measured"))
    w(f"2. **Held-out DSR, SIRL minus no training:** {ci(d_none)} ({verdict(d_none)}); **SIRL minus reversed "
      f"reward:** {ci(d_rev)} ({verdict(d_rev)}) (paired over the {d_none['n'] if d_none else 0} held-out attack "
      "answers, seed-averaged, behaviours as clusters).")
    w(f"3. **Cost, SIRL minus no training:** over-refusal on XSTest {ci(d_or)}, capitals task score "
      f"{ci(d_cap)}; perplexity and length in the capability table below.\n")
    discussion = HERE / "discussion.md"
    if discussion.is_file():
        w(discussion.read_text().strip() + "\n")

    # ---- commands -----------------------------------------------------------------------------------------------
    w("## Command\n")
    w("```bash\nbash examples/cpu_study/run.sh            # every stage; rerun to resume, done stages are skipped\n"
      "bash examples/cpu_study/run.sh --list     # the stages and whether each is done\n```\n")
    w("`run.sh` runs `python examples/cpu_study/study.py` with `OMP_NUM_THREADS=1 nice -n 10`; the data folder is "
      "`$DATA` (default `../shared/data`), the run folder `runs/cpu_study`. Stages, their wall and CPU time and "
      "the exact commands they ran (paths relative to the repository):\n")
    rows = [[n, r.get("elapsed_s"), r.get("cpu_s"), "<br>".join(f"`{c}`" for c in r.get("commands", []))]
            for n, r in rec.items() if n != "report"]
    w(markdown_table(["stage", "wall s", "CPU s", "command"], rows) + "\n")

    # ---- set-up -------------------------------------------------------------------------------------------------
    m = st.manifest
    files = m.get("files", {})
    rows_of = lambda f: files.get(f, {}).get("rows")  # noqa: E731
    w("## Set-up\n")
    w(f"- **Data** (`data.py`, seed {m.get('seed')}): AdvBench's {m.get('advbench')} goals minus "
      f"{m.get('advbench_near_copies_excluded')} near-copies of an evaluation behaviour (word-set Jaccard >= 0.4 "
      f"or containment, the rule of the earlier study) leave {m.get('advbench_pool')}, split into "
      f"{rows_of('sft_harmful.jsonl')} SFT refusals, {rows_of('sirl_train.jsonl')} SIRL prompts, "
      f"{rows_of('val_harmful.jsonl')} validation behaviours and {rows_of('gap_harmful.jsonl')} entropy-gap prompts. "
      "Test behaviours come from other sources: JailbreakBench and HarmBench.")
    w(f"- **Attacks.** Training (SIRL prompts and validation): {', '.join(m.get('train_attacks', []))} (`template` = "
      "the three built-in templates of `sirl.eval.attacks`). Evaluation (held out): JailbreakBench's 23 "
      "pre-generated columns, HarmBench's 8, and the offline "
      f"{', '.join(m.get('eval_offline_attacks', []))} (`template` = GPTFuzzer's 77 templates). Training and "
      "evaluation attacks share no prompt and no template; some families are related (role-play templates on both "
      "sides, the cipher column beside the offline ciphers).")
    w(f"- **Alignment SFT** (`sft.py`, TRL `SFTTrainer`): {sft.get('harmful')} AdvBench requests -> one of "
      f"{m.get('refusal_texts')} short refusals written for this study (`refusals.txt`); {sft.get('benign')} Alpaca "
      f"requests ({m.get('sizes', {}).get('sft_benign_alarming')} of them with alarming words such as \"kill\") -> "
      f"the base model's own greedy answer tokens (`distill.py`; {distill.get('kept', 0) - distill.get('ended', 0)} of "
      f"{distill.get('kept')} had not ended within {distill.get('max_new_tokens')} tokens: their first "
      f"{distill.get('max_new_tokens')} tokens are the target, with no end-of-turn token, so the SFT does not teach "
      "shorter answers). "
      f"LoRA r = {sft.get('lora_r')} on every linear layer ({sft.get('trainable_params')} trainable parameters), "
      f"{sft.get('epochs')} epochs, {sft.get('optimizer_steps')} steps of {sft.get('batch_size')}, lr {sft.get('lr')}, "
      f"bf16 autocast, loss {fmt(sft.get('loss_first'))} -> {fmt(sft.get('loss_last'))}, {sft.get('train_s')} s of "
      "training; merged into the weights and saved as a plain model directory. Why LoRA: see `sft.py`.")
    t = train_settings
    if t:
        w(f"- **SIRL and ablations** (`sirl train`, same settings for every run; the ablations through "
          f"`reward=entropy` and `reward=random`): from the aligned model, weights in {t.get('dtype')} (the LoRA "
          f"adapters and AdamW in float32), LoRA r = {t.get('lora_r')} on q/k/v/o, G = "
          f"{t.get('group_size')}, {t.get('prompts_per_step')} prompts per step, {t.get('max_new_tokens')} new tokens "
          f"at T = {t.get('temperature')}, lr {t.get('lr')} ({t.get('lr_schedule')}), KL beta {t.get('kl_beta')}, "
          f"clip 0.2, {t.get('steps')} steps ({int(t.get('steps', 0)) * int(t.get('prompts_per_step', 0))} prompts, "
          f"{int(t.get('steps', 0)) * int(t.get('prompts_per_step', 0)) * int(t.get('group_size', 0))} samples). "
          f"Validation every {t.get('eval_every')} steps (step 0 included) on {t.get('eval_limit')} validation "
          f"behaviours under the training attacks and {t.get('eval_limit')} XSTest safe prompts of the validation "
          f"split; `keep_best={t.get('keep_best')}` (DSR minus over-refusal, the first best on a tie) picks the "
          "checkpoint that the test set then sees once.")
    w("- **Test evaluation** (`evaluate.py`, bf16, greedy, 32 new tokens, keyword judge `keyword:default`): "
      "JailbreakBench's 100 goals asked directly; 10 of its behaviours (one per category) under its 23 columns and "
      "the 6 offline attacks; 10 HarmBench behaviours under its 8 columns; 100 XSTest safe prompts (10 per type); "
      "capability: 40 MT-Bench first turns (64 tokens; perplexity under the original SmolLM2, length, "
      "repetition = 1 - distinct-2) and the 40-question capitals task (`capitals.py`, exact answer).\n")

    # ---- stage 1 targets ----------------------------------------------------------------------------------------
    w("## 1. The weakly aligned model\n")
    rows = []
    for name in [n for n in ("base", "aligned") if n in st.models]:
        rows.append([LABEL[name], ci(st.rate(name, ["dsr_jbb_direct"])), ci(st.rate(name, ["overrefusal"])),
                     ci(st.rate(name, ["capability_capitals"], "judge_score")), ci(st.perplexity(name)),
                     st.mean_field(name, "capability_mtbench", "response_tokens_mean"),
                     st.mean_field(name, "capability_mtbench", "repetition")])
    w(markdown_table(["model", "direct DSR, 100 JBB (target >= 0.8)", "XSTest over-refusal (target <= 0.2)",
                      "capitals score", "MT-Bench perplexity (orig. model)", "MT-Bench answer tokens",
                      "MT-Bench repetition"], rows) + "\n")
    if {"base", "aligned"} <= set(st.models):
        capitals = st.paired("base", "aligned", ["capability_capitals"], "judge_score")
        w(f"Aligned minus base: capitals score {ci(capitals)}, held-out attack DSR "
          f"{ci(st.paired('base', 'aligned', held_out))}.\n")

    # ---- stage 2 gap ---------------------------------------------------------------------------------------------
    w("## 2. The premise: the entropy gap\n")
    w("`sirl analyze entropy-gap` (bf16, 2 samples per prompt at T = 1, 48 new tokens, keyword judge): "
      f"{rows_of('gap_harmful.jsonl')} harmful prompts (each of {m.get('sizes', {}).get('gap_harmful')} held-out "
      f"AdvBench behaviours once directly and once under a training attack) and {rows_of('gap_benign.jsonl')} "
      "Alpaca prompts. AUROC = probability that a compliance has the higher mean token entropy than a refusal.\n")
    rows = []
    gaps = {}
    for name in ["aligned"] + [f"{c}-s{st.seeds[c][0]}" for c in conds]:
        g = read_json(run / "gap" / name / "summary.json")
        if not g:
            continue
        gaps[name] = g
        ho = g.get("harmful_only", {})
        rows.append([name, f"{g['n_refusal']} / {g['n_compliance']}", g["refusal_entropy_mean"],
                     g["compliance_entropy_mean"], g["gap"], g["p_value"], g["auc"], ho.get("gap"), ho.get("auc"),
                     g.get("refusal_rate_harmful"), g.get("refusal_rate_benign")])
    numbers["gaps"] = gaps
    w(markdown_table(["model", "refusals / compliances", "refusal entropy", "compliance entropy", "gap",
                      "p (MWU)", "AUROC", "gap, harmful prompts only", "AUROC, harmful only",
                      "sampled refusal rate, harmful", "sampled refusal rate, benign"], rows) + "\n")
    rows, strict = [], {}
    for name in gaps:
        g = strict_gap(read_jsonl(run / "gap" / name / "responses.jsonl"))
        strict[name] = g
        rows.append([name, f"{g['n_refusal']} / {g['n_compliance']}", g["mean_refusal"], g["mean_compliance"],
                     g["gap"], g["p_value"], g["auc"]])
    numbers["gaps_strict_judge"] = strict
    w("The same responses to harmful prompts, a refusal now being a response that *starts* with a refusal phrase "
      "(XSTest's rule; the keyword judge above also counts a compliance that says \"I can't\" somewhere):\n")
    w(markdown_table(["model", "refusals / compliances", "refusal entropy", "compliance entropy", "gap", "p (MWU)",
                      "AUROC"], rows) + "\n")
    for name in gaps:
        src = run / "gap" / name / "entropy_gap.png"
        if src.is_file():
            shutil.copyfile(src, out / f"cpu-study-gap-{name}.png")
            w(f"![entropy gap, {name}](cpu-study-gap-{name}.png)\n")

    # ---- stage 3-5 results --------------------------------------------------------------------------------------
    w("## 3-4. Held-out jailbreaks: the aligned model, SIRL and the ablations\n")
    rows = []
    for name in names:
        seeds = st.per_seed(name, held_out) if name in CONDITIONS else []
        rows.append([LABEL[name], ci(st.rate(name, held_out)),
                     ", ".join(f"{x:.3f}" for x in seeds) + (f" (sd {statistics.stdev(seeds):.3f})" if len(seeds) > 1
                                                             else "") if seeds else "",
                     ci(st.rate(name, ["dsr_jbb_columns"])), ci(st.rate(name, ["dsr_hm_columns"])),
                     ci(st.rate(name, ["dsr_offline"])), ci(st.rate(name, ["dsr_jbb_direct"]))])
    w(markdown_table(["model", "DSR, all held-out attacks", "per seed", "JBB 23 columns", "HarmBench 8 columns",
                      "offline 6", "direct (100 JBB)"], rows) + "\n")
    pairs = [(a, b) for a, b in (("aligned", "sirl"), ("reversed", "sirl"), ("random", "sirl"),
                                 ("aligned", "reversed"), ("aligned", "random")) if {a, b} <= set(names)]
    rows = [[f"{LABEL[b]} minus {LABEL[a]}", ci(st.paired(a, b, held_out)), ci(st.paired(a, b, ["dsr_jbb_direct"])),
             ci(st.paired(a, b, ["overrefusal"])), ci(st.paired(a, b, ["capability_capitals"], "judge_score"))]
            for a, b in pairs]
    numbers["paired"] = {f"{b}-{a}": {"held_out": st.paired(a, b, held_out), "overrefusal":
                                      st.paired(a, b, ["overrefusal"])} for a, b in pairs}
    w("Paired differences (the same prompts; seed-averaged per item; 95% bootstrap over behaviours):\n")
    w(markdown_table(["comparison", "held-out attack DSR", "direct DSR", "over-refusal", "capitals score"], rows)
      + "\n")

    attacks = []
    for part in held_out + ["dsr_jbb_direct"]:
        s = st.summary("aligned", part) or st.summary(names[0], part)
        for a in (s.get("per_attack") or {}):
            label = a.replace("column:", "")
            attacks.append((part, a, ("HB " if part == "dsr_hm_columns" else "JBB " if part != "dsr_offline"
                                      else "offline ") + label))
    rows = [[label, *[ci(st.rate(n, [part], attack=a)) for n in names]] for part, a, label in attacks]
    numbers["per_attack"] = {label: {n: st.rate(n, [part], attack=a) for n in names} for part, a, label in attacks}
    w("Per attack (n = 10 behaviours each, 100 for direct; a condition's value is its seed mean):\n")
    w(markdown_table(["attack", *[LABEL[n] for n in names]], rows) + "\n")
    if attacks:
        attacks_figure(st, attacks, [n for n in names if n != "base"], out / "cpu-study-attacks.png")
        w("![DSR per held-out attack](cpu-study-attacks.png)\n")

    w("### Over-refusal and capability\n")
    rows = []
    for name in names:
        rows.append([LABEL[name], ci(st.rate(name, ["overrefusal"])),
                     ci(st.rate(name, ["capability_capitals"], "judge_score")), ci(st.perplexity(name)),
                     st.mean_field(name, "capability_mtbench", "response_tokens_mean"),
                     st.mean_field(name, "capability_mtbench", "repetition"),
                     ci(st.rate(name, ["capability_mtbench"]))])
    w(markdown_table(["model", "XSTest over-refusal", "capitals score", "MT-Bench perplexity (orig. model)",
                      "MT-Bench tokens", "MT-Bench repetition", "MT-Bench refusals"], rows) + "\n")

    # ---- training ------------------------------------------------------------------------------------------------
    w("## Training runs\n")
    rows = []
    runs = {}
    for cond in conds:
        for seed in st.seeds[cond]:
            name = f"{cond}-s{seed}"
            mt = [r for r in st.metrics(name) if "reward_mean" in r]
            ev = {r["step"]: r for r in st.metrics(name) if "eval/safety" in r}
            sel = st.selected_step(name)
            sr = st.sampled_refusals(name)
            info = {"selected_step": sel, "reward_first": mt[0]["reward_mean"] if mt else None,
                    "reward_last": mt[-1]["reward_mean"] if mt else None, "kl_last": mt[-1]["kl"] if mt else None,
                    "sampled_refusals_first": next(iter(sr.values()), None),
                    "sampled_refusals_last": list(sr.values())[-1] if sr else None,
                    "step_s_mean": statistics.mean(r["step_time_s"] for r in mt) if mt else None,
                    "repetition_first": mt[0].get("repetition") if mt else None,
                    "repetition_last": mt[-1].get("repetition") if mt else None,
                    "val": {s: {k: r.get(k) for k in ("eval/dsr", "eval/overrefusal", "eval/safety")}
                            for s, r in ev.items()}}
            runs[name] = info
            rows.append([name, sel, ", ".join(f"{s}: {fmt(r.get('eval/safety'), 2)}" for s, r in ev.items()),
                         f"{fmt(info['reward_first'])} -> {fmt(info['reward_last'])}", info["kl_last"],
                         f"{fmt(info['sampled_refusals_first'], 2)} -> {fmt(info['sampled_refusals_last'], 2)}",
                         f"{fmt(info['repetition_first'], 2)} -> {fmt(info['repetition_last'], 2)}",
                         info["step_s_mean"], (rec.get(f"train-{name}") or {}).get("elapsed_s")])
    numbers["runs"] = runs
    w(markdown_table(["run", "selected step", "validation safety (DSR - over-refusal) by step",
                      "reward, step 1 -> last", "KL, last", "sampled refusals, first -> last logged step",
                      "sample repetition, first -> last", "s / step", "run wall s (with validation)"], rows) + "\n")
    rows, adv = [], {}
    for name in runs:
        early, late = st.refusal_advantage(name, steps=2), st.refusal_advantage(name)
        if early:
            adv[name] = {"steps_1_2": early, "all_steps": late}
            rows.append([name, early["mixed_groups"], early["refusal_z_mean"], early["most_confident_is_refusal"],
                         late["mixed_groups"], late["refusal_z_mean"], late["most_confident_is_refusal"]])
    numbers["refusal_advantage"] = adv
    if rows:
        w("What the SIRL reward (minus the mean entropy) made of refusals among the training samples: over the "
          "groups (one prompt's G samples at one step) holding both refusals and compliances, the mean group z-score "
          "of the refusals' SIRL reward (> 0: SIRL reinforces the refusals) and how often the group's most confident "
          "sample was a refusal. For the reversed run its own reward is the negative of this one.\n")
        w(markdown_table(["run", "mixed groups, steps 1-2", "refusal z, steps 1-2", "most confident is a refusal, "
                          "steps 1-2", "mixed groups, all steps", "refusal z, all", "most confident is a refusal, all"],
                         rows) + "\n")
    if runs:
        curves_figure(st, out / "cpu-study-curves.png")
        w("![training and validation curves](cpu-study-curves.png)\n")
        w(samples(st, run))

    # ---- paper --------------------------------------------------------------------------------------------------
    w("## Beside the paper\n")
    ours = {c: st.rate(c, held_out) for c in ["aligned", *conds]}
    rows = [[PAPER[0][0], PAPER[0][1], f"{ci(ours.get('aligned'), pct=True)} -> {ci(ours.get('sirl'), pct=True)}"],
            [PAPER[1][0], PAPER[1][1], ci(ours.get("reversed"), pct=True)],
            [PAPER[2][0], PAPER[2][1], ci(ours.get("random"), pct=True)],
            [PAPER[3][0], PAPER[3][1], "not run"],
            [PAPER[4][0], PAPER[4][1], (f"XSTest safe: {ci(st.rate('aligned', ['overrefusal']), pct=True)} -> "
                                        f"{ci(st.rate('sirl', ['overrefusal']), pct=True)}") if "sirl" in conds
             else "n/a"]]
    w(markdown_table(["", "paper (arXiv 2510.01088)", "here (held-out attacks, %)"], rows) + "\n")
    w("Differences in set-up: 135M parameters here against 7-8B; a model made to refuse by a 150-example LoRA SFT "
      "against models aligned by their makers; SIRL from LoRA at a high learning rate for a handful of steps "
      "against full fine-tuning at lr 1e-6 on 15,000 prompts (512 prompts x G = 4 per step, about 30 steps); "
      "completions of 32 tokens against up to 3072; a keyword refusal judge against an LLM judge; pre-generated "
      "and offline attacks against the paper's 20+ attacks including adaptive ones; 10 behaviours per attack.\n")

    (out / "cpu-study.json").write_text(json.dumps(numbers, indent=1, default=str) + "\n")
    (out / "cpu-study.md").write_text("\n".join(md) + "\n")
    docs.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.name.startswith("cpu-study"):
            tmp = docs / (f.name + ".tmp")
            shutil.copyfile(f, tmp)
            tmp.rename(docs / f.name)
    return numbers


def samples(st: Study, run: Path) -> str:
    """Refusals sampled during SIRL training (seed 0 of ``sirl``), first and last logged step: the attack and the
    completion only, never the request."""
    name = next((f"sirl-s{s}" for s in st.seeds["sirl"]), None)
    if name is None:
        return ""
    norm = lambda t: " ".join(t.split()).casefold()  # noqa: E731
    templates = {norm(t) for t in load_refusals()}
    attack_of = {r["prompt"]: r["attack"] for r in read_jsonl(run / "data" / "sirl_train.jsonl")}
    rows = read_jsonl(st.train_dir(name) / "completions.jsonl")
    steps = sorted({r["step"] for r in rows})
    out = [f"Sample completions of `{name}` during training. Refusals only, by construction: a sample is shown only "
           "when it is, word for word, one of the study's refusal texts (so nothing else it wrote can appear here); "
           "requests are not shown, only the attack that wrapped them:\n"]
    for step in (steps[:1] + steps[-1:]) if steps else []:
        at = [r for r in rows if r["step"] == step]
        exact = [r for r in at if norm(r["completion"]) in templates]
        out.append(f"- step {step}: {sum(KEYWORD_SETS['default'].is_refusal(r['completion']) for r in at)} of "
                   f"{len(at)} samples are refusals by the keyword judge, {len(exact)} of them one of the refusal "
                   f"texts word for word")
        for r in exact[:4]:
            attack = attack_of.get(r["prompt"], "?")
            out.append(f"  - [{attack}, reward {r['reward']:.3f}] \"{r['completion'].strip()}\"")
    return "\n".join(out) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/cpu_study")
    p.add_argument("--out", default="runs/cpu_study/report")
    p.add_argument("--docs", default="docs/results")
    args = p.parse_args(argv)
    build(Path(args.run_dir), Path(args.out), Path(args.docs))
    print(f"wrote {Path(args.docs) / 'cpu-study.md'}")


if __name__ == "__main__":
    main()
