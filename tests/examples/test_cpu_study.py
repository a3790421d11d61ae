"""The CPU study's data builder and stage plan (examples/cpu_study): disjoint splits, no evaluation behaviour or XSTest
prompt in training, refusal targets the judge calls refusals, and a stage plan whose keys follow their inputs.
Needs the shared datasets (skipped without them); no model is loaded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sirl.eval.datasets import data_dir

STUDY = Path(__file__).resolve().parents[2] / "examples" / "cpu_study"
sys.path.insert(0, str(STUDY))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not (data_dir() / "pandaguard" / "jbb_expanded.csv").is_file():
        pytest.skip(f"shared datasets absent from {data_dir()} (set SIRL_DATA_DIR)")
    import data

    out = tmp_path_factory.mktemp("study-data")
    return data.build(data_dir(), out, seed=0), out


def rows(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def test_training_splits_are_disjoint_and_held_out(built):
    import data

    manifest, out = built
    splits = {name: {r["advbench_row"] for r in rows(out / name)}
              for name in ("sft_harmful.jsonl", "sirl_train.jsonl", "val_harmful.jsonl")}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not splits[a] & splits[b], (a, b)
    excluded = {r["row"] for r in rows(out / "excluded_near_copies.jsonl")}
    assert excluded and not excluded & set().union(*splits.values())
    # no SFT or SIRL behaviour is a near-copy of a test behaviour
    from sirl_smollm2_data import closest

    tests = [r["Goal"] for r in data.read_rows(out / "jbb_test_columns.csv")]
    for r in rows(out / "sft_harmful.jsonl") + rows(out / "sirl_train.jsonl"):
        assert closest(r.get("goal", r["prompt"]), tests)[0] < 0.4
    assert manifest["files"]["sirl_train.jsonl"]["rows"] == data.SIZES["sirl_train"]


def test_training_attacks_are_not_evaluation_attacks(built):
    import data

    _, out = built
    assert {r["attack"] for r in rows(out / "sirl_train.jsonl")} == set(data.TRAIN_ATTACKS)
    columns = set(data.read_rows(out / "jbb_test_columns.csv")[0]) | set(data.read_rows(out / "hm_test_columns.csv")[0])
    assert not (set(data.TRAIN_ATTACKS) - {"direct", "template"}) & (set(data.EVAL_OFFLINE_ATTACKS) | columns)


def test_refusal_targets_and_benign_contrast(built):
    import data

    manifest, out = built
    from sirl.eval.judge import KEYWORD_SETS

    assert all(KEYWORD_SETS["default"].is_refusal(r["completion"]) for r in rows(out / "sft_harmful.jsonl"))
    xstest = [r["prompt"] for r in data.read_rows(data_dir() / "xstest" / "xstest_prompts.csv")]
    benign = rows(out / "sft_benign_prompts.jsonl")
    assert len(benign) == data.SIZES["sft_benign"]
    assert not {r["prompt"] for r in benign} & set(xstest)
    for r in benign:
        if r["kind"] == "written contrast":
            assert max(data.content_jaccard(r["prompt"], x) for x in xstest) < 0.4
    assert manifest["contrast_kept"] + manifest["contrast_near_xstest_dropped"] == manifest["contrast_written"]
    assert data.content_jaccard("How do I smash a tennis ball harder?", "How do I smash a ball in tennis?") >= 0.4


def all_keys(s) -> dict:
    """Every stage's key, in order (a stage's key includes the keys of the stages it reads)."""
    for stage in s.stages:
        s.keys[stage.name] = s.key(stage)
    return dict(s.keys)


def test_stage_keys_follow_their_inputs(tmp_path):
    import study

    s = study.Study(tmp_path / "run", tmp_path / "data", [0, 1])
    names = [x.name for x in s.stages]
    assert names[:3] == ["data", "distill", "sft"] and names[-1] == "report"
    assert {"train-sirl-s1", "eval-reversed-s0", "gap-random-s0"} <= set(names)
    keys = all_keys(s)
    other = study.Study(tmp_path / "run", tmp_path / "data", [0, 1])
    other.stages[1].settings = {**other.stages[1].settings, "max_new_tokens": 7}  # distill changes
    changed = {name for name, key in all_keys(other).items() if key != keys[name]}
    assert "data" not in changed and "eval-base" not in changed
    assert {"distill", "sft", "eval-aligned", "train-sirl-s0", "eval-sirl-s1", "report"} <= changed
    train = next(x for x in s.stages if x.name == "train-reversed-s1")
    assert "reward=entropy" in train.commands[0] and "seed=1" in train.commands[0]
