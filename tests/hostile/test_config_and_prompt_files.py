"""Hostile config and prompt files: each gets one typed error line naming the file (and line) or the key, before
any model loads; code named by ``py:`` references is imported only once everything else has passed."""

from __future__ import annotations

import json
import sys

import pytest

pytest.importorskip("yaml", reason="pyyaml is not installed")

import sirl.models  # noqa: E402
from sirl.cli import main  # noqa: E402
from sirl.config import ConfigError, load_config  # noqa: E402
from sirl.data import load_prompts  # noqa: E402
from sirl.files import FileFormatError  # noqa: E402


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if a model is loaded: every check below must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was reported")

    monkeypatch.setattr(sirl.models, "load_model_and_tokenizer", refuse)


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


def train(*args: str) -> int:
    return main(["train", "--preset", "tiny", "progress=false", *args])


# ---- config files and command lines ------------------------------------------------------------------------------

def test_duplicate_yaml_keys_are_an_error_naming_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\nsteps: 3\nlr: 0.1\n")
    with pytest.raises(ConfigError, match=rf"^{path}, line 3: duplicate key 'lr' \(first given on line 1\)$"):
        load_config(path)
    nested = tmp_path / "n.yaml"
    nested.write_text("extra:\n  a: 1\n  a: 2\n")
    with pytest.raises(ConfigError, match="line 3: duplicate key 'a'"):
        load_config(nested)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-5\nsteps: [3\n")
    with pytest.raises(ConfigError, match=rf"^{path}, line \d+: not valid YAML"):
        load_config(path)


def test_yaml_tags_that_build_objects_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("extra: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("args, message", [
    (["--steps", "1", "steps=1.5"], "steps=1.5: must be an integer >= 1"),
    (["--steps", "1", "steps=2"], "--steps 1 and steps=2 disagree"),
    (["--output-dir", "a", "output_dir=b"], "--output-dir a and output_dir=b disagree"),
    (["steps=1.5", "steps=2"], "steps=1.5: must be an integer >= 1"),  # a replaced key=value is checked too
    (["temperature=1e-320"], "temperature=1e-320: must be in [1.18e-38, 8.51e+37]"),
    (["temperature=1e46"], "temperature=1e46: must be in"),
    (["eval_every=1", "eval_overrefusal=overrefusal_cpu_demo.jsonl", "eval_judge=py:os.path"],
     "eval_judge=py:os.path: must be py:MODULE:FUNCTION"),
    (["eval_every=1", "eval_capability=prompts_cpu_demo.jsonl", "eval_score_fn=py:a b:c"],
     "must be py:MODULE:FUNCTION"),
])
def test_command_line_values_are_each_checked(args, message, capsys, tmp_path, no_model, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert train(*args) == 2
    line = error_line(capsys)
    assert message in line, line


def test_agreeing_flag_and_key_value_are_fine(tmp_path, no_model, capsys):
    # the same value in both spellings is accepted; the run then stops at the model (refused here)
    assert train("--steps", "2", "steps=2.0", "--output-dir", str(tmp_path / "r")) == 2
    assert "a model was loaded" in error_line(capsys)


def test_py_references_are_imported_only_after_every_other_check(tmp_path, monkeypatch, capsys, no_model):
    """A module named by eval_score_fn records that it was imported: not while any other check still fails."""
    marker = tmp_path / "imported"
    (tmp_path / "planted_score.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef score(questions, responses):\n    return [0.0] * len(responses)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bad_prompts = tmp_path / "p.jsonl"
    bad_prompts.write_text('{"prompt": "fine"}\n{"prompt": 123}\n')
    common = ["eval_every=1", "eval_capability=prompts_cpu_demo.jsonl", "eval_score_fn=py:planted_score:score",
              "--output-dir", str(tmp_path / "run")]
    assert train(*common, f"prompts={bad_prompts}") == 2
    assert f"{bad_prompts}, line 2" in error_line(capsys)
    assert not marker.exists() and "planted_score" not in sys.modules
    assert train(*common, "keep_best=eval/nothing") == 2  # the keep_best check needs the loaded eval sets
    assert "keep_best=eval/nothing" in error_line(capsys)
    assert not marker.exists()
    assert train(*common) == 2  # everything else passed: imported, then the (refused) model load
    assert "a model was loaded" in error_line(capsys)
    assert marker.exists()


def test_help_says_that_a_config_runs_code(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "py:MODULE:FN" in out and "run its code" in out and "never as pickled objects" in out


# ---- prompt files ----------------------------------------------------------------------------------------------------

def test_a_bad_jsonl_row_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n{"prompt": "c"\n')
    with pytest.raises(FileFormatError, match=rf"^{path}, line 4: not valid JSON"):
        load_prompts(str(path))


@pytest.mark.parametrize("row, problem", [
    ({"prompt": 123}, "a prompt must be a string or a list of chat messages, got int"),
    ({"prompt": ""}, "the prompt is empty"),
    ({"prompt": [{"role": "user"}]}, "message 0 (user) needs a string content, got None"),
    ({"prompt": [{"role": "robot", "content": "x"}]},
     "message 0 has role 'robot'; expected one of system, user, assistant"),
    ({"prompt": [{"role": "system", "content": "x"}]}, "the chat messages hold no user message"),
    ({"prompt": ["hi"]}, "message 0 must be an object with role and content, got str"),
    ({"text": "x"}, "no column 'prompt' (it has text; set prompt_column)"),
])
def test_bad_prompts_are_refused_before_any_model_loads(row, problem, tmp_path, capsys, no_model):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "fine"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(FileFormatError) as err:
        load_prompts(str(path))
    assert str(err.value) == f"{path}, line 2: {problem}"
    assert train(f"prompts={path}", "--output-dir", str(tmp_path / "run")) == 2
    assert error_line(capsys) == f"sirl train: error: FileFormatError: {path}, line 2: {problem} (--debug shows the " \
                                 "traceback)"


def test_csv_with_a_utf8_bom_and_a_bad_row(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes("\ufeffprompt,category\nhello,a\n\"how are you\",b\n".encode())
    assert load_prompts(str(path)) == ["hello", "how are you"]
    path.write_bytes("\ufeffprompt\nhello\nx,y\n".encode())
    with pytest.raises(FileFormatError, match=rf"^{path}, line 3: more cells than the header's 1 columns"):
        load_prompts(str(path))


def test_a_prompt_file_that_is_not_text(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\xff\xfe\n')
    with pytest.raises(FileFormatError, match=rf"^{path}: not UTF-8 text"):
        load_prompts(str(path))
