"""A run directory: checkpoints and saved models, written atomically, verified on the way back, data only.

What a run directory holds, and what is trusted (nothing in it is ever run as code):

    metrics.jsonl, completions.jsonl    one JSON object a line, appended (a torn last line is cut off on resume)
    config.json, config_changes.jsonl   the run's settings, JSON
    checkpoint-NNNNNNN/                 trainable.safetensors   the trained parameters (safetensors)
                                        optim.pt                optimizer + schedule (read with weights_only=True)
                                        (parallel=fsdp instead: shard-*.safetensors, each rank's shards of the
                                        trained parameters and optimizer state written by torch.distributed.
                                        checkpoint's safetensors writer, and optim_groups.json, the rest of the
                                        optimizer and schedule state: loadable by any number of ranks)
                                        rng_rank{R}.json        every RNG state of rank R
                                        state.json              step, data position, best-evaluation state
                                        config.json             the settings the checkpoint was written with
                                        manifest.json           size + sha256 of each file above, written last
    final/, best/                       the adapter or model (safetensors, from save_pretrained) + manifest.json
    eval/step-N/                        evaluation outputs

Every directory is written under a ``.tmp`` name and renamed into place once its manifest is written, so a crash
leaves either the old directory or the new one. Resuming takes the newest checkpoint whose manifest matches and
whose ``state.json`` is consistent; a damaged newer one is skipped with a warning naming the file. ``final/`` and
``best/`` interrupted mid-replacement are restored from their ``.tmp`` (when complete) or ``.old`` copy.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from sirl.files import (
    FileFormatError,
    fsync_dir,
    io_error,
    manifest_problem,
    read_json,
    write_json,
    write_manifest,
)

TRAINABLE = "trainable.safetensors"
OPTIM = "optim.pt"
GROUPS = "optim_groups.json"  # the sharded format's non-tensor optimizer and schedule state
STATE = "state.json"
CONFIG = "config.json"
PREFIX = "checkpoint-"
# What a run writes into its output directory: a fresh run refuses a directory holding any of these.
RUN_ENTRIES = ("metrics.jsonl", "completions.jsonl", "config.json", "config_changes.jsonl", "final", "best", "eval",
               "tensorboard")


class CheckpointError(ValueError):
    """No usable checkpoint, or one that does not belong to this run; the message names the file."""


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.json"


def checkpoint_step(path: Path) -> int | None:
    """N of ``checkpoint-N`` (None for any other name, e.g. an interrupted ``checkpoint-N.tmp``)."""
    tail = path.name[len(PREFIX):] if path.name.startswith(PREFIX) else ""
    return int(tail) if tail.isdigit() else None


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Checkpoint directories by name (complete or not: see :func:`choose_checkpoint`), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


# ---------------------------------------------------------------------------------------------------------------
# the output directory


def run_entries(output_dir: Path) -> list[str]:
    """Names in ``output_dir`` that a run wrote (checkpoints and interrupted ``.tmp``/``.old`` copies included)."""
    if not output_dir.is_dir():
        return []
    names = []
    for p in sorted(output_dir.iterdir()):
        base = p.name.removesuffix(".tmp").removesuffix(".old")
        if base in RUN_ENTRIES or base.startswith(PREFIX):
            names.append(p.name)
    return names


def prepare_output_dir(output_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Checks ``output_dir`` before anything is loaded: a fresh run refuses another run's files unless
    ``overwrite`` (they are moved into ``previous-<time>/``, never deleted); the directory must be writable."""
    found = run_entries(output_dir)
    if not resume and found:
        if not overwrite:
            shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
            raise FileExistsError(f"{output_dir} already holds a run ({shown}): pass --resume to continue it, "
                                  "--overwrite to move its files aside, or choose another --output-dir")
        aside = output_dir / time.strftime("previous-%Y%m%d-%H%M%S")
        try:
            aside.mkdir()
            for name in found:
                (output_dir / name).rename(aside / name)
        except OSError as exc:
            raise io_error(exc, "move the old run aside into", aside) from None
        print(f"--overwrite: moved the previous run's {len(found)} entries into {aside}", flush=True)
    probe = output_dir / ".sirl-write-check"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise io_error(exc, "write into the output directory", output_dir) from None


# ---------------------------------------------------------------------------------------------------------------
# RNG states as JSON


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict, path: Path) -> None:
    """Restores :func:`rng_state`'s output read from ``path``; a malformed state names the file."""
    try:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), None if gauss is None else float(gauss)))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
        raise FileFormatError(f"{path}: not a valid RNG state ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------------------------------------
# saving


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def replace_dir(tmp: Path, final: Path) -> None:
    """Puts the finished directory ``tmp`` at ``final``; the old ``final`` stays as ``final.old`` until the new
    one is in place (:func:`recover_dir` undoes an interruption between the two renames)."""
    old = final.with_name(final.name + ".old")
    if final.exists():
        _remove(old)
        final.rename(old)
    tmp.rename(final)  # atomic on POSIX: the directory exists whole or not at all
    fsync_dir(final.parent)
    _remove(old)


def save_checkpoint(output_dir: Path, step: int, policy, optimizer, scheduler, stream, cfg, dd, selection) -> Path:
    """``checkpoint-{step}``, written under ``.tmp`` and renamed once its manifest is complete. Each rank writes
    its own RNG state. A failure (a full disk) removes the partial directory, keeps the previous checkpoints and
    raises an OSError naming the path."""
    final = output_dir / f"{PREFIX}{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    try:
        if dd.main:
            _remove(tmp)
            tmp.mkdir(parents=True)
        dd.barrier()
        write_json(tmp / rng_file(dd.rank), rng_state())
        if dd.sharded:
            _save_sharded(tmp, policy, optimizer, scheduler, dd)
        elif dd.main:
            _save_tensors(trainable_state(policy), tmp / TRAINABLE)
            _torch_save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIM)
        if dd.main:
            write_json(tmp / STATE, {"step": step, "data": stream.state_dict(), "selection": selection.state_dict()})
            write_json(tmp / CONFIG, cfg.to_dict())
        dd.barrier()
        if dd.main:
            write_manifest(tmp, {"step": step, "ranks": dd.world})
            replace_dir(tmp, final)  # a step saved twice (early stop at a save_every step) keeps one copy
            for old in checkpoint_dirs(output_dir)[: -max(1, cfg.keep_checkpoints)]:
                _remove(old)
    except OSError as exc:
        if dd.main:
            _remove(tmp)
        raise io_error(exc, "write the checkpoint", final) from None
    dd.barrier()
    return final


def _save_tensors(tensors: dict, path: Path) -> None:
    from safetensors.torch import save_file

    with _writer_errors():
        save_file(tensors, str(path))


@contextmanager
def _writer_errors():
    """A safetensors writer's failure (a full disk) as the OSError it is, so callers name the path once."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as exc:
        raise OSError(errno.EIO, f"safetensors could not write it ({exc})") from None


def _torch_save(obj, path: Path) -> None:
    # Through a Python file object: a full disk is then an OSError with its errno, not the RuntimeError
    # "[enforce fail at inline_container.cc:672]" that torch.save(obj, path) raises.
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _sharded_state(policy, optimizer) -> tuple[dict, dict]:
    """(tensors, the rest) of the sharded format: ``model.NAME`` for each trainable parameter's shard and
    ``optim.KEY`` for each tensor of the flattened optimizer state (torch.distributed.checkpoint's names), and the
    optimizer state's non-tensor entries (its param groups)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optim = get_optimizer_state_dict(policy, optimizer, options=StateDictOptions(flatten_optimizer_state_dict=True))
    tensors = {f"model.{n}": p.detach() for n, p in policy.named_parameters() if p.requires_grad}
    tensors.update({f"optim.{k}": v for k, v in optim.items() if isinstance(v, torch.Tensor)})
    return tensors, {k: v for k, v in optim.items() if not isinstance(v, torch.Tensor)}


def _save_sharded(tmp: Path, policy, optimizer, scheduler, dd) -> None:
    """Every rank writes its shards (safetensors, no pickle anywhere); rank 0 the non-tensor state as JSON."""
    import torch.distributed.checkpoint as dcp

    tensors, groups = _sharded_state(policy, optimizer)
    with _writer_errors():
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    if dd.main:
        write_json(tmp / GROUPS, {"optimizer": groups, "scheduler": scheduler.state_dict()})


def _initialise_optimizer_state(optimizer) -> None:
    """AdamW creates its state at the first step; a loaded state needs somewhere to go. One step with zero
    gradients at learning rate 0 creates it and changes no parameter (the update and the weight decay are both
    scaled by the learning rate); the loaded state then replaces it."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _load_sharded(path: Path, policy, optimizer, scheduler, dd) -> None:
    """A sharded checkpoint into this run's parameters and optimizer, whatever its number of ranks (the reader
    takes each tensor's global offsets from the safetensors headers and gives every rank its own slice)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    _initialise_optimizer_state(optimizer)
    tensors, _ = _sharded_state(policy, optimizer)
    groups = read_json(path / GROUPS)
    try:
        # in place: the tensors are views of the parameters' and the optimizer state's own shards
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(path)), no_dist=dd.world == 1)
        optim = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
        set_optimizer_state_dict(policy, optimizer, {**optim, **groups["optimizer"]},
                                 options=StateDictOptions(flatten_optimizer_state_dict=True))
        scheduler.load_state_dict(groups["scheduler"])
    except (KeyError, ValueError, RuntimeError, TypeError, AssertionError) as exc:
        raise FileFormatError(f"{path}: not this run's sharded checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def save_model(policy, tokenizer, path: Path, notes: dict[str, dict] | None = None) -> None:
    """The adapter (LoRA) or the whole model at ``path`` (``final/``, ``best/``): safetensors from
    ``save_pretrained``, the tokenizer, the JSON ``notes`` (file name -> content) and a manifest, written under
    ``.tmp`` and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    _remove(tmp)
    try:
        with _writer_errors():
            _save_pretrained(policy, tmp)
        tokenizer.save_pretrained(tmp)
        for name, content in (notes or {}).items():
            write_json(tmp / name, content)
        write_manifest(tmp)
        replace_dir(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise io_error(exc, "write", path) from None


def _save_pretrained(policy, tmp: Path) -> None:
    from sirl.reference import is_peft_model

    if is_peft_model(policy):
        # peft's "auto" would look the base model up on the Hub (base_model_name_or_path is the user's name for it)
        # to decide whether to save the embeddings: save them exactly when training touched them.
        trained_embeddings = any(p.requires_grad and ("embed" in n or "lm_head" in n)
                                 for n, p in policy.named_parameters())
        policy.save_pretrained(tmp, save_embedding_layers=trained_embeddings, safe_serialization=True)
    else:
        policy.save_pretrained(tmp, safe_serialization=True)


def save_best(output_dir: Path, policy, tokenizer, selection) -> None:
    """``best/``: the model of the best evaluation so far, with ``best.json`` saying which and by what."""
    save_model(policy, tokenizer, output_dir / "best", {"best.json": {
        "step": selection.best_step, "metric": selection.metric, "mode": selection.mode,
        "value": selection.best_value}})


def recover_dir(path: Path) -> bool:
    """Repairs ``path`` (``final/``, ``best/``) after a crash mid-replacement: a complete ``path.tmp`` takes its
    place, else ``path.old`` comes back; an incomplete ``.tmp`` is removed. True when ``path`` is intact now."""
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if not path.exists():
        for candidate in (tmp, old):
            if candidate.is_dir() and manifest_problem(candidate) is None:
                candidate.rename(path)
                warnings.warn(f"restored {path} from {candidate.name}, left by an interrupted save", stacklevel=2)
                break
    for leftover in (tmp, old):
        if leftover.exists():
            _remove(leftover)
    return path.is_dir() and manifest_problem(path) is None


# ---------------------------------------------------------------------------------------------------------------
# resuming


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def state_problem(state: dict, path: Path, cfg) -> str | None:
    """Why ``state.json`` of checkpoint ``path`` cannot be believed (None when it can): its step must be the
    directory's, its data position a plausible count of prompts drawn with the run's seed, its best-evaluation
    state well-formed."""
    where = path / STATE
    step, data, selection = state.get("step"), state.get("data"), state.get("selection")
    if not _int(step) or step != checkpoint_step(path):
        return f"{where}: step {step!r} is not the checkpoint's step {checkpoint_step(path)}"
    if not isinstance(data, dict) or not _int(data.get("position")) or not _int(data.get("num_prompts")):
        return f"{where}: data must hold integer position and num_prompts, got {data!r}"
    if not step <= data["position"] or data["num_prompts"] < 1:  # every step draws at least one prompt
        return f"{where}: data position {data['position']} is impossible after {step} steps"
    if data.get("seed") != cfg.seed:
        return f"{where}: data seed {data.get('seed')!r} is not the run's seed {cfg.seed}"
    if selection is not None:
        if not isinstance(selection, dict):
            return f"{where}: selection must be an object, got {selection!r}"
        best_step, since, value = (selection.get(k) for k in ("best_step", "evals_since_best", "best_value"))
        if not (best_step is None or (_int(best_step) and 0 <= best_step <= step)) or not (_int(since) and since >= 0) \
                or not (value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))):
            return f"{where}: selection {selection!r} is malformed"
    return None


def checkpoint_problem(path: Path, cfg) -> tuple[str | None, dict | None]:
    """(why ``path`` is unusable or None, its state.json)."""
    problem = manifest_problem(path)
    if problem is not None:
        return problem, None
    try:
        state = read_json(path / STATE)
        read_json(path / CONFIG)
    except (FileFormatError, OSError) as exc:
        return str(exc), None
    return state_problem(state, path, cfg), state


def choose_checkpoint(output_dir: Path, cfg) -> tuple[Path, dict]:
    """The newest intact checkpoint and its state; each newer damaged one is reported in a warning naming the
    problem. CheckpointError naming every problem when none is usable, FileNotFoundError when there is none."""
    problems = []
    for path in reversed(checkpoint_dirs(output_dir)):
        problem, state = checkpoint_problem(path, cfg)
        if problem is None:
            if state["step"] > cfg.steps:  # not damage: the run went further than this config asks
                raise CheckpointError(f"--resume: {path.name} is at step {state['step']}, past steps={cfg.steps} "
                                      "(raise --steps to continue the run)")
            for skipped in problems:
                warnings.warn(f"--resume skips a damaged checkpoint: {skipped}", stacklevel=2)
            if problems:
                print(f"--resume: continuing from {path.name}, the newest intact checkpoint", flush=True)
            return path, state
        problems.append(problem)
    if not problems:
        hint = " (start it again with --overwrite)" if run_entries(output_dir) else ""
        raise FileNotFoundError(f"--resume: no checkpoint in {output_dir}{hint}")
    raise CheckpointError("--resume: no intact checkpoint: " + "; ".join(problems))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FileFormatError(f"{path}: not a safetensors file ({exc})") from None


def _load_data(path: Path):
    """A torch.save file read with ``weights_only=True``: tensors and plain containers, never code."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileFormatError(f"{path}: not a checkpoint's data file ({first[:200]})") from None


def load_checkpoint(path: Path, policy, optimizer, scheduler, stream, dd) -> None:
    """Restores weights, optimizer, schedule, data position and this rank's RNGs from the intact ``path``. A
    sharded (``parallel=fsdp``) checkpoint loads with any number of ranks; a rank the checkpoint has no RNG state
    for starts its sampling RNG from the seed (warned: the run goes on, but not bit for bit)."""
    if (path / GROUPS).is_file():
        _load_sharded(path, policy, optimizer, scheduler, dd)
    elif dd.sharded:
        raise CheckpointError(f"{path} was written without parallel=fsdp (whole tensors, not shards): resume it "
                              "with parallel=ddp, or start the fsdp run again")
    else:
        _load_whole(path, policy, optimizer, scheduler)
    state = read_json(path / STATE)
    stream.load_state_dict(state["data"])
    rng = path / rng_file(dd.rank)
    if rng.is_file():
        set_rng_state(read_json(rng), rng)
    else:
        warnings.warn(f"{path} holds no RNG state for rank {dd.rank} (it was written by fewer ranks): this rank's "
                      "sampling starts again from the seed", stacklevel=2)


def _load_whole(path: Path, policy, optimizer, scheduler) -> None:
    weights = _load_tensors(path / TRAINABLE)
    params = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        extra, missing = sorted(set(weights) - set(params)), sorted(set(params) - set(weights))
        raise FileFormatError(f"{path / TRAINABLE}: does not hold this model's trainable parameters "
                              f"(unexpected {extra[:3]}, missing {missing[:3]})")
    for name, value in weights.items():
        if value.shape != params[name].shape:
            raise FileFormatError(f"{path / TRAINABLE}: {name} has shape {tuple(value.shape)}, the model's is "
                                  f"{tuple(params[name].shape)}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optim = _load_data(path / OPTIM)
    try:
        optimizer.load_state_dict(optim["optimizer"])
        scheduler.load_state_dict(optim["scheduler"])
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise FileFormatError(f"{path / OPTIM}: not this run's optimizer state ({exc})") from None


def saved_config(path: Path) -> dict:
    return read_json(path / CONFIG)
