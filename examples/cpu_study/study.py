"""The CPU study of SIRL, stage by stage (``bash examples/cpu_study/run.sh`` runs this).

    python examples/cpu_study/study.py [--run-dir runs/cpu_study] [--data ../shared/data] [--seeds 0 1 2]
                                       [--only STAGE ...] [--list] [--dry-run]

Each stage writes its artifacts into its own folder under ``--run-dir``, atomically (into ``NAME.partial``, then
renamed; a training run writes in place and resumes with ``sirl train --resume`` after an interruption), and records
``stages/NAME.json``: its key, the commands it ran and its wall time. A stage is skipped when its folder exists and
its key is unchanged. The key hashes the stage's settings, the source of the scripts it runs and the keys of the
stages it reads, so changing a setting or an upstream result reruns exactly what depends on it.

Stages, in order:

==================  ==================================================================================================
data                the study's prompt sets (``data.py``)
distill             the base model's greedy answers to the benign SFT prompts (``distill.py``)
sft                 the refusal SFT, merged into a plain HF model directory: the *aligned* model (``sft.py``)
eval-aligned        test evaluation of the aligned model (``evaluate.py``): targets and vulnerability
gap-aligned         ``sirl analyze entropy-gap`` on the aligned model (the premise)
eval-base           test evaluation of SmolLM2-135M-Instruct as shipped
train-COND-sSEED    ``sirl train`` from the aligned model: COND = sirl | reversed | random (``reward=neg_entropy``,
                    ``entropy``, ``random``)
eval-COND-sSEED     test evaluation of the run's validation-selected checkpoint (``OUTPUT_DIR/best``)
gap-COND-s0         the entropy gap after training (seed 0 of each condition)
report              ``docs/results/cpu-study.md`` with its figures (``report.py``)
==================  ==================================================================================================
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
PY = sys.executable
SIRL = str(Path(PY).parent / "sirl")
BASE = "smollm2-135m-instruct"
CONDITIONS = ("sirl", "reversed", "random")
REWARD = {"sirl": "neg_entropy", "reversed": "entropy", "random": "random"}  # sirl train's reward= key
RETRIES = 2  # a failed stage is retried after RETRY_WAIT_S (the shared checkout may be mid-edit when it starts)
RETRY_WAIT_S = 120

# Settings of the SIRL runs, the same for every condition and seed (why each: docs/results/cpu-study.md).
TRAIN = dict(
    dtype="bfloat16", lora="true", lora_r=16, lora_alpha=32, lora_target_modules="[q_proj,k_proj,v_proj,o_proj]",
    group_size=4, prompts_per_step=8, max_new_tokens=32, temperature=1.0, lr=5e-4, warmup_steps=1,
    lr_schedule="constant", kl_beta=0.001, micro_batch_tokens=2048, steps=10, eval_every=5, save_every=5,
    keep_checkpoints=1, eval_attacks="direct,refusal_suppression,prefix_injection,template", eval_limit=16,
    eval_shuffle="false", eval_max_new_tokens=32, eval_batch_size=16, keep_best="eval/safety",
    log_completions_every=1, progress="false",
)
EVAL = dict(dtype="bfloat16", max_new_tokens=32, capability_max_new_tokens=64, batch_size=16)
GAP = dict(dtype="bfloat16", samples_per_prompt=2, max_new_tokens=48, seed=0)
SFT = dict(epochs=2, lr=2e-4, batch_size=8, lora_r=16, seed=0)
DISTILL = dict(dtype="bfloat16", max_new_tokens=96, batch_size=16)


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_hash(*names: str) -> str:
    return sha("".join((HERE / n).read_text() for n in names))


@dataclass
class Stage:
    name: str
    out: Path
    commands: list[list[str]]
    settings: dict
    scripts: tuple[str, ...]
    needs: tuple[str, ...] = ()
    training: bool = False  # writes in place with --resume instead of NAME.partial + rename
    check: object = None  # callable(out) run after the commands; raises on a bad result
    extra_key: dict = field(default_factory=dict)


class Study:
    def __init__(self, run_dir: Path, data: Path, seeds: list[int], conditions=CONDITIONS, dry_run=False):
        self.run, self.data, self.seeds, self.conditions, self.dry_run = run_dir, data, seeds, conditions, dry_run
        self.records = run_dir / "stages"
        self.keys: dict[str, str] = {}
        self.stages = self.plan()

    # -- the plan -------------------------------------------------------------------------------------------------
    def plan(self) -> list[Stage]:
        r, d = self.run, self.run / "data"
        aligned = str(r / "aligned" / "model")
        stages = [
            Stage("data", d, [[PY, str(HERE / "data.py"), "--data", str(self.data), "--out", "{out}"]],
                  {"seed": 0}, ("data.py", "capitals.py", "refusals.txt", "benign_contrast.txt"),
                  extra_key={"sources": self.source_files_key()}),
            Stage("distill", r / "distill", [[PY, str(HERE / "distill.py"), "--prompts",
                                              str(d / "sft_benign_prompts.jsonl"), "--out", "{out}/answers.jsonl",
                                              *flags(DISTILL)]], DISTILL, ("distill.py",), ("data",)),
            Stage("sft", r / "aligned", [[PY, str(HERE / "sft.py"), "--harmful", str(d / "sft_harmful.jsonl"),
                                          "--benign", str(r / "distill" / "answers.jsonl"), "--out", "{out}",
                                          *flags(SFT)]], SFT, ("sft.py",), ("data", "distill")),
            self.eval_stage("eval-aligned", aligned, None, ("sft",)),
            self.gap_stage("gap-aligned", aligned, None, ("sft",)),
            self.eval_stage("eval-base", BASE, None, ()),
        ]
        for seed in self.seeds:  # seed by seed, so that an interrupted study has whole seeds
            for cond in self.conditions:
                run = r / "train" / f"{cond}-s{seed}"
                stages.append(self.train_stage(cond, seed, run, aligned))
                stages.append(self.eval_stage(f"eval-{cond}-s{seed}", aligned, str(run / "best"),
                                              (f"train-{cond}-s{seed}",)))
            if seed == self.seeds[0]:  # the entropy gap after training: the first seed of each condition
                for cond in self.conditions:
                    stages.append(self.gap_stage(f"gap-{cond}-s{seed}", aligned, str(r / "train" / f"{cond}-s{seed}"
                                                                                     / "best"),
                                                 (f"train-{cond}-s{seed}",)))
        report_needs = tuple(s.name for s in stages)
        stages.append(Stage("report", r / "report", [[PY, str(HERE / "report.py"), "--run-dir", str(r), "--out",
                                                      "{out}", "--docs", str(ROOT / "docs" / "results")]],
                            {"seeds": self.seeds, "conditions": list(self.conditions)}, ("report.py",), report_needs))
        return stages

    def source_files_key(self) -> str:
        names = ("advbench/harmful_behaviors.csv", "jbb/harmful-behaviors.csv", "pandaguard/jbb_expanded.csv",
                 "pandaguard/hm_expanded.csv", "xstest/xstest_prompts.csv", "alpaca/alpaca_no_input_instructions.json",
                 "mtbench/question.jsonl", "gptfuzz/GPTFuzzer.csv")
        return sha("".join(f"{n}:{(self.data / n).stat().st_size}" for n in names if (self.data / n).exists()))

    def eval_stage(self, name, model, adapter, needs) -> Stage:
        cmd = [PY, str(HERE / "evaluate.py"), "--model", model, "--data-dir", str(self.run / "data"), "--shared-data",
               str(self.data), "--out", "{out}", *flags(EVAL)] + (["--adapter", adapter] if adapter else [])
        return Stage(name, self.run / "eval" / name[len("eval-"):], [cmd], {**EVAL, "model": model, "adapter": adapter},
                     ("evaluate.py", "data.py", "capitals.py"), ("data", *needs))

    def gap_stage(self, name, model, adapter, needs) -> Stage:
        d = self.run / "data"
        cmd = [SIRL, "analyze", "entropy-gap", "--model", model, "--device", "cpu", "--harmful",
               str(d / "gap_harmful.jsonl"), "--benign", str(d / "gap_benign.jsonl"), "--output-dir", "{out}",
               "--no-progress", *flags(GAP)] + (["--adapter", adapter] if adapter else [])
        return Stage(name, self.run / "gap" / name[len("gap-"):], [cmd], {**GAP, "model": model, "adapter": adapter},
                     (), ("data", *needs))

    def train_stage(self, cond, seed, run, aligned) -> Stage:
        d = self.run / "data"
        keys = {**TRAIN, "model": aligned, "prompts": str(d / "sirl_train.jsonl"), "eval_harmful":
                str(d / "val_harmful.jsonl"), "eval_overrefusal": str(d / "xstest_val.csv"), "seed": seed,
                "reward": REWARD[cond]}
        cmd = [SIRL, "train", "--output-dir", str(run), *(f"{k}={v}" for k, v in keys.items())]
        return Stage(f"train-{cond}-s{seed}", run, [cmd], {**keys, "condition": cond}, (), ("data", "sft"),
                     training=True, check=lambda out, cond=cond: check_reward(out, cond))

    # -- running --------------------------------------------------------------------------------------------------
    def key(self, s: Stage) -> str:
        upstream = {n: self.keys[n] for n in s.needs}
        return sha(json.dumps({"name": s.name, "settings": s.settings, "scripts": source_hash(*s.scripts) if s.scripts
                               else "", "needs": upstream, **s.extra_key}, sort_keys=True, default=str))

    def record(self, s: Stage) -> dict | None:
        path = self.records / f"{s.name}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def run_stage(self, s: Stage, force: bool = False) -> str:
        key = self.key(s)
        self.keys[s.name] = key
        rec = self.record(s)
        if not force and rec and rec.get("key") == key and s.out.exists():
            return f"skip  {s.name} (done, {rec.get('elapsed_s')} s)"
        if self.dry_run:
            return f"would run {s.name}: " + " ; ".join(" ".join(c) for c in s.commands)
        for attempt in range(RETRIES + 1):
            try:
                return self.attempt(s, key)
            except StageFailed as exc:
                if attempt == RETRIES:
                    raise SystemExit(str(exc)) from None
                print(f"[{time.strftime('%H:%M:%S')}] {exc}; retrying in {RETRY_WAIT_S} s", flush=True)
                time.sleep(RETRY_WAIT_S)
        raise AssertionError("unreachable")

    def attempt(self, s: Stage, key: str) -> str:
        self.records.mkdir(parents=True, exist_ok=True)
        (self.records / f"{s.name}.json").unlink(missing_ok=True)
        start = time.time()
        if s.training:
            commands = self.training_commands(s, key)
            target = s.out
        else:
            target = s.out.with_name(s.out.name + ".partial")
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
            commands = [[a.replace("{out}", str(target)) for a in c] for c in s.commands]
        logs = self.run / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        cpu0 = children_cpu_s()
        for cmd in commands:
            with open(logs / f"{s.name}.log", "a") as log:
                log.write(f"\n$ {' '.join(cmd)}\n")
                log.flush()
                rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            if rc != 0:
                raise StageFailed(f"stage {s.name} failed (exit {rc}); see {logs / (s.name + '.log')}")
        if s.check is not None:
            s.check(target)
        if not s.training:
            shutil.rmtree(s.out, ignore_errors=True)
            target.rename(s.out)
        elapsed = round(time.time() - start, 1)
        rec = {"name": s.name, "key": key, "elapsed_s": elapsed, "cpu_s": round(children_cpu_s() - cpu0, 1),
               "commands": [" ".join(relative(a) for a in c) for c in commands],
               "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": s.settings}
        tmp = self.records / f"{s.name}.json.tmp"
        tmp.write_text(json.dumps(rec, indent=2, default=str) + "\n")
        tmp.rename(self.records / f"{s.name}.json")
        return f"done  {s.name} ({elapsed} s)"

    def training_commands(self, s: Stage, key: str) -> list[list[str]]:
        """A fresh run, or ``--resume`` of an interrupted run of the same key (its checkpoints are kept)."""
        marker = s.out.with_name(s.out.name + ".key")
        resumable = (marker.is_file() and marker.read_text().strip() == key and s.out.is_dir()
                     and any(p.name.startswith("checkpoint") for p in s.out.iterdir()))
        if not resumable:
            shutil.rmtree(s.out, ignore_errors=True)
            s.out.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(key + "\n")
            return s.commands
        return [c + ["--resume"] for c in s.commands]


class StageFailed(Exception):
    pass


def children_cpu_s() -> float:
    """User + system CPU seconds of every finished child process so far (a load-independent cost measure)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def relative(arg: str) -> str:
    """Paths inside the repository as the report shows them (relative to it), the interpreter as ``python``."""
    if arg == PY:
        return "python"
    if arg == SIRL:
        return "sirl"
    return arg.replace(str(ROOT) + "/", "")


def flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [f"--{k.replace('_', '-')}", str(v)]
    return out


def check_reward(out: Path, cond: str) -> None:
    """The logged reward must be the condition's: SIRL's is minus an entropy (< 0), the reversed one plus an entropy
    (> 0), the random one in [0, 1) and unrelated to the entropy."""
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rewards = [r["reward_mean"] for r in rows if "reward_mean" in r]
    if not rewards:
        raise StageFailed(f"{out}: no training rows in metrics.jsonl")
    ok = {"sirl": all(x < 0 for x in rewards), "reversed": all(x > 0 for x in rewards),
          "random": all(0 <= x < 1 for x in rewards)}[cond]
    if not ok:
        raise SystemExit(f"{out}: reward_mean {rewards} does not look like the {cond} reward")
    if not (out / "best").is_dir() or not (out / "final").is_dir():
        raise StageFailed(f"{out}: no best/ or final/ model")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/cpu_study")
    p.add_argument("--data", default=os.environ.get("DATA", str(ROOT.parent / "shared" / "data")))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                   help="training seeds (each adds a run of every condition, about 50 min on the 2-core machine)")
    p.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    p.add_argument("--only", nargs="+", help="run these stages (and skip the others; their keys must be recorded)")
    p.add_argument("--force", nargs="+", default=[], help="rerun these stages even when they are up to date")
    p.add_argument("--list", action="store_true", help="list the stages and whether each is done")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    study = Study(Path(args.run_dir), Path(args.data), args.seeds, tuple(args.conditions), args.dry_run)
    if args.list:
        for s in study.stages:
            key, rec = study.key(s), study.record(s)
            study.keys[s.name] = key
            state = "done" if rec and rec.get("key") == key and s.out.exists() else ("stale" if rec else "todo")
            print(f"{state:5} {s.name:22} {rec.get('elapsed_s', '') if rec else ''}")
        return 0
    start = time.time()
    for s in study.stages:
        if args.only and s.name not in args.only:
            study.keys[s.name] = study.key(s)
            continue
        result = study.run_stage(s, force=s.name in args.force)
        print(f"[{time.strftime('%H:%M:%S')}] {result}", flush=True)
    print(f"study: {round(time.time() - start)} s this invocation; stage records in {study.records}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
