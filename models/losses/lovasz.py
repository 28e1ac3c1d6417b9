"""Lovász-softmax loss (Berman et al., "The Lovász-Softmax loss", CVPR 2018)."""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from models.losses.common import full_precision, one_hot_valid, safe_divide
from utils.registry import LOSSES


def lovasz_jaccard_gradient(fg_sorted: torch.Tensor) -> torch.Tensor:
    """The Lovász extension's weights for errors sorted in decreasing order.

    Entry i is ``J(i) - J(i - 1)``, ``J(i)`` the Jaccard loss when the i pixels
    with the largest errors are the mistakes.

    Shape: ``fg_sorted`` ``(..., P)``, 1 where the pixel belongs to the class; same out.
    """
    gts = fg_sorted.sum(-1, keepdim=True)
    intersection = gts - fg_sorted.cumsum(-1)
    union = gts + (1 - fg_sorted).cumsum(-1)  # >= 1 everywhere: no division by zero
    jaccard = 1 - intersection / union
    return torch.cat([jaccard[..., :1], jaccard[..., 1:] - jaccard[..., :-1]], dim=-1)


@LOSSES.register
class LovaszSoftmaxLoss(nn.Module):
    """A convex surrogate of the per-class Jaccard (IoU) loss, on softmax probabilities.

    Optimises mean IoU directly rather than pixel accuracy; usually used to
    fine-tune a model trained with cross-entropy, or summed with it. A batch
    (or image) whose pixels are all void gives 0 and a zero gradient.

    Args:
        per_image: compute the loss of each image and average over the images
            that have valid pixels (the paper's choice for VOC); otherwise one
            loss over all pixels of the batch.
        classes: ``"present"`` averages over the classes present in the target
            (the paper's default), ``"all"`` over every class.
        ignore_index: target value of void pixels.
    """

    def __init__(self, *, per_image: bool = False, classes: Literal["present", "all"] = "present",
                 ignore_index: int = 255) -> None:
        super().__init__()
        if classes not in ("present", "all"):
            raise ValueError(f"classes must be 'present' or 'all', got {classes!r}")
        self.per_image = per_image
        self.classes = classes
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Shape: logits ``(N, C, H, W)``, target ``(N, H, W)``; returns a scalar."""
        logits = full_precision(logits)
        num_classes = logits.shape[1]
        valid, fg = one_hot_valid(target, num_classes, self.ignore_index, logits.dtype)
        probs = logits.softmax(dim=1)
        if self.per_image:  # groups of pixels: (groups, C, P)
            probs, fg, valid = probs.flatten(2), fg.flatten(2), valid.flatten(1).unsqueeze(1)
        else:
            probs = probs.transpose(0, 1).reshape(1, num_classes, -1)
            fg = fg.transpose(0, 1).reshape(1, num_classes, -1)
            valid = valid.reshape(1, 1, -1)
        valid = valid.expand_as(fg)
        # Void pixels get error -1, so they sort after every valid one (errors are
        # >= 0) and leave the weights of the valid pixels as without them.
        errors = torch.where(valid, (fg - probs).abs(), -1.0)
        errors_sorted, order = errors.sort(dim=-1, descending=True)
        fg_sorted = fg.gather(-1, order)
        weights = lovasz_jaccard_gradient(fg_sorted)
        per_class = (errors_sorted.clamp_min(0) * weights).sum(-1)  # (groups, C)

        if self.classes == "present":
            counted = fg.sum(-1) > 0
        else:
            counted = valid.any(-1)
        per_group = safe_divide((per_class * counted).sum(-1), counted.sum(-1))
        has_pixels = valid.any(-1).any(-1)
        return safe_divide((per_group * has_pixels).sum(), has_pixels.sum())
