"""Online hard example mining cross-entropy, as in the HRNet and OCR segmentation recipes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.losses.common import full_precision, safe_divide
from utils.registry import LOSSES


@LOSSES.register
class OhemCrossEntropyLoss(nn.Module):
    """Cross-entropy averaged over the hard pixels only.

    A valid pixel is kept when the softmax probability of its target class is
    below ``thresh``, and the ``min_kept`` valid pixels with the lowest such
    probability are always kept (ties at the cut are all kept), so a batch the
    model already gets right still trains on its hardest pixels. Counted per
    batch of one process, as in HRNet (Wang et al., 2020) and OCR (Yuan et al.,
    2020), whose Cityscapes configs set ``thresh`` 0.9 and ``min_kept`` 131072.

    Args:
        thresh: probability below which a pixel is hard, in (0, 1].
        min_kept: number of hardest valid pixels always kept, >= 0.
        ignore_index: target value of void pixels.
    """

    def __init__(self, *, thresh: float = 0.7, min_kept: int = 100000, ignore_index: int = 255) -> None:
        super().__init__()
        if not 0.0 < thresh <= 1.0:
            raise ValueError(f"thresh must be in (0, 1], got {thresh}")
        if min_kept < 0:
            raise ValueError(f"min_kept must be >= 0, got {min_kept}")
        self.thresh = thresh
        self.min_kept = min_kept
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Shape: logits ``(N, C, H, W)``, target ``(N, H, W)``; returns a scalar."""
        pixel_loss = F.cross_entropy(full_precision(logits), target, ignore_index=self.ignore_index,
                                     reduction="none").flatten()
        valid = (target != self.ignore_index).flatten()
        # exp(-CE) is the target's softmax probability; void pixels read +inf so
        # that they rank after every valid pixel.
        prob = torch.where(valid, torch.exp(-pixel_loss.detach()), torch.inf)
        keep = prob < self.thresh
        if self.min_kept > 0:
            # The k-th lowest probability, +inf when fewer than k pixels are valid
            # (then all are kept); a tensor, so no host sync.
            kth = prob.kthvalue(min(self.min_kept, prob.numel())).values
            keep = keep | (prob <= kth)
        keep = keep & valid
        return safe_divide((pixel_loss * keep).sum(), keep.sum())
