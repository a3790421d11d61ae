"""Prompt sources -> a seeded, resumable stream of chat-templated prompt token ids."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sirl.config import PRESET_DIR


def resolve_prompt_path(source: str) -> Path | None:
    """A path as given, else a file of that name shipped in sirl/presets; None if neither exists."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    shipped = PRESET_DIR / source
    return shipped if shipped.exists() else None


def _column(row, column: str, where: str):
    if isinstance(row, str):
        return row
    if not isinstance(row, dict) or column not in row:
        raise ValueError(f"{where}: no column {column!r} (set prompt_column)")
    return row[column]


def load_prompts(source: str, prompt_column: str = "prompt", split: str = "train") -> list:
    """Prompts from a .jsonl / .json / .csv file, or ``hf:NAME`` (a Hugging Face dataset by name or local
    directory, read with ``datasets.load_dataset``; needs ``datasets``).

    Each prompt is a string (one user message) or a list of ``{"role", "content"}`` messages.
    """
    if source.startswith("hf:"):
        name = source[3:]
        try:
            import datasets
        except ImportError as exc:
            raise ImportError(f"prompt source {source!r} is a Hugging Face dataset: `pip install datasets`") from exc
        rows = datasets.load_dataset(name, split=split)
        prompts = [_column(r, prompt_column, name) for r in rows]
    elif (path := resolve_prompt_path(source)) is None:
        raise FileNotFoundError(
            f"prompt source {source!r}: no such file here or in {PRESET_DIR} (a Hugging Face dataset is 'hf:NAME')"
        )
    elif path.suffix == ".jsonl":
        with open(path) as f:
            prompts = [_column(json.loads(line), prompt_column, str(path)) for line in f if line.strip()]
    elif path.suffix == ".json":
        rows = json.loads(path.read_text())
        if isinstance(rows, dict):  # {"prompt": [...]} column layout
            if prompt_column not in rows:
                raise ValueError(f"{path}: no column {prompt_column!r} (set prompt_column)")
            rows = rows[prompt_column]
        prompts = [_column(r, prompt_column, str(path)) for r in rows]
    elif path.suffix == ".csv":
        with open(path, newline="") as f:
            prompts = [_column(r, prompt_column, str(path)) for r in csv.DictReader(f)]
    else:
        raise ValueError(f"{path}: expected .jsonl, .json or .csv")
    if not prompts:
        raise ValueError(f"prompt source {source!r} is empty")
    return prompts


def chat_messages(prompt, system_prompt: str | None = None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt:
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def encode_prompt(tokenizer, prompt, system_prompt: str | None = None, max_tokens: int = 512) -> list[int]:
    """Chat template with the generation prompt, then token ids (cut from the left beyond ``max_tokens``)."""
    text = tokenizer.apply_chat_template(
        chat_messages(prompt, system_prompt), tokenize=False, add_generation_prompt=True
    )
    # The template already wrote BOS-like markers; adding special tokens again would double them.
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_tokens:]


@dataclass
class PromptStream:
    """Prompts in a seeded order, one fresh permutation per epoch; ``position`` is all it needs to resume.

    Every rank builds the same stream and takes its own slice of each step's prompts, so groups never split.
    """

    prompts: list
    seed: int = 0
    shuffle: bool = True
    position: int = 0  # prompts consumed so far, over all ranks

    def _order(self, epoch: int) -> list[int]:
        n = len(self.prompts)
        if not self.shuffle:
            return list(range(n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def next_indices(self, count: int) -> list[int]:
        n = len(self.prompts)
        out = []
        for _ in range(count):
            epoch, offset = divmod(self.position, n)
            out.append(self._order(epoch)[offset])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_prompts", len(self.prompts)) != len(self.prompts):
            raise ValueError("the prompt set changed since the checkpoint; resuming would not reproduce the run")
        self.position = int(state["position"])
