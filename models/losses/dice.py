"""Soft Dice loss (Milletari et al., "V-Net", 3DV 2016), and its sum with cross-entropy."""
from __future__ import annotations

import torch
from torch import nn

from models.losses.common import full_precision, one_hot_valid
from models.losses.cross_entropy import CrossEntropyLoss
from utils.registry import LOSSES


@LOSSES.register
class SoftDiceLoss(nn.Module):
    """``1 - mean over classes of (2 |P.G| + smooth) / (|P| + |G| + smooth)``.

    ``P`` is the softmax probability of a class and ``G`` its one-hot target;
    the sums run over every valid pixel of the batch, void pixels are left out
    of both. Each class counts the same however few pixels it has, which helps
    small classes. A class absent from the targets and (almost) from the
    predictions scores about 1 thanks to ``smooth``; predicting it anyway is
    penalised. Where a class has nothing at all (``|P| + |G| + smooth = 0``,
    only possible with ``smooth = 0`` on an all-void batch) it scores 1.

    Args:
        smooth: added to numerator and denominator, >= 0.
        ignore_index: target value of void pixels.
    """

    def __init__(self, *, smooth: float = 1.0, ignore_index: int = 255) -> None:
        super().__init__()
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.smooth = smooth
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Shape: logits ``(N, C, H, W)``, target ``(N, H, W)``; returns a scalar."""
        logits = full_precision(logits)
        valid, one_hot = one_hot_valid(target, logits.shape[1], self.ignore_index, logits.dtype)
        probs = logits.softmax(dim=1) * valid.unsqueeze(1)
        dims = (0, 2, 3)
        intersection = (probs * one_hot).sum(dims)
        denominator = probs.sum(dims) + one_hot.sum(dims) + self.smooth
        dice = torch.where(denominator > 0, (2 * intersection + self.smooth) / denominator.clamp_min(1e-12),
                           torch.ones_like(denominator))
        return 1 - dice.mean()


@LOSSES.register
class DiceCrossEntropyLoss(nn.Module):
    """``ce_weight * cross-entropy + dice_weight * soft Dice`` (the pairing nnU-Net popularised).

    Cross-entropy gives smooth per-pixel gradients from the first step; Dice
    adds a per-class overlap term that does not let large classes dominate.

    Args:
        ce_weight: weight of the cross-entropy term.
        dice_weight: weight of the Dice term.
        smooth: Dice smoothing term, >= 0.
        label_smoothing: of the cross-entropy term.
        ignore_index: target value of void pixels.
    """

    def __init__(self, *, ce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1.0,
                 label_smoothing: float = 0.0, ignore_index: int = 255) -> None:
        super().__init__()
        if ce_weight < 0 or dice_weight < 0:
            raise ValueError(f"weights must not be negative, got ce_weight={ce_weight}, dice_weight={dice_weight}")
        self.ce_weight = ce_weight
        self.dice_weight = dice_weight
        self.cross_entropy = CrossEntropyLoss(ignore_index=ignore_index, label_smoothing=label_smoothing)
        self.dice = SoftDiceLoss(smooth=smooth, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Shape: logits ``(N, C, H, W)``, target ``(N, H, W)``; returns a scalar."""
        return self.ce_weight * self.cross_entropy(logits, target) + self.dice_weight * self.dice(logits, target)
