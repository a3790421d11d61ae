"""Prompt sources -> a seeded, resumable stream of chat-templated prompt token ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sirl.files import FileFormatError, read_records
from sirl.presets import PRESET_DIR, resolve_prompt_path

CHAT_ROLES = ("system", "user", "assistant")


def prompt_problem(value) -> str | None:
    """Why ``value`` is not a prompt (None when it is): a non-empty string (one user message), or a list of
    ``{"role", "content"}`` chat messages with roles in ``CHAT_ROLES``, string contents and a user message."""
    if isinstance(value, str):
        return None if value.strip() else "the prompt is empty"
    if not isinstance(value, list) or not value:
        return f"a prompt must be a string or a list of chat messages, got {type(value).__name__}"
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            return f"message {i} must be an object with role and content, got {type(message).__name__}"
        if message.get("role") not in CHAT_ROLES:
            return f"message {i} has role {message.get('role')!r}; expected one of {', '.join(CHAT_ROLES)}"
        if not isinstance(message.get("content"), str):
            return f"message {i} ({message['role']}) needs a string content, got {message.get('content')!r:.60}"
    if not any(m["role"] == "user" for m in value):
        return "the chat messages hold no user message"
    return None


def _prompt(where: str, row, column: str):
    value = row
    if isinstance(row, dict):
        if column not in row:
            raise FileFormatError(f"{where}: no column {column!r} (it has {', '.join(map(str, row))}; set "
                                  "prompt_column)")
        value = row[column]
    problem = prompt_problem(value)
    if problem is not None:
        raise FileFormatError(f"{where}: {problem}")
    return value


def load_prompts(source: str, prompt_column: str = "prompt", split: str = "train") -> list:
    """Prompts from a .jsonl / .json / .csv file, or ``hf:NAME`` (a Hugging Face dataset by name or local
    directory, read with ``datasets.load_dataset``; needs ``datasets``), every one checked (``prompt_problem``):
    a bad row is a FileFormatError naming the file and line, raised before any model loads.

    Each prompt is a string (one user message) or a list of ``{"role", "content"}`` messages.
    """
    if source.startswith("hf:"):
        name = source[3:]
        try:
            import datasets
        except ImportError as exc:
            raise ImportError(f"prompt source {source!r} is a Hugging Face dataset: `pip install datasets`") from exc
        records = [(f"{source}, row {i}", r) for i, r in enumerate(datasets.load_dataset(name, split=split))]
    elif (path := resolve_prompt_path(source)) is None:
        raise FileNotFoundError(
            f"prompt source {source!r}: no such file here or in {PRESET_DIR} (a Hugging Face dataset is 'hf:NAME')"
        )
    elif path.suffix not in (".jsonl", ".json", ".csv"):
        raise FileFormatError(f"{path}: expected .jsonl, .json or .csv")
    else:
        records = read_records(path)
    prompts = [_prompt(where, row, prompt_column) for where, row in records]
    if not prompts:
        raise FileFormatError(f"prompt source {source!r} is empty")
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
