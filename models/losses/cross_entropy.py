"""Cross-entropy and class-weighted cross-entropy (see ``models.losses.class_weights``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from base.base_dataset import BaseDataSet
from models.losses.class_weights import WeightMethod, cached_class_weights
from models.losses.common import full_precision, safe_divide
from utils.registry import LOSSES


@LOSSES.register
class CrossEntropyLoss(nn.Module):
    """Cross-entropy averaged over the pixels whose target is not ``ignore_index``.

    A batch without any valid pixel gives 0 (PyTorch's mean would give NaN),
    so a crop that lands entirely on void does not abort training.

    Args:
        ignore_index: target value of void pixels.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
    """

    def __init__(self, *, ignore_index: int = 255, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.register_buffer("weight", None)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Shape: logits ``(N, C, H, W)``, target ``(N, H, W)``; returns a scalar."""
        total = F.cross_entropy(full_precision(logits), target, weight=self.weight,
                                ignore_index=self.ignore_index, label_smoothing=self.label_smoothing,
                                reduction="sum")
        valid = target != self.ignore_index
        if self.weight is None:
            denominator = valid.sum()
        else:
            # PyTorch's weighted mean divides by the summed weights of the valid
            # targets; where() keeps void indices in range without touching target.
            denominator = (self.weight[torch.where(valid, target, 0)] * valid).sum()
        return safe_divide(total, denominator)


@LOSSES.register
class WeightedCrossEntropyLoss(CrossEntropyLoss):
    """Cross-entropy with per-class weights, listed or computed from the training labels.

    Args:
        weights: one weight per class, or ``"median_frequency"`` (Eigen & Fergus,
            2015) or ``"enet"`` (Paszke et al., 2016) to compute them from
            ``train_dataset``; computed weights are cached in ``cache_dir``.
        ignore_index: target value of void pixels.
        num_classes: number of classes; listed weights must have this length.
        train_dataset: the training split, read only when weights are computed.
        cache_dir: directory of the weight cache; ``None`` computes without caching.
        label_smoothing: as in :func:`torch.nn.functional.cross_entropy`.
    """

    def __init__(self, *, weights: list[float] | WeightMethod = "median_frequency",
                 ignore_index: int = 255, num_classes: int,
                 train_dataset: BaseDataSet | None = None, cache_dir: str | None = None,
                 label_smoothing: float = 0.0) -> None:
        super().__init__(ignore_index=ignore_index, label_smoothing=label_smoothing)
        #: How the weights were obtained, for the run's log: the method's name or "listed".
        self.weights_source = weights if isinstance(weights, str) else "listed"
        if isinstance(weights, str):
            if weights not in ("median_frequency", "enet"):
                raise ValueError(f"weights must be a list or one of 'median_frequency', 'enet', "
                                 f"got {weights!r}")
            if train_dataset is None:
                raise ValueError(f"weights={weights!r} needs the training dataset")
            weights = cached_class_weights(train_dataset, weights, ignore_index, num_classes, cache_dir)
        if len(weights) != num_classes:
            raise ValueError(f"got {len(weights)} class weights for {num_classes} classes")
        if any(w < 0 for w in weights):
            raise ValueError(f"class weights must not be negative, got {list(weights)}")
        self.register_buffer("weight", torch.tensor(weights, dtype=torch.float32))
