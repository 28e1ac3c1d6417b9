"""Cityscapes' pixel-level benchmark: per-class IoU and instance-level iIoU (nIoU), as the official script.

The official evaluation (``cityscapesscripts``' ``evalPixelLevelSemanticLabeling``)
scores the 19 classes on full-resolution label ids:

- IoU = TP / (TP + FP + FN), where false positives count only on pixels whose
  ground truth is an evaluated class (void ground truth never counts against a
  prediction);
- iIoU weights each ground-truth *instance*'s TP and FN by
  ``average instance size of its class / its size`` (so small objects count as
  much as large ones), with the same unweighted FP; it exists for the 8 classes
  with instances and needs the ``*_instanceIds.png`` maps (``labelId * 1000 + k``);
- a class whose denominator is 0 has no score, and the means skip it.

:class:`CityscapesEvaluator` accumulates these over images and equals the
script to floating-point rounding. It takes train ids (predictions and the
loaders' targets): the script's IoU on label ids is the same, as its void
rows never count.
The evaluator knows no data set: the data set that uses it (Cityscapes,
MiniCity) passes its class names, label table and instance sizes, see
``dataloader.cityscapes.Cityscapes.benchmark_evaluator``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from utils.distributed import all_reduce_sum, is_distributed

_INSTANCE_OFFSET = 1000  # instance ids are label id * 1000 + k; smaller values are plain label ids


def _numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)


class CityscapesEvaluator:
    """Accumulate the benchmark's IoU and iIoU over full-resolution predictions.

    Example:
        >>> evaluator = Cityscapes.benchmark_evaluator(ignore_index=255)
        >>> evaluator.update(pred_train_ids, target_train_ids, instance_ids)   # per image
        >>> evaluator.synchronize(device)   # under torchrun: sum every process's counts
        >>> evaluator.result()["iIoU"]

    Args:
        class_names: the evaluated classes, in train-id order.
        label_to_train_id: for each label id of the instance maps, its train id; void
            label ids map to ``len(class_names)``.
        average_instance_size: mean instance size in pixels of each instance class over
            the training set (the official script's constants); the other classes have no iIoU.
        ignore_index: the void value of the targets.
    """

    #: The key of these scores in results files.
    name = "cityscapes"

    def __init__(self, class_names: Sequence[str], label_to_train_id: np.ndarray,
                 average_instance_size: Mapping[str, float], ignore_index: int = 255) -> None:
        self.class_names = tuple(class_names)
        n = len(self.class_names)
        self.ignore_index = ignore_index
        self._lut = np.asarray(label_to_train_id, dtype=np.int64)
        self.confusion = np.zeros((n, n), dtype=np.int64)  # rows ground truth, columns prediction
        self._instance_classes = np.array([name in average_instance_size for name in self.class_names])
        self._average_size = np.array([average_instance_size.get(name, 0.0) for name in self.class_names])
        self.tp_weighted = np.zeros(n, dtype=np.float64)
        self.fn_weighted = np.zeros(n, dtype=np.float64)
        self.has_instances = False

    def update(self, pred: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
               instance_ids: np.ndarray | torch.Tensor | None = None) -> None:
        """Add one image at the label's full resolution.

        Args:
            pred: predicted train ids ``(H, W)`` (0-18).
            target: the ground truth in train ids with ``ignore_index`` for void ``(H, W)``, as
                the Cityscapes loaders give it (the official script's label ids, mapped).
            instance_ids: the ``*_instanceIds.png`` map ``(H, W)``; without it the image
                adds to IoU only.
        """
        pred, target = _numpy(pred).astype(np.int64), _numpy(target).astype(np.int64)
        if pred.shape != target.shape:
            raise ValueError(f"prediction is {pred.shape} but the label is {target.shape}: evaluate at the "
                             "label's full resolution")
        n = len(self.class_names)
        if pred.size and (pred.min() < 0 or pred.max() >= n):
            raise ValueError(f"predictions must be train ids 0-{n - 1}, got values up to {int(pred.max())}")
        valid = target != self.ignore_index
        if valid.any() and (target[valid].min() < 0 or target[valid].max() >= n):
            raise ValueError(f"targets must be train ids 0-{n - 1} or {self.ignore_index} (void)")
        self.confusion += np.bincount(target[valid] * n + pred[valid], minlength=n * n).reshape(n, n)
        if instance_ids is not None:
            self._add_instances(pred, _numpy(instance_ids).astype(np.int64))

    def _add_instances(self, pred: np.ndarray, instances: np.ndarray) -> None:
        self.has_instances = True
        selected = instances > _INSTANCE_OFFSET  # the script's test: "> 1000"
        ids, inverse = np.unique(instances[selected], return_inverse=True)
        train_ids = self._lut[ids // _INSTANCE_OFFSET]
        evaluated = train_ids < len(self.class_names)
        train_ids = np.where(evaluated, train_ids, 0)
        evaluated &= self._instance_classes[train_ids]
        sizes = np.bincount(inverse, minlength=ids.size).astype(np.float64)
        hits = np.bincount(inverse, weights=pred[selected] == train_ids[inverse], minlength=ids.size)
        weights = self._average_size[train_ids] / np.maximum(sizes, 1)
        np.add.at(self.tp_weighted, train_ids[evaluated], (hits * weights)[evaluated])
        np.add.at(self.fn_weighted, train_ids[evaluated], ((sizes - hits) * weights)[evaluated])

    def synchronize(self, device: torch.device) -> None:
        """Sum the counts of every process (a collective under torchrun; nothing with one process).

        Every count is a sum over images, so the shards' sums give the whole split's scores.
        """
        if not is_distributed():
            return
        n = len(self.class_names)
        counts = torch.from_numpy(np.concatenate([self.confusion.ravel().astype(np.float64), self.tp_weighted,
                                                  self.fn_weighted, [float(self.has_instances)]])).to(device)
        counts = all_reduce_sum(counts).cpu().numpy()
        self.confusion = counts[:n * n].reshape(n, n).round().astype(np.int64)
        self.tp_weighted, self.fn_weighted = counts[n * n:n * n + n], counts[n * n + n:n * n + 2 * n]
        self.has_instances = bool(counts[-1] > 0)

    def result(self) -> dict:
        """Scores so far.

        Returns:
            ``{"class_iou": {name: IoU}, "class_iiou": {name: iIoU}, "mIoU": ..., "iIoU": ...}``:
            IoU for the 19 classes, iIoU for the 8 instance classes (``nan`` where a class has
            no score, as in the script; the means skip those; iIoU is ``nan`` without instance maps).
        """
        tp = np.diag(self.confusion).astype(np.float64)
        fn = self.confusion.sum(axis=1) - tp
        fp = self.confusion.sum(axis=0) - tp
        denominator = tp + fp + fn
        iou = np.divide(tp, denominator, out=np.full_like(tp, math.nan), where=denominator > 0)
        inst_denominator = self.tp_weighted + fp + self.fn_weighted
        iiou = np.divide(self.tp_weighted, inst_denominator, out=np.full_like(tp, math.nan),
                         where=(inst_denominator > 0) & self._instance_classes & self.has_instances)
        names = self.class_names
        return {"class_iou": dict(zip(names, iou.tolist())),
                "class_iiou": {name: float(v) for name, v, has in zip(names, iiou, self._instance_classes) if has},
                "mIoU": _mean(iou), "iIoU": _mean(iiou[self._instance_classes])}


def _mean(scores: np.ndarray) -> float:
    valid = scores[~np.isnan(scores)]
    return float(valid.mean()) if valid.size else math.nan

