"""Fixtures of the evaluation tests: the shared datasets (skipped when absent) and a tiny random model."""

from __future__ import annotations

import pytest

from sirl.eval.datasets import data_dir


@pytest.fixture
def shared_data():
    """``path -> Path`` under $SIRL_DATA_DIR (default ../shared/data); skips the test when the file is missing."""
    root = data_dir()

    def get(rel: str):
        path = root / rel
        if not path.exists():
            pytest.skip(f"shared dataset {path} is absent (set SIRL_DATA_DIR to the shared/data folder)")
        return path

    return get


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("transformers", reason="transformers is not installed")
    from sirl.models import tiny_random_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    return tiny_random_llama(tok, seed=0).eval(), tok
