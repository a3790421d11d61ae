import json

import pytest

from sirl.data import PromptStream, encode_prompt, load_prompts


def test_jsonl_json_csv_with_prompt_column(tmp_path):
    (tmp_path / "p.jsonl").write_text(json.dumps({"q": "a"}) + "\n\n" + json.dumps({"q": "b"}) + "\n")
    (tmp_path / "p.json").write_text(json.dumps([{"q": "a"}, {"q": "b"}]))
    (tmp_path / "p.csv").write_text("id,q\n1,a\n2,b\n")
    for name in ("p.jsonl", "p.json", "p.csv"):
        assert load_prompts(str(tmp_path / name), "q") == ["a", "b"]
    with pytest.raises(ValueError, match="prompt_column"):
        load_prompts(str(tmp_path / "p.jsonl"), "prompt")


def test_shipped_prompt_set():
    rows = [json.loads(x) for x in open(__import__("sirl.data").data.resolve_prompt_path("prompts_cpu_demo.jsonl"))]
    labels = [r["label"] for r in rows]
    assert 30 <= len(rows) <= 80 and labels.count("harmful") >= 10 and labels.count("benign") >= 10
    assert load_prompts("prompts_cpu_demo.jsonl")[0] == rows[0]["prompt"]


def test_missing_source_explains(tmp_path):
    with pytest.raises(FileNotFoundError, match="definitely/not/here.jsonl.*hf:NAME"):
        load_prompts("definitely/not/here.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_prompts(str(tmp_path / "empty.jsonl"))
    (tmp_path / "p.txt").write_text("a\n")
    with pytest.raises(ValueError, match="expected .jsonl, .json or .csv"):
        load_prompts(str(tmp_path / "p.txt"))


def test_hugging_face_dataset_by_name(tmp_path):
    """``hf:NAME`` goes through ``datasets.load_dataset`` (here a local dataset folder: no hub access in CI)."""
    pytest.importorskip("datasets", reason="datasets is not installed")
    folder = tmp_path / "my_prompts"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"instruction": w}) + "\n" for w in ("a", "b", "c")))
    (folder / "test.jsonl").write_text(json.dumps({"instruction": "z"}) + "\n")
    assert load_prompts(f"hf:{folder}", "instruction") == ["a", "b", "c"]
    assert load_prompts(f"hf:{folder}", "instruction", split="test") == ["z"]
    with pytest.raises(ValueError, match="no column 'prompt'"):
        load_prompts(f"hf:{folder}", "prompt")


def test_chat_template_applied():
    pytest.importorskip("transformers", reason="transformers is not installed")
    from sirl.models import tiny_tokenizer

    tok = tiny_tokenizer()
    ids = encode_prompt(tok, "how do i bake bread", system_prompt="be safe")
    assert tok.decode(ids) == "<|system|> <unk> safe <|end|> <|user|> how do i bake bread <|end|> <|assistant|>"
    assert len(encode_prompt(tok, "how do i bake bread", max_tokens=3)) == 3


def test_stream_is_seeded_covers_each_epoch_and_resumes():
    prompts = [f"p{i}" for i in range(7)]
    a = PromptStream(prompts, seed=3)
    first = a.next_indices(7)
    assert sorted(first) == list(range(7))  # one epoch = a permutation
    assert first != list(range(7))
    a.next_indices(3)
    b = PromptStream(prompts, seed=3)
    b.load_state_dict(a.state_dict())
    assert a.next_indices(9) == b.next_indices(9)
    assert PromptStream(prompts, seed=4).next_indices(7) != first
    assert PromptStream(prompts, shuffle=False).next_indices(8) == [0, 1, 2, 3, 4, 5, 6, 0]
    with pytest.raises(ValueError):
        PromptStream(prompts[:3]).load_state_dict(a.state_dict())
