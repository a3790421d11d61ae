"""Reading and writing the files of a run, as data and never as code, with errors that name the file.

One owner for what every other module reads from disk or writes into a run directory:

- records of a prompt or evaluation file (``.jsonl``, ``.json``, ``.csv`` with or without a UTF-8 BOM, ``.txt``),
  each with where it came from (``FILE, line N``), so a bad row is reported by file and line;
- append-only JSON-lines logs (``metrics.jsonl``, ``completions.jsonl``): a torn last line, what a crash
  mid-write leaves, is cut off with a warning naming the file; a bad line anywhere else is an error;
- JSON documents (``state.json``, ``config.json``);
- files written whole or not at all (temporary file, fsync, rename), and a directory's manifest (size and sha256
  of every file), written last, which decides whether a checkpoint or a saved model is intact.

Errors: :class:`FileFormatError` (a ``ValueError``) for contents that are not what they must be, ``OSError`` with a
one-line message naming the path for what the file system refuses (a full disk, a read-only directory).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

MANIFEST = "manifest.json"


class FileFormatError(ValueError):
    """A file whose contents are not what they must be; the message names the file (and the line)."""


def io_error(exc: OSError, action: str, path: Path | str) -> OSError:
    """``exc`` as a one-line OSError naming ``path`` (``cannot write runs/x/metrics.jsonl: No space left on
    device``), with the same errno, so callers can still tell a full disk from a permission problem."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    return OSError(exc.errno, f"cannot {action} {path}: {reason}")


# ---------------------------------------------------------------------------------------------------------------
# records of prompt and evaluation files


def _json_line(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None


def read_text(path: Path) -> str:
    """A text file as UTF-8 (a leading BOM dropped); undecodable bytes are an error naming the file."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise io_error(exc, "read", path) from None


def read_records(path: Path) -> list[tuple[str, object]]:
    """``[(where, row), ...]`` of a ``.jsonl``, ``.json``, ``.csv`` or ``.txt`` file, ``where`` being
    ``"FILE, line N"`` (``"FILE, item N"`` in a JSON list). A row is what the file holds: a dict for CSV, any JSON
    value otherwise (a ``.txt`` line is a string); a ``{"column": [values]}`` JSON document is turned into rows."""
    path = Path(path)
    text = read_text(path)
    if path.suffix == ".jsonl":
        return [(f"{path}, line {i}", _json_line(ln, f"{path}, line {i}"))
                for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    if path.suffix == ".json":
        rows = _json_line(text, str(path))
        if isinstance(rows, dict):  # {"column": [values...]} layout
            if not all(isinstance(v, list) for v in rows.values()):
                raise FileFormatError(f"{path}: a JSON object must map each column to a list of values")
            keys = list(rows)
            rows = [dict(zip(keys, values)) for values in zip(*(rows[k] for k in keys))]
        if not isinstance(rows, list):
            raise FileFormatError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        return [(f"{path}, item {i}", r) for i, r in enumerate(rows)]
    if path.suffix == ".csv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # jailbreak prompts can be long
        reader = csv.DictReader(text.splitlines(keepends=True))
        out = []
        try:
            for row in reader:
                if None in row:  # more cells than header columns
                    raise FileFormatError(f"{path}, line {reader.line_num}: more cells than the header's "
                                          f"{len(reader.fieldnames)} columns")
                out.append((f"{path}, line {reader.line_num}", row))
        except csv.Error as exc:
            raise FileFormatError(f"{path}, line {reader.line_num}: {exc}") from None
        return out
    if path.suffix == ".txt":
        return [(f"{path}, line {i}", ln.strip()) for i, ln in enumerate(text.splitlines(), 1) if ln.strip()]
    raise FileFormatError(f"{path}: expected a .jsonl, .json, .csv or .txt file")


# ---------------------------------------------------------------------------------------------------------------
# append-only JSON-lines logs


def read_log(path: Path, *, repair: bool = False) -> list[dict]:
    """The rows of a JSON-lines log written by appending (``metrics.jsonl``). A torn last line (no newline at
    the end and not valid JSON: a crash mid-write) is dropped with a warning naming the file, and cut off the
    file when ``repair``; an invalid line anywhere else, or a row that is not an object, is a FileFormatError
    naming the file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise io_error(exc, "read", path) from None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    rows = []
    for i, raw in enumerate(lines, 1):
        if raw.strip():
            rows.append(_log_row(raw, path, i))
    if tail.strip():
        try:
            rows.append(_log_row(tail, path, len(lines) + 1))
        except FileFormatError:
            warnings.warn(f"{path}: dropped a torn last line ({len(tail)} bytes) left by an interrupted write",
                          stacklevel=2)
            if repair:
                write_atomic(path, data[: len(data) - len(tail)])
        else:
            if repair:  # a whole row whose newline never reached the disk: the next append must not join it
                write_atomic(path, data + b"\n")
    return rows


def _log_row(raw: bytes, path: Path, line: int) -> dict:
    where = f"{path}, line {line}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FileFormatError(f"{where}: not UTF-8 text") from None
    row = _json_line(text, where)
    if not isinstance(row, dict):
        raise FileFormatError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def keep_log_rows(path: Path, keep: Callable[[dict], bool]) -> list[dict]:
    """Rewrites the log at ``path`` (whole or not at all) with only the rows ``keep`` accepts; returns them."""
    rows = read_log(path, repair=True)
    kept = [r for r in rows if keep(r)]
    if len(kept) != len(rows):
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept).encode())
    return kept


def append_lines(path: Path, rows: Iterable[dict]) -> None:
    """Appends one JSON line per row and flushes them to the disk (a crash leaves at most one torn line)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        raise io_error(exc, "write", path) from None


# ---------------------------------------------------------------------------------------------------------------
# JSON documents and whole-file writes


def read_json(path: Path, what: type | tuple = dict):
    """A JSON document whose top level is a ``what``; anything else is a FileFormatError naming the file."""
    path = Path(path)
    value = _json_line(read_text(path), str(path))
    if not isinstance(value, what):
        raise FileFormatError(f"{path}: expected a JSON {getattr(what, '__name__', what)}, got {type(value).__name__}")
    return value


def write_atomic(path: Path, data: bytes | str) -> None:
    """Writes ``path`` whole or not at all: a temporary file beside it, fsync, rename. A failure (a full disk)
    removes the temporary file and raises an OSError naming ``path``; the old ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise io_error(exc, "write", path) from None


def write_json(path: Path, value) -> None:
    write_atomic(path, json.dumps(value, indent=2))


def fsync_dir(path: Path) -> None:
    """Makes a rename inside ``path`` durable (POSIX: the directory entry itself must reach the disk)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# manifests: what makes a directory "intact"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, extra: dict | None = None) -> None:
    """Records the size and sha256 of every file under ``directory`` (sub-directories included) in its
    ``manifest.json``; written last, so a directory with a valid manifest was written completely."""
    directory = Path(directory)
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    write_json(directory / MANIFEST, {"format": 1, "files": files, **(extra or {})})


def manifest_problem(directory: Path) -> str | None:
    """None when ``directory`` matches its manifest, else the first problem in one line, naming the file."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return f"{manifest} is missing (the directory was not written completely)"
    try:
        files = read_json(manifest).get("files")
    except (FileFormatError, OSError) as exc:
        return str(exc)
    if not isinstance(files, dict) or not files:
        return f"{manifest}: lists no files"
    for name, entry in files.items():
        path = directory / name
        if not isinstance(entry, dict) or "sha256" not in entry or "bytes" not in entry or ".." in Path(name).parts:
            return f"{manifest}: bad entry for {name!r}"
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, its manifest says {entry['bytes']} (truncated or changed)"
        if _sha256(path) != entry["sha256"]:
            return f"{path} does not match its manifest's sha256 (corrupted or changed)"
    return None


def check_saved_dir(directory: Path) -> None:
    """A model or adapter directory about to be loaded: when it carries a manifest (``sirl train`` writes one into
    ``final/`` and ``best/``), every file must match it; FileFormatError naming the file otherwise."""
    directory = Path(directory)
    if (directory / MANIFEST).is_file():
        problem = manifest_problem(directory)
        if problem is not None:
            raise FileFormatError(problem)


def load_error(exc: BaseException, path: Path | str, what: str) -> FileFormatError:
    """A library's failure to read ``path`` (safetensors, weights-only unpickling, JSON) as one line naming it."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return FileFormatError(f"{path}: cannot load the {what} ({type(exc).__name__}: {first})")
