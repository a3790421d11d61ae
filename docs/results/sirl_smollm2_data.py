"""Training prompts for the SmolLM2 SIRL study (docs/results/sirl-smollm2.md), disjoint from its evaluation sets.

    python docs/results/sirl_smollm2_data.py --data ../shared/data --out runs/study-data

Training: HarmBench's 200 "standard" text behaviours (no context string, no copyright requests), minus every
behaviour that is a near-copy of a JailbreakBench goal (JailbreakBench took 27 of its 100 behaviours from
HarmBench/TDC, often reworded): a training behaviour is dropped when its word-set Jaccard similarity to any
JailbreakBench goal or behaviour name is >= 0.4, or one's normalised text contains the other's. Evaluation (not
written here, read from the data folder by the training command): JailbreakBench's 100 behaviours (DSR, with offline
attacks) and XSTest's 250 safe prompts (over-refusal). Writes OUT/train.jsonl and OUT/excluded.jsonl (what was
dropped and why) and prints the counts.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


def norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a | b else 0.0


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def closest(text: str, references: list[str]) -> tuple[float, str]:
    """The most similar reference (1.0 when one contains the other)."""
    best = (0.0, "")
    for ref in references:
        score = 1.0 if norm(ref) in norm(text) or norm(text) in norm(ref) else jaccard(words(text), words(ref))
        best = max(best, (score, ref))
    return best


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data", help="the shared data folder")
    p.add_argument("--out", default="runs/study-data")
    p.add_argument("--threshold", type=float, default=0.4)
    args = p.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    harmbench = [r for r in read_csv(data / "harmbench" / "harmbench_behaviors_text_all.csv")
                 if r["FunctionalCategory"] == "standard"]
    jbb = read_csv(data / "jbb" / "harmful-behaviors.csv")
    references = [r["Goal"] for r in jbb] + [r["Behavior"] for r in jbb if len(words(r["Behavior"])) >= 3]
    kept, dropped = [], []
    for row in harmbench:
        score, match = closest(row["Behavior"], references)
        record = {"prompt": row["Behavior"], "category": row["SemanticCategory"], "id": row["BehaviorID"]}
        if score >= args.threshold:
            dropped.append({**record, "similarity": round(score, 3), "jbb": match})
        else:
            kept.append(record)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", kept), ("excluded.jsonl", dropped)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"HarmBench standard behaviours: {len(harmbench)}; kept for training: {len(kept)} -> {out / 'train.jsonl'}; "
          f"dropped as near-copies of JailbreakBench: {len(dropped)} -> {out / 'excluded.jsonl'}")


if __name__ == "__main__":
    main()
