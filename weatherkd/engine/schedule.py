"""Learning-rate schedules with linear warm-up, as LambdaLR multipliers."""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LambdaLR

from weatherkd.config import TrainConfig


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.decay_factor ** ((step - cfg.warmup_steps) // cfg.decay_every)
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer, cfg: TrainConfig) -> LambdaLR:
    # Closes over cfg, so raising train.max_steps on resume stretches the schedule from there.
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
