import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed")

from sirl.data import encode_prompt  # noqa: E402
from sirl.models import tiny_random_llama, tiny_tokenizer  # noqa: E402
from sirl.rollout import completion_masks, left_pad, rollout  # noqa: E402


def test_completion_masks_hand_cases():
    comp = torch.tensor([[5, 6, 9, 0, 0], [9, 0, 0, 0, 0], [5, 6, 7, 8, 5], [5, 8, 6, 9, 9]])
    mask, trunc = completion_masks(comp, [9, 8])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 0]]
    assert trunc.tolist() == [False, False, False, False]
    mask, trunc = completion_masks(comp, [9])
    assert mask[2].tolist() == [1] * 5 and trunc.tolist() == [False, False, True, False]


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_rollout_layout_groups_and_truncation():
    tok = tiny_tokenizer()
    model = tiny_random_llama(tok)
    prompts = [encode_prompt(tok, "how do i bake bread"), encode_prompt(tok, "tell joke")]
    torch.manual_seed(0)
    r = rollout(model, tok, prompts, group_size=3, max_new_tokens=6)
    P = r.prompt_length
    assert len(r) == 6 and r.prompt_index.tolist() == [0, 0, 0, 1, 1, 1]
    for i in range(6):
        p = prompts[r.prompt_index[i]]
        assert r.input_ids[i, P - len(p):P].tolist() == p  # whole groups share their prompt
        assert r.attention_mask[i, :P].sum() == len(p)
    assert r.completion_mask[:, :P].sum() == 0
    comp = r.completion_mask[:, P:]
    assert torch.equal(r.attention_mask[:, P:], comp)
    lengths = comp.sum(-1)
    eos = tok.eos_token_id
    for i in range(6):
        row = r.input_ids[i, P:]
        if r.truncated[i]:
            assert lengths[i] == 6 and eos not in row.tolist()
        else:
            assert row[lengths[i] - 1] == eos and (row[lengths[i]:] == tok.pad_token_id).all()
    assert r.input_ids.shape[1] <= P + 6


def test_rollout_reproducible_under_seed_and_samples_without_topk():
    tok = tiny_tokenizer()
    model = tiny_random_llama(tok)
    model.generation_config.top_k = 1  # a model default that must NOT leak into sampling
    prompts = [encode_prompt(tok, "tell joke")]
    torch.manual_seed(1)
    a = rollout(model, tok, prompts, group_size=4, max_new_tokens=5)
    torch.manual_seed(1)
    b = rollout(model, tok, prompts, group_size=4, max_new_tokens=5)
    assert torch.equal(a.input_ids, b.input_ids)
    assert len({tuple(x) for x in a.input_ids.tolist()}) > 1  # top_k=1 would make all four identical
