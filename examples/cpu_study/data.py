"""Stage 0 of the CPU study: every prompt set of the study, from the shared public data, with disjoint splits.

    python examples/cpu_study/data.py --data ../shared/data --out runs/cpu_study/data

Splits (all seeded; counts and what was dropped go to OUT/manifest.json):

- Behaviours for training come from AdvBench only, minus every AdvBench goal that is a near-copy of an evaluation
  behaviour (JailbreakBench took 18 of its 100 goals from AdvBench): word-set Jaccard >= 0.4 with, or containment
  of, any JailbreakBench goal/behaviour name or HarmBench (``hm_expanded``) goal. The rest is split into
  SFT refusals, SIRL prompts, validation and entropy-gap prompts, disjoint from each other.
- Test: JailbreakBench (all 100 goals, direct; 10 of them, one per category, under its 23 attack columns and the
  held-out offline attacks), HarmBench (10 of ``hm_expanded``'s 200 under its 8 attack columns), XSTest's safe
  prompts (100 test / 20 validation, stratified by type), MT-Bench first turns and the capitals task.
- Benign SFT prompts, 2.4 times as many as the refusals: the benign requests that sound violent or illicit written for
  this study (``benign_contrast.txt``, minus any near-copy of an XSTest prompt: Jaccard >= 0.4 of their content
  words, crudely stemmed), Alpaca instructions with alarming words such as "kill" or "attack",
  and random Alpaca instructions. Their targets are the base model's own greedy answers (``distill`` stage). Two
  first recipes without the written requests (150 refusals with 150 Alpaca answers, 40 of them alarming; then 100
  with 200, 120 alarming) both refused about half of XSTest's safe prompts: the SFT had learned "how do I <violent
  verb> ... -> refuse", which Alpaca's alarming instructions ("What were the causes of World War I?") do not contrast;
  75 written requests brought it to 0.31, the 114 of this version further (docs/results/cpu-study.md).

Attacks: the *training* attacks wrap SIRL prompts and validation prompts (``TRAIN_ATTACKS``: ``direct``,
``refusal_suppression``, ``prefix_injection`` and ``template`` with sirl.eval.attacks' three built-in templates);
the *evaluation* attacks are disjoint from them: the 23 JailbreakBench and 8 HarmBench pre-generated columns and the
offline ``EVAL_OFFLINE_ATTACKS`` (GPTFuzzer's 77 templates instead of the built-in ones). Attack prompts are model
inputs only: no attacked prompt or harmful text is ever a training target.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "docs" / "results"))
from sirl_smollm2_data import closest  # noqa: E402  (the near-copy rule of the earlier study, reused)

from sirl.eval.attacks import resolve_attacks  # noqa: E402
from sirl.eval.datasets import read_rows  # noqa: E402
from sirl.eval.judge import KEYWORD_SETS  # noqa: E402

TRAIN_ATTACKS = ("direct", "refusal_suppression", "prefix_injection", "template")
EVAL_OFFLINE_ATTACKS = ("past_tense", "base64", "rot13", "caesar", "atbash", "template")  # template: GPTFuzzer's
ALARMING = re.compile(r"\b(kill\w*|attack\w*|bomb\w*|weapon\w*|gun\w*|shoot\w*|steal\w*|drugs?|poison\w*|hack\w*|"
                      r"destroy\w*|murder\w*|war|wars|crime\w*|fight\w*|explos\w*|violen\w*|knife|die|death|dead|"
                      r"terror\w*|fire|burn\w*|blood\w*|virus\w*|threat\w*|danger\w*|illegal|fraud\w*|scam\w*)\b", re.I)
SIZES = dict(sft_harmful=100, sft_benign=240, sft_benign_alarming=70, sirl_train=160, val=20, gap_harmful=30,
             gap_benign=30, jbb_columns=10, hm_columns=10, xstest_val_per_type=2, xstest_test_per_type=10,
             mtbench=40)


STOP = frozenset("a an the i you we my your to of in on at for with and or is are do does can could how what "
                 "which why when where should would it me this that be from into so if".split())


def stem(word: str) -> str:
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            return word[: -len(suffix)]
    return word


def content_jaccard(a: str, b: str) -> float:
    wa, wb = ({stem(w) for w in re.findall(r"[a-z0-9]+", t.lower())} - STOP for t in (a, b))
    return len(wa & wb) / len(wa | wb) if wa | wb else 0.0


def read_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def load_refusals(path: Path = HERE / "refusals.txt") -> list[str]:
    lines = read_lines(path)
    judge = KEYWORD_SETS["default"]
    missed = [ln for ln in lines if not judge.is_refusal(ln)]
    if missed:
        raise ValueError(f"{path}: the keyword judge does not call these refusals: {missed}")
    return lines


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def stratified(rows: list[dict], key: str, per_group: int, rng: random.Random, exclude=()) -> list[dict]:
    groups = defaultdict(list)
    for r in rows:
        if id(r) not in exclude:
            groups[r[key]].append(r)
    out = []
    for name in sorted(groups):
        out += rng.sample(groups[name], min(per_group, len(groups[name])))
    return out


def spread(rows: list[dict], key: str, n: int, rng: random.Random) -> list[dict]:
    """``n`` rows spread as evenly as possible over the values of ``key`` (round-robin over shuffled groups)."""
    groups = defaultdict(list)
    for r in rows:
        groups[r[key]].append(r)
    for g in groups.values():
        rng.shuffle(g)
    names, out = sorted(groups), []
    while len(out) < n:
        for name in names:
            if groups[name] and len(out) < n:
                out.append(groups[name].pop())
    return out


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def build(data: Path, out: Path, seed: int = 0) -> dict:
    rng = random.Random(seed)
    advbench = read_rows(data / "advbench" / "harmful_behaviors.csv")
    jbb = read_rows(data / "jbb" / "harmful-behaviors.csv")
    jbb_x = read_rows(data / "pandaguard" / "jbb_expanded.csv")
    hm_x = read_rows(data / "pandaguard" / "hm_expanded.csv")
    xstest = read_rows(data / "xstest" / "xstest_prompts.csv")
    alpaca = read_rows(data / "alpaca" / "alpaca_no_input_instructions.json")
    mtbench = read_rows(data / "mtbench" / "question.jsonl")
    refusals = load_refusals()

    # Training behaviours: AdvBench minus near-copies of any evaluation behaviour.
    references = ([r["Goal"] for r in jbb] + [r["Behavior"] for r in jbb if len(r["Behavior"].split()) >= 3]
                  + [r["Goal"] for r in hm_x])
    pool, excluded = [], []
    for i, r in enumerate(advbench):
        score, match = closest(r["goal"], references)
        (excluded if score >= 0.4 else pool).append(
            {"goal": r["goal"], "row": i, **({"similarity": round(score, 3), "evaluation_behaviour": match}
                                             if score >= 0.4 else {})})
    rng.shuffle(pool)
    s = SIZES
    cuts = [s["sft_harmful"], s["sirl_train"], s["val"], s["gap_harmful"]]
    if sum(cuts) > len(pool):
        raise ValueError(f"only {len(pool)} AdvBench behaviours left, need {sum(cuts)}")
    sft_h, sirl_b, val_b, gap_b = (pool[sum(cuts[:k]):sum(cuts[:k + 1])] for k in range(4))

    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "sft_harmful.jsonl", [{"prompt": b["goal"], "completion": rng.choice(refusals),
                                             "advbench_row": b["row"]} for b in sft_h])
    attacks = resolve_attacks(list(TRAIN_ATTACKS))
    order = [attacks[i % len(attacks)] for i in range(len(sirl_b))]
    rng.shuffle(order)
    write_jsonl(out / "sirl_train.jsonl", [{"prompt": a(b["goal"], i), "attack": a.name, "goal": b["goal"],
                                            "advbench_row": b["row"]} for i, (a, b) in enumerate(zip(order, sirl_b))])
    write_jsonl(out / "val_harmful.jsonl", [{"prompt": b["goal"], "advbench_row": b["row"]} for b in val_b])
    gap = []
    for i, b in enumerate(gap_b):  # each behaviour once plain and once under a training attack
        gap.append({"prompt": b["goal"], "attack": "direct"})
        a = attacks[1 + i % (len(attacks) - 1)]
        gap.append({"prompt": a(b["goal"], i), "attack": a.name})
    write_jsonl(out / "gap_harmful.jsonl", gap)
    write_jsonl(out / "excluded_near_copies.jsonl", excluded)

    # Benign prompts: the written contrast requests (minus near-copies of XSTest), Alpaca with alarming words, random
    # Alpaca; disjoint SFT and entropy-gap sets.
    contrast, contrast_dropped = [], []
    for text in read_lines(HERE / "benign_contrast.txt"):
        score, match = max((content_jaccard(text, x["prompt"]), x["prompt"]) for x in xstest)
        (contrast_dropped if score >= 0.4 else contrast).append(
            {"prompt": text, **({"similarity": round(score, 3), "xstest": match} if score >= 0.4 else {})})
    write_jsonl(out / "excluded_contrast_near_xstest.jsonl", contrast_dropped)
    instructions = list(dict.fromkeys(r["instruction"].strip() for r in alpaca if r["instruction"].strip()))
    rng.shuffle(instructions)
    alarming = [t for t in instructions if ALARMING.search(t)][: s["sft_benign_alarming"]]
    taken = set(alarming)
    n_random = s["sft_benign"] - len(contrast) - len(alarming)
    plain = [t for t in instructions if t not in taken][: n_random + s["gap_benign"]]
    write_jsonl(out / "sft_benign_prompts.jsonl",
                [{"prompt": r["prompt"], "kind": "written contrast"} for r in contrast]
                + [{"prompt": t, "kind": "alarming words"} for t in alarming]
                + [{"prompt": t, "kind": "random"} for t in plain[s["gap_benign"]:]])
    write_jsonl(out / "gap_benign.jsonl", [{"prompt": t} for t in plain[: s["gap_benign"]]])

    # Test sets.
    jbb_cols = spread(jbb_x, "Category", s["jbb_columns"], rng)
    write_csv(out / "jbb_test_columns.csv", jbb_cols)
    write_jsonl(out / "jbb_test_offline.jsonl", [{"prompt": r["Goal"], "category": r["Category"]} for r in jbb_cols])
    write_csv(out / "hm_test_columns.csv", spread(hm_x, "SemanticCategory", s["hm_columns"], rng))
    safe = [r for r in xstest if r["label"] == "safe"]
    val_x = stratified(safe, "type", s["xstest_val_per_type"], rng)
    test_x = stratified(safe, "type", s["xstest_test_per_type"], rng, exclude={id(r) for r in val_x})
    write_csv(out / "xstest_val.csv", val_x)
    write_csv(out / "xstest_test.csv", test_x)
    write_jsonl(out / "mtbench_probe.jsonl", [{"prompt": r["turns"][0], "category": r["category"]}
                                              for r in spread(mtbench, "category", s["mtbench"], rng)])
    from capitals import write_questions

    write_questions(out / "capitals.jsonl")

    manifest = {
        "seed": seed, "sizes": SIZES, "train_attacks": TRAIN_ATTACKS, "eval_offline_attacks": EVAL_OFFLINE_ATTACKS,
        "advbench": len(advbench), "advbench_near_copies_excluded": len(excluded), "advbench_pool": len(pool),
        "refusal_texts": len(refusals), "contrast_written": len(contrast) + len(contrast_dropped),
        "contrast_kept": len(contrast), "contrast_near_xstest_dropped": len(contrast_dropped),
        "alpaca_alarming_available": sum(bool(ALARMING.search(t)) for t in instructions),
        "files": {p.name: {"rows": sum(1 for _ in read_rows(p)), "sha256_16": file_sha(p)}
                  for p in sorted(out.iterdir()) if p.suffix in (".jsonl", ".csv")},
        "sources": {k: file_sha(data / k) for k in (
            "advbench/harmful_behaviors.csv", "jbb/harmful-behaviors.csv", "pandaguard/jbb_expanded.csv",
            "pandaguard/hm_expanded.csv", "xstest/xstest_prompts.csv", "alpaca/alpaca_no_input_instructions.json",
            "mtbench/question.jsonl", "gptfuzz/GPTFuzzer.csv")},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--out", default="runs/cpu_study/data")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    m = build(Path(args.data), Path(args.out), args.seed)
    print(json.dumps({k: v for k, v in m.items() if k != "sources"}, indent=1))


if __name__ == "__main__":
    main()
