"""Learning-rate schedules, stepped once per training iteration.

``optimizer``, ``num_epochs`` and ``iters_per_epoch`` are injected by the
framework. Each schedule is a pure function of the iteration count, and its
saved state is only that count: resuming with a different number of epochs
follows the new length.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

from utils.registry import SCHEDULERS


def poly_factor(iteration: int, total: int, power: float = 0.9, warmup_iters: int = 0,
                warmup_ratio: float = 0.1) -> float:
    """Multiplier of the base lr at ``iteration`` (0-based) of ``total``.

    Linear warm-up from ``warmup_ratio`` to 1 over ``warmup_iters``, then
    ``(1 - t)^power`` where ``t`` is the fraction of the post-warm-up iterations done.
    """
    if iteration < warmup_iters:
        return warmup_ratio + (1.0 - warmup_ratio) * iteration / warmup_iters
    span = max(total - warmup_iters, 1)
    progress = min((iteration - warmup_iters) / span, 1.0)
    return (1.0 - progress) ** power


class _IterationSchedule(LRScheduler):
    """Base of schedules whose lr is ``base_lr * factor(iteration)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_iters: int) -> None:
        if total_iters < 1:
            raise ValueError(f"the schedule needs at least one iteration, got {total_iters}")
        self.total_iters = total_iters
        super().__init__(optimizer)

    def factor(self, iteration: int) -> float:
        raise NotImplementedError

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base_lr * f for base_lr in self.base_lrs]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        self.last_epoch = state_dict["last_epoch"]
        self._step_count = state_dict["_step_count"]
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr


@SCHEDULERS.register
class Poly(_IterationSchedule):
    """Polynomial decay ``(1 - t)^power`` with optional linear warm-up.

    Args:
        power: decay exponent (0.9 in DeepLab and PSPNet).
        warmup_epochs: warm-up length in epochs (converted to iterations).
        warmup_ratio: lr multiplier at the first warm-up iteration.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_epochs: int, iters_per_epoch: int,
                 power: float = 0.9, warmup_epochs: float = 0.0, warmup_ratio: float = 0.1) -> None:
        if power <= 0:
            raise ValueError(f"power must be > 0, got {power}")
        if warmup_epochs < 0 or not 0 <= warmup_ratio <= 1:
            raise ValueError("need warmup_epochs >= 0 and 0 <= warmup_ratio <= 1")
        self.power = power
        self.warmup_iters = int(round(warmup_epochs * iters_per_epoch))
        self.warmup_ratio = warmup_ratio
        super().__init__(optimizer, num_epochs * iters_per_epoch)

    def factor(self, iteration: int) -> float:
        return poly_factor(iteration, self.total_iters, self.power, self.warmup_iters, self.warmup_ratio)


@SCHEDULERS.register
class OneCycle(_IterationSchedule):
    """One-cycle policy (Smith & Topin, 2018) for the learning rate.

    Cosine rise from ``lr / div_factor`` to ``lr`` over the first ``pct_start`` of
    training, then cosine decay to ``lr / (div_factor * final_div_factor)``.
    Unlike ``torch.optim.lr_scheduler.OneCycleLR`` it leaves momentum alone and
    its state is only the iteration count, so it resumes with a changed length.

    Args:
        pct_start: fraction of the iterations spent rising to the peak lr.
        div_factor: the first lr is ``lr / div_factor``.
        final_div_factor: the last lr is ``lr / (div_factor * final_div_factor)``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_epochs: int, iters_per_epoch: int,
                 pct_start: float = 0.3, div_factor: float = 25.0, final_div_factor: float = 1e4) -> None:
        if not 0 < pct_start < 1:
            raise ValueError(f"pct_start must be in (0, 1), got {pct_start}")
        if div_factor <= 0 or final_div_factor <= 0:
            raise ValueError("div_factor and final_div_factor must be > 0")
        self.pct_start, self.div_factor, self.final_div_factor = pct_start, div_factor, final_div_factor
        super().__init__(optimizer, num_epochs * iters_per_epoch)

    def factor(self, iteration: int) -> float:
        start, peak = 1.0 / self.div_factor, 1.0
        end = start / self.final_div_factor
        rise = max(int(self.pct_start * self.total_iters), 1)
        if iteration < rise:
            low, high, t = start, peak, iteration / rise
        else:
            low, high, t = peak, end, min((iteration - rise) / max(self.total_iters - rise, 1), 1.0)
        return high + (low - high) * (1 + math.cos(math.pi * t)) / 2
