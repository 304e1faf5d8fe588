"""Learning-rate schedules: ``schedule(epoch)`` gives the learning rate for a 0-based epoch.

- constant: ``lr``
- step:     ``lr * gamma ** (epoch // step_size)``
- cosine:   ``min_lr + (lr - min_lr) * (1 + cos(pi * epoch / epochs)) / 2``, optionally after a
  linear warm-up
"""

from __future__ import annotations

import math
from typing import Any

SCHEDULES = ("constant", "step", "cosine")


class Constant:
    def __init__(self, lr: float) -> None:
        self.lr = float(lr)

    def __call__(self, epoch: int) -> float:
        return self.lr


class Step:
    def __init__(self, lr: float, step_size: int = 10, gamma: float = 0.1) -> None:
        if not isinstance(step_size, int) or step_size < 1:
            raise ValueError(f"step_size: expected a positive integer, got {step_size!r}")
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma: expected a number in (0, 1], got {gamma!r}")
        self.lr, self.step_size, self.gamma = float(lr), step_size, float(gamma)

    def __call__(self, epoch: int) -> float:
        return self.lr * self.gamma ** (epoch // self.step_size)


class Cosine:
    def __init__(self, lr: float, epochs: int, min_lr: float = 0.0, warmup: int = 0) -> None:
        if not isinstance(epochs, int) or epochs < 1:
            raise ValueError(f"epochs: expected a positive integer, got {epochs!r}")
        if not 0 <= min_lr <= lr:
            raise ValueError(f"min_lr: expected a number in [0, lr={lr}], got {min_lr!r}")
        if not isinstance(warmup, int) or not 0 <= warmup < epochs:
            raise ValueError(f"warmup: expected an integer in [0, {epochs}), got {warmup!r}")
        self.lr, self.epochs, self.min_lr, self.warmup = float(lr), epochs, float(min_lr), warmup

    def __call__(self, epoch: int) -> float:
        if epoch < self.warmup:
            return self.lr * (epoch + 1) / (self.warmup + 1)
        t = (epoch - self.warmup) / max(1, self.epochs - self.warmup)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))


def make_schedule(name: str, lr: float, epochs: int, **kwargs: Any) -> Constant | Step | Cosine:
    """Build a schedule by name: "constant", "step" (step_size, gamma) or "cosine" (min_lr,
    warmup)."""
    if name == "constant":
        return Constant(lr)
    if name == "step":
        return Step(lr, **kwargs)
    if name == "cosine":
        return Cosine(lr, epochs, **kwargs)
    raise ValueError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {name!r}")
