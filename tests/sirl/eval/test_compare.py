import json

import pytest

from sirl.eval.compare import compare, compare_dirs, flatten


def test_flatten_keeps_numeric_leaves():
    s = {"command": "dsr", "dsr": 0.5, "n": 4, "ok": True, "p": None, "generation": {"max_new_tokens": 64},
         "per_attack": {"direct": {"dsr": 1.0, "n": 2}, "base64": {"dsr": 0.0, "n": 2}}, "attacks": ["direct"]}
    assert flatten(s) == {"dsr": 0.5, "n": 4, "p": None, "per_attack.direct.dsr": 1.0, "per_attack.direct.n": 2,
                          "per_attack.base64.dsr": 0.0, "per_attack.base64.n": 2}


def test_compare_rows_and_dirs(tmp_path):
    a = {"command": "dsr", "dsr": 0.25, "n": 4, "per_attack": {"direct": {"dsr": 0.5}}}
    b = {"command": "dsr", "dsr": 0.75, "n": 4, "per_attack": {"direct": {"dsr": 1.0}, "base64": {"dsr": 0.5}}}
    assert compare(a, b) == [("dsr", 0.25, 0.75, 0.5), ("n", 4, 4, 0), ("per_attack.direct.dsr", 0.5, 1.0, 0.5),
                             ("per_attack.base64.dsr", None, 0.5, None)]
    assert compare({**a, "p_value": None, "adapter": None}, {**b, "p_value": None, "adapter": "x"}) == compare(a, b)
    for name, s in (("before", a), ("after", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(s))
    table = compare_dirs(tmp_path / "before", tmp_path / "after", tmp_path / "cmp.md")
    lines = table.splitlines()  # no settings in these summaries: the metric table alone
    assert "A: before" in lines[0] and "B: after" in lines[0] and len(lines) == 2 + 4
    assert "| dsr" in lines[2] and "0.250" in lines[2] and "0.750" in lines[2] and "0.500" in lines[2]
    assert "n/a" in lines[5] and (tmp_path / "cmp.md").read_text().strip() == table
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "summary.json").write_text(json.dumps({"command": "overrefusal", "refusal_rate": 0.1}))
    with pytest.raises(ValueError, match="nothing to compare"):
        compare_dirs(tmp_path / "before", tmp_path / "other")
    with pytest.raises(FileNotFoundError):
        compare_dirs(tmp_path / "before", tmp_path / "missing")


def test_compare_shows_both_runs_settings_and_warns_when_data_differ(tmp_path):
    """A before/after pair differs in the adapter only: shown, no warning. Different data or limit: a warning."""
    gen = {"max_new_tokens": 64, "do_sample": False, "progress": True}
    a = {"command": "dsr", "dsr": 0.1, "model": "m", "adapter": None, "data": "jbb.csv", "limit": 20, "seed": 0,
         "judge": "keyword:default", "generation": gen}
    b = {**a, "dsr": 0.3, "adapter": "runs/x/final", "generation": {**gen, "progress": False}}
    for name, s in (("a", a), ("b", b), ("c", {**b, "data": "advbench.csv", "limit": 50})):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(s))
    table = compare_dirs(tmp_path / "a", tmp_path / "b")
    rows = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in table.splitlines()
            if ln.startswith("| ")}
    assert rows["adapter"] == ["n/a", "runs/x/final", "differs"]  # not a metric row of n/a | n/a
    assert rows["data"] == ["jbb.csv", "jbb.csv", "same"] and rows["generation.max_new_tokens"][2] == "same"
    assert "generation.progress" not in rows and "warning" not in table
    assert [r for r in rows if r == "dsr"] and rows["dsr"] == ["0.100", "0.300", "0.200"]
    table = compare_dirs(tmp_path / "a", tmp_path / "c")
    warning = [ln for ln in table.splitlines() if ln.startswith("warning")]
    assert warning == ["warning: the runs differ in data, limit: the metrics below do not measure the same thing"]
