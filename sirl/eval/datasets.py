"""Evaluation prompt files -> rows (dicts) -> prompts, categories and attack columns.

A source is a path (.csv, .jsonl, .json, .txt with one prompt per line), a file shipped in ``sirl/presets``, or
``hf:NAME`` (needs ``datasets``), optionally followed by row filters: ``"FILE?label=safe"`` keeps the rows whose
``label`` is ``safe`` (several filters join with ``&``; quote the argument in a shell).

Columns are found by name when not given: the prompt is the first of ``PROMPT_COLUMNS`` present (AdvBench ``goal``,
JailbreakBench ``Goal``, HarmBench ``Behavior``, StrongREJECT ``forbidden_prompt``, XSTest ``prompt``, Alpaca
``instruction``, MT-Bench ``turns`` (first turn), GPTFuzzer ``text``), the category the first of
``CATEGORY_COLUMNS``. In the JailbreakBench-expanded layout (``jbb_expanded.csv``, ``hm_expanded.csv``) every
column that is neither the prompt, the category nor a known metadata column holds one pre-generated jailbreak
prompt per row: those are the file's *attack columns*.

Data for tests and examples lives outside the package, in ``$SIRL_DATA_DIR`` (default ``../shared/data`` beside
the repository, see ``data_dir()``); nothing here needs it.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from sirl.files import FileFormatError, read_records
from sirl.presets import resolve_prompt_path

PROMPT_COLUMNS = ("prompt", "goal", "Goal", "forbidden_prompt", "Behavior", "behavior", "instruction", "question",
                  "turns", "text", "query")
CATEGORY_COLUMNS = ("category", "Category", "SemanticCategory", "semantic_category", "type")
META_COLUMNS = frozenset({
    "", "Index", "index", "id", "ID", "question_id", "Goal", "goal", "Target", "target", "Behavior", "behavior",
    "Category", "category", "Source", "source", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString",
    "BehaviorID", "label", "type", "focus", "note", "prompt", "instruction", "text", "turns", "forbidden_prompt",
    "question", "query", "reference",
})


def data_dir() -> Path:
    """``$SIRL_DATA_DIR``, else ``../shared/data`` relative to the repository (tests and docs only)."""
    env = os.environ.get("SIRL_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"


def split_filters(source: str) -> tuple[str, dict[str, str]]:
    """``"file.csv?label=safe&type=homonyms"`` -> ``("file.csv", {"label": "safe", "type": "homonyms"})``."""
    path, sep, query = source.partition("?")
    if not sep:
        return source, {}
    filters = {}
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise ValueError(f"{source!r}: a filter must look like COLUMN=VALUE, got {part!r}")
        filters[key] = value
    return path, filters


def read_rows(path: Path) -> list[dict]:
    """Rows of one file as dicts (a BOM-tolerant CSV, JSON lines, JSON, text lines); a bare string row becomes
    ``{"prompt": text}``; anything else that is not an object is an error naming the file and line."""
    rows = []
    for where, row in read_records(path):
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict):
            raise FileFormatError(f"{where}: expected an object or a string, got {type(row).__name__}")
        rows.append(row)
    return rows


def load_rows(source: str, split: str = "train") -> list[dict]:
    """All rows of a source after its ``?COLUMN=VALUE`` filters (ValueError when none are left)."""
    spec, filters = split_filters(source)
    path = resolve_prompt_path(spec)
    if path is None:
        if not spec.startswith("hf:"):
            raise FileNotFoundError(f"prompt source {spec!r} is not a file (nor one shipped in sirl/presets)")
        try:
            import datasets
        except ImportError as exc:
            raise ImportError(f"reading {spec!r} needs the `datasets` package") from exc
        rows = [dict(r) for r in datasets.load_dataset(spec[3:], split=split)]
    else:
        rows = read_rows(path)
    if not rows:
        raise ValueError(f"prompt source {spec!r} is empty")
    for key, value in filters.items():
        if key not in rows[0]:
            raise ValueError(f"{spec}: cannot filter on {key!r}: no such column (columns: {list(rows[0])})")
        rows = [r for r in rows if str(r.get(key)) == value]
        if not rows:
            raise ValueError(f"{source}: no row has {key}={value!r}")
    return rows


def pick_column(rows: list[dict], given: str | None, candidates, what: str, required: bool = True) -> str | None:
    columns = list(rows[0])
    if given is not None:
        if given not in columns:
            raise ValueError(f"no {what} column {given!r}; the file's columns are {columns}")
        return given
    for name in candidates:
        if name in columns:
            return name
    if required:
        raise ValueError(f"no {what} column found among {columns}; name it with --{what}-column")
    return None


def prompt_text(value, where: str) -> str:
    """A cell -> the user message: a string, or the first turn of an MT-Bench ``turns`` list."""
    if isinstance(value, list) and value and isinstance(value[0], str):
        value = value[0]
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: empty or non-text prompt {value!r}")
    return value


def attack_columns(rows: list[dict], prompt_column: str, category_column: str | None) -> list[str]:
    """Columns holding one pre-generated jailbreak prompt per row (the JailbreakBench-expanded layout)."""
    skip = META_COLUMNS | {prompt_column, category_column}
    return [c for c in rows[0] if c not in skip and all(isinstance(r.get(c), str) and r[c].strip() for r in rows)]


def select(rows: list, limit: int | None = None, shuffle: bool = False, seed: int = 0) -> list:
    """An optional seeded shuffle, then the first ``limit`` rows."""
    rows = list(rows)
    if shuffle:
        random.Random(seed).shuffle(rows)
    return rows if limit is None else rows[:limit]


class PromptSet:
    """Rows of a source with their prompt column, category column and attack columns resolved."""

    def __init__(self, source: str, *, prompt_column: str | None = None, category_column: str | None = None,
                 limit: int | None = None, shuffle: bool = False, seed: int = 0, split: str = "train",
                 default_filters: dict | None = None):
        self.source = source
        rows = load_rows(source, split)
        if default_filters and not split_filters(source)[1]:
            for key, value in default_filters.items():  # e.g. XSTest: only label=safe unless told otherwise
                if key in rows[0] and any(str(r.get(key)) == value for r in rows):
                    rows = [r for r in rows if str(r.get(key)) == value]
        self.prompt_column = pick_column(rows, prompt_column, PROMPT_COLUMNS, "prompt")
        self.category_column = pick_column(rows, category_column, CATEGORY_COLUMNS, "category", required=False)
        self.attack_columns = attack_columns(rows, self.prompt_column, self.category_column)
        self.rows = select(rows, limit, shuffle, seed)
        if not self.rows:
            raise ValueError(f"{source}: no rows left (limit={limit})")
        self.prompts = [prompt_text(r.get(self.prompt_column), f"{source} row {i}") for i, r in enumerate(self.rows)]

    def categories(self) -> list[str | None]:
        if self.category_column is None:
            return [None] * len(self.rows)
        return [None if r.get(self.category_column) in (None, "") else str(r[self.category_column]) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)
