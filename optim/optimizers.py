"""Optimizers selectable from config (``optimizer.type``).

``params`` (the model's parameter groups, see ``BaseModel.param_groups``) is
injected by the framework; each group may carry its own ``lr``.
"""
from __future__ import annotations

import torch

from utils.registry import OPTIMIZERS


@OPTIMIZERS.register
def SGD(params: list, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
        nesterov: bool = False) -> torch.optim.Optimizer:
    """Stochastic gradient descent with momentum (``torch.optim.SGD``).

    Args:
        lr: base learning rate (the decoder's when ``differential_lr`` is on).
        momentum: momentum factor.
        weight_decay: L2 penalty.
        nesterov: use Nesterov momentum.
    """
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)


@OPTIMIZERS.register
def Adam(params: list, lr: float, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0,
         eps: float = 1e-8) -> torch.optim.Optimizer:
    """Adam (``torch.optim.Adam``); weight decay is an L2 penalty added to the gradient.

    Args:
        lr: base learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        weight_decay: L2 penalty.
        eps: term added to the denominator for numerical stability.
    """
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)


@OPTIMIZERS.register
def AdamW(params: list, lr: float, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 1e-2,
          eps: float = 1e-8) -> torch.optim.Optimizer:
    """AdamW (``torch.optim.AdamW``): Adam with decoupled weight decay.

    Args:
        lr: base learning rate.
        betas: coefficients of the running averages of the gradient and its square.
        weight_decay: decoupled weight decay factor.
        eps: term added to the denominator for numerical stability.
    """
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps)
