"""The optimizer and its schedule: AdamW over the trainable parameters, linear warm-up then cosine or constant."""

from __future__ import annotations

import math

import torch


def lr_lambda(cfg):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` (or constant)."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def build_optimizer(params, cfg) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


def apply_optimizer_settings(optimizer, scheduler, cfg) -> None:
    """Makes a restored optimizer and schedule follow ``cfg`` (a resume may change lr, betas, weight decay,
    warm-up or schedule under --allow-config-change; with the saved settings this changes nothing)."""
    scheduler.lr_lambdas = [lr_lambda(cfg)] * len(optimizer.param_groups)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=cfg.lr, lr=cfg.lr * fn(scheduler.last_epoch), weight_decay=cfg.weight_decay,
                     betas=(cfg.adam_beta1, cfg.adam_beta2))
