"""Learning-rate schedules, stepped once per optimizer step ("iteration").

``optimizer``, ``num_epochs`` and ``iters_per_epoch`` are injected by the
framework (with ``trainer.accumulate_steps`` k, an epoch has ``ceil(batches / k)``
iterations). Each schedule is a pure function of the iteration count, and its
saved state is only that count: resuming with a different number of epochs
follows the new length.

Every schedule but OneCycle (whose rise is its warm-up) takes an optional
linear warm-up: over ``warmup_epochs`` the multiplier climbs from
``warmup_ratio`` to 1, then the schedule's own shape follows.
"""
from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

from utils.registry import SCHEDULERS


class _IterationSchedule(LRScheduler):
    """Base of schedules whose lr is ``base_lr * factor(iteration)``, with an optional linear warm-up.

    Subclasses implement :meth:`decay`, the multiplier after the warm-up.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_epochs: int, iters_per_epoch: int,
                 warmup_epochs: float = 0.0, warmup_ratio: float = 0.1) -> None:
        if num_epochs * iters_per_epoch < 1:
            raise ValueError(f"the schedule needs at least one iteration, got {num_epochs * iters_per_epoch}")
        if warmup_epochs < 0 or not 0 <= warmup_ratio <= 1:
            raise ValueError("need warmup_epochs >= 0 and 0 <= warmup_ratio <= 1")
        self.iters_per_epoch = iters_per_epoch
        self.total_iters = num_epochs * iters_per_epoch
        self.warmup_iters = int(round(warmup_epochs * iters_per_epoch))
        self.warmup_ratio = warmup_ratio
        super().__init__(optimizer)

    def factor(self, iteration: int) -> float:
        """Multiplier of the base lr at ``iteration`` (0-based)."""
        if iteration < self.warmup_iters:
            return self.warmup_ratio + (1.0 - self.warmup_ratio) * iteration / self.warmup_iters
        return self.decay(iteration)

    def decay(self, iteration: int) -> float:
        raise NotImplementedError

    def progress(self, iteration: int) -> float:
        """Fraction of the iterations after the warm-up that are done, in [0, 1]."""
        span = max(self.total_iters - self.warmup_iters, 1)
        return min((iteration - self.warmup_iters) / span, 1.0)

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
    """Polynomial decay ``(1 - t)^power``, ``t`` the fraction of the post-warm-up iterations done.

    Args:
        power: decay exponent (0.9 in DeepLab and PSPNet).
        warmup_epochs: warm-up length in epochs (converted to iterations); 0 disables it.
        warmup_ratio: lr multiplier at the first warm-up iteration.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_epochs: int, iters_per_epoch: int,
                 power: float = 0.9, warmup_epochs: float = 0.0, warmup_ratio: float = 0.1) -> None:
        if power <= 0:
            raise ValueError(f"power must be > 0, got {power}")
        self.power = power
        super().__init__(optimizer, num_epochs, iters_per_epoch, warmup_epochs, warmup_ratio)

    def decay(self, iteration: int) -> float:
        return (1.0 - self.progress(iteration)) ** self.power


@SCHEDULERS.register
class Cosine(_IterationSchedule):
    """Cosine decay from the base lr to ``min_ratio`` times it over the post-warm-up iterations.

    Args:
        min_ratio: the last lr is ``lr * min_ratio``.
        warmup_epochs: warm-up length in epochs (converted to iterations); 0 disables it.
        warmup_ratio: lr multiplier at the first warm-up iteration.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_epochs: int, iters_per_epoch: int,
                 min_ratio: float = 0.0, warmup_epochs: float = 0.0, warmup_ratio: float = 0.1) -> None:
        if not 0 <= min_ratio <= 1:
            raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
        self.min_ratio = min_ratio
        super().__init__(optimizer, num_epochs, iters_per_epoch, warmup_epochs, warmup_ratio)

    def decay(self, iteration: int) -> float:
        return self.min_ratio + (1.0 - self.min_ratio) * (1 + math.cos(math.pi * self.progress(iteration))) / 2


@SCHEDULERS.register
class Step(_IterationSchedule):
    """The lr times ``gamma`` every ``step_epochs`` epochs (ENet on CamVid: x0.1 every 100 epochs).

    The steps count from the start of training, warm-up included.

    Args:
        step_epochs: epochs between two drops (converted to iterations).
        gamma: the multiplier of each drop.
        warmup_epochs: warm-up length in epochs (converted to iterations); 0 disables it.
        warmup_ratio: lr multiplier at the first warm-up iteration.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_epochs: int, iters_per_epoch: int,
                 step_epochs: float = 100.0, gamma: float = 0.1, warmup_epochs: float = 0.0,
                 warmup_ratio: float = 0.1) -> None:
        if step_epochs <= 0 or not 0 < gamma <= 1:
            raise ValueError(f"need step_epochs > 0 and 0 < gamma <= 1, got {step_epochs} and {gamma}")
        self.step_iters = max(int(round(step_epochs * iters_per_epoch)), 1)
        self.gamma = gamma
        super().__init__(optimizer, num_epochs, iters_per_epoch, warmup_epochs, warmup_ratio)

    def decay(self, iteration: int) -> float:
        return self.gamma ** (iteration // self.step_iters)


@SCHEDULERS.register
class Constant(_IterationSchedule):
    """The base lr throughout (after the optional warm-up).

    Args:
        warmup_epochs: warm-up length in epochs (converted to iterations); 0 disables it.
        warmup_ratio: lr multiplier at the first warm-up iteration.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, num_epochs: int, iters_per_epoch: int,
                 warmup_epochs: float = 0.0, warmup_ratio: float = 0.1) -> None:
        super().__init__(optimizer, num_epochs, iters_per_epoch, warmup_epochs, warmup_ratio)

    def decay(self, iteration: int) -> float:
        return 1.0


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
        super().__init__(optimizer, num_epochs, iters_per_epoch)

    def decay(self, iteration: int) -> float:
        start, peak = 1.0 / self.div_factor, 1.0
        end = start / self.final_div_factor
        rise = max(int(self.pct_start * self.total_iters), 1)
        if iteration < rise:
            low, high, t = start, peak, iteration / rise
        else:
            low, high, t = peak, end, min((iteration - rise) / max(self.total_iters - rise, 1), 1.0)
        return high + (low - high) * (1 + math.cos(math.pi * t)) / 2
