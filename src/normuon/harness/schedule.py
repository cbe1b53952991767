"""The learning-rate schedule of a harness run (warmup, then warmup-stable-decay, cosine,
linear or constant), as a multiplier of the peak lr for ``LambdaLR``."""

from __future__ import annotations

import math

from .config import SCHEDULES, TrainConfig

__all__ = ["LRSchedule"]


class LRSchedule:
    """Multiplier of the peak lr at a step, for ``torch.optim.lr_scheduler.LambdaLR``.

    A callable object rather than a closure, so that LambdaLR's state_dict holds only its
    (primitive) attributes and loads with ``torch.load(weights_only=True)``.
    """

    def __init__(self, cfg: TrainConfig) -> None:
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")
        self.kind = cfg.schedule
        self.steps = cfg.steps
        self.warmup = cfg.warmup_steps
        self.cooldown = int(round(cfg.cooldown_frac * cfg.steps))
        self.floor = cfg.min_lr_frac

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            decay_start = self.steps - self.cooldown
            if step < decay_start or self.cooldown == 0:
                return 1.0
            frac = (step - decay_start) / self.cooldown  # 0 -> 1 over the cooldown
        else:
            frac = (step - self.warmup) / max(1, self.steps - self.warmup)
        frac = min(max(frac, 0.0), 1.0)
        if self.kind == "cosine":
            return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * frac))
        return self.floor + (1.0 - self.floor) * (1.0 - frac)  # wsd cooldown and "linear"
