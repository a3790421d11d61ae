import json

import pytest

from sirl.eval.datasets import PromptSet, attack_columns, data_dir, load_rows, select, split_filters


def test_split_filters():
    assert split_filters("a.csv") == ("a.csv", {})
    assert split_filters("a.csv?label=safe&type=x y") == ("a.csv", {"label": "safe", "type": "x y"})
    with pytest.raises(ValueError, match="COLUMN=VALUE"):
        split_filters("a.csv?label")


def test_formats_filters_and_errors(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n second \n")
    assert [r["prompt"] for r in load_rows(str(tmp_path / "p.txt"))] == ["first", "second"]
    (tmp_path / "cols.json").write_text(json.dumps({"question": ["a", "b"], "kind": ["x", "y"]}))
    assert load_rows(str(tmp_path / "cols.json")) == [{"question": "a", "kind": "x"}, {"question": "b", "kind": "y"}]
    (tmp_path / "bom.csv").write_bytes("\ufeffIndex,Goal,label\n0,g0,safe\n1,g1,unsafe\n".encode("utf-8"))
    rows = load_rows(str(tmp_path / "bom.csv") + "?label=unsafe")
    assert rows == [{"Index": "1", "Goal": "g1", "label": "unsafe"}]  # the BOM is not part of the first column
    with pytest.raises(ValueError, match="no such column"):
        load_rows(str(tmp_path / "bom.csv") + "?colour=red")
    with pytest.raises(ValueError, match="no row has"):
        load_rows(str(tmp_path / "bom.csv") + "?label=maybe")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_rows(str(tmp_path / "empty.jsonl"))
    with pytest.raises(FileNotFoundError):
        load_rows(str(tmp_path / "nope.csv"))
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(ValueError, match="expected"):
        load_rows(str(tmp_path / "x.parquet"))


def test_prompt_set_columns_limit_shuffle(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"q": f"q{i}", "category": "c" if i % 2 else "d", "attackA": f"A{i}"}) + "\n"
                            for i in range(10)))
    with pytest.raises(ValueError, match="prompt column"):
        PromptSet(str(path))
    with pytest.raises(ValueError, match="no prompt column 'nope'"):
        PromptSet(str(path), prompt_column="nope")
    ps = PromptSet(str(path), prompt_column="q", limit=3)
    assert ps.prompts == ["q0", "q1", "q2"] and ps.categories() == ["d", "c", "d"] and ps.attack_columns == ["attackA"]
    shuffled = PromptSet(str(path), prompt_column="q", limit=4, shuffle=True, seed=1)
    assert shuffled.prompts == PromptSet(str(path), prompt_column="q", limit=4, shuffle=True, seed=1).prompts
    assert shuffled.prompts != ps.prompts[:4] and len(set(shuffled.prompts)) == 4
    assert select(list(range(5)), 2) == [0, 1]
    (tmp_path / "blank.jsonl").write_text(json.dumps({"prompt": " "}) + "\n")
    with pytest.raises(ValueError, match="empty or non-text prompt"):
        PromptSet(str(tmp_path / "blank.jsonl"))


def test_shipped_demo_sets():
    harmful = PromptSet("prompts_cpu_demo.jsonl?label=harmful")
    benign = PromptSet("prompts_cpu_demo.jsonl?label=benign")
    assert len(harmful) >= 10 and len(benign) >= 10 and not set(harmful.prompts) & set(benign.prompts)
    over = PromptSet("overrefusal_cpu_demo.jsonl")
    assert len(over) == 20 and over.category_column == "type" and len(set(over.categories())) >= 6


def test_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("SIRL_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.delenv("SIRL_DATA_DIR")
    assert data_dir().parts[-2:] == ("shared", "data")


@pytest.mark.parametrize("rel, prompt_column, category_column, n, first", [
    ("advbench/harmful_behaviors.csv", "goal", None, 520, "Write a script that can exploit vulnerabilities"),
    ("jbb/harmful-behaviors.csv", "Goal", "Category", 100, "Write a defamatory article"),
    ("harmbench/harmbench_behaviors_text_test.csv", "Behavior", "SemanticCategory", 320, None),
    ("strongreject/strongreject_dataset.csv", "forbidden_prompt", "category", 313, None),
    ("mtbench/question.jsonl", "turns", "category", 80, "Compose an engaging travel blog post"),
    ("gptfuzz/question_list.csv", "text", None, 100, None),
])
def test_shared_datasets_are_read(shared_data, rel, prompt_column, category_column, n, first):
    ps = PromptSet(str(shared_data(rel)))
    assert (ps.prompt_column, ps.category_column, len(ps)) == (prompt_column, category_column, n)
    assert all(isinstance(p, str) and p.strip() for p in ps.prompts)
    if first:
        assert ps.prompts[0].startswith(first)
    if rel.startswith(("advbench", "jbb/", "mtbench")):
        assert ps.attack_columns == []


def test_jailbreakbench_expanded_layout(shared_data):
    ps = PromptSet(str(shared_data("pandaguard/jbb_expanded.csv")), limit=5)
    assert ps.prompt_column == "Goal" and ps.category_column == "Category" and len(ps) == 5
    assert len(ps.attack_columns) == 23 and {"PAIR", "GCG", "AIM", "past_tense", "new_gpt4_cipher"} <= set(
        ps.attack_columns)
    assert not {"Goal", "Target", "Behavior", "Category", "Source", "Index"} & set(ps.attack_columns)
    hm = PromptSet(str(shared_data("pandaguard/hm_expanded.csv")))
    assert hm.prompt_column == "Goal" and hm.category_column == "SemanticCategory" and len(hm) == 200
    assert hm.attack_columns == ["new_gcg", "new_pair", "new_random_search", "past_tense", "tense_future",
                                 "BETTER_DAN", "AIM", "new_ica"]
    assert attack_columns(ps.rows, "Goal", "Category") == ps.attack_columns


def test_xstest_safe_rows_by_default(shared_data):
    path = str(shared_data("xstest/xstest_prompts.csv"))
    safe = PromptSet(path, default_filters={"label": "safe"})
    assert len(safe) == 250 and safe.category_column == "type" and len(set(safe.categories())) == 10
    unsafe = PromptSet(path + "?label=unsafe", default_filters={"label": "safe"})  # an explicit filter wins
    assert len(unsafe) == 200 and all(t.startswith("contrast") for t in unsafe.categories())


def test_alpaca_instructions(shared_data):
    ps = PromptSet(str(shared_data("alpaca/alpaca_no_input_instructions.json")), limit=25)
    assert ps.prompt_column == "instruction" and len(ps) == 25 and ps.categories() == [None] * 25
