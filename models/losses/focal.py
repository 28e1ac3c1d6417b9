"""Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017), softmax form."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.losses.common import full_precision, safe_divide
from utils.registry import LOSSES


@LOSSES.register
class FocalLoss(nn.Module):
    """``-alpha_t (1 - p_t)^gamma log p_t`` averaged over the valid pixels.

    ``p_t`` is the softmax probability of the target class. The factor
    ``(1 - p_t)^gamma`` down-weights pixels that are already classified well, so
    the many easy pixels of large classes stop dominating the loss; ``gamma = 0``
    and no ``alpha`` is plain cross-entropy. The mean divides by the number of
    valid pixels (not by the summed ``alpha``, unlike a weighted cross-entropy).

    Args:
        gamma: focusing exponent, >= 0 (the paper uses 2).
        alpha: one weight per class, or null for none.
        ignore_index: target value of void pixels.
        num_classes: number of classes; ``alpha`` must have this length.
    """

    def __init__(self, *, gamma: float = 2.0, alpha: list[float] | None = None, ignore_index: int = 255,
                 num_classes: int) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if alpha is not None:
            if len(alpha) != num_classes:
                raise ValueError(f"got {len(alpha)} alpha values for {num_classes} classes")
            if any(a < 0 for a in alpha):
                raise ValueError(f"alpha must not be negative, got {list(alpha)}")
        self.gamma = gamma
        self.ignore_index = ignore_index
        self.register_buffer("alpha", None if alpha is None else torch.tensor(alpha, dtype=torch.float32))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Shape: logits ``(N, C, H, W)``, target ``(N, H, W)``; returns a scalar."""
        # cross_entropy gives -log p_t, and 0 at void pixels (where p_t then reads 1).
        log_p = -F.cross_entropy(full_precision(logits), target, ignore_index=self.ignore_index,
                                 reduction="none")
        # -expm1 is 1 - p_t without cancellation; the floor keeps the derivative of
        # x^gamma finite at x = 0 for gamma < 1 (void pixels, certain pixels).
        modulation = (-torch.expm1(log_p)).clamp_min(torch.finfo(log_p.dtype).tiny) ** self.gamma
        loss = -modulation * log_p
        valid = target != self.ignore_index
        if self.alpha is not None:
            loss = loss * self.alpha.to(loss.dtype)[torch.where(valid, target, 0)]
        return safe_divide(loss.sum(), valid.sum())
