"""Class weights computed from the training labels, for the weighted losses.

Weights are counted on the raw training labels (no augmentation; the whole
training split, also when ``subset`` shortens the epochs) and cached as JSON in
``cache_dir``. A class that never occurs in the training labels gets weight 0
under either method: it cannot appear in a training target, and giving it
ENet's finite bound (1 / ln 1.02, about 50.5) would only inflate its
label-smoothing term. :func:`describe_class_weights` gives the lines a run logs
(one per weighted loss, and a warning per class of weight 0).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
from torch import nn

from base.base_dataset import BaseDataSet
from utils.files import write_json

WeightMethod = Literal["median_frequency", "enet"]


def class_pixel_counts(dataset: BaseDataSet) -> tuple[np.ndarray, np.ndarray]:
    """Count labelled pixels per class over a data set's raw labels (no augmentation).

    Returns:
        ``(counts, present_counts)``, int64 arrays of length C: ``counts[c]``
        is the number of pixels of class c; ``present_counts[c]`` the number
        of labelled (non-void) pixels of the images in which c occurs.
    """
    num_classes = dataset.num_classes()
    counts = np.zeros(num_classes, dtype=np.int64)
    present_counts = np.zeros(num_classes, dtype=np.int64)
    for i in range(len(dataset)):
        label = dataset.map_label(dataset.load_label(i), dataset.label_source(i))
        image_counts = np.bincount(label[label != dataset.ignore_index], minlength=num_classes)
        counts += image_counts
        present_counts += np.where(image_counts > 0, image_counts.sum(), 0)
    return counts, present_counts


def median_frequency_weights(counts: np.ndarray, present_counts: np.ndarray) -> list[float]:
    """Median frequency balancing: ``median(freq) / freq(c)``.

    ``freq(c) = counts[c] / present_counts[c]``; the median is taken over the
    classes that occur. Classes that never occur get weight 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    present_counts = np.asarray(present_counts, dtype=np.float64)
    occurs = counts > 0
    if not occurs.any():
        raise ValueError("cannot compute class weights: the labels contain no labelled pixel")
    freq = np.divide(counts, present_counts, out=np.zeros_like(counts), where=occurs)
    median = np.median(freq[occurs])
    return np.divide(median, freq, out=np.zeros_like(freq), where=occurs).tolist()


def enet_weights(counts: np.ndarray) -> list[float]:
    """ENet weighting: ``1 / ln(1.02 + p_c)``, ``p_c`` the share of labelled pixels.

    Classes that never occur get weight 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.sum() == 0:
        raise ValueError("cannot compute class weights: the labels contain no labelled pixel")
    weights = 1.0 / np.log(1.02 + counts / counts.sum())
    return np.where(counts > 0, weights, 0.0).tolist()


def cached_class_weights(dataset: BaseDataSet, method: WeightMethod, ignore_index: int,
                         num_classes: int, cache_dir: str | None) -> list[float]:
    """Class weights of ``dataset`` by ``method``, read from or written to ``cache_dir``.

    The cache file name hashes the data set class, ``ignore_index``,
    ``num_classes``, the method and every label source, so a different split
    or listing gets its own file. Label files edited in place under the same
    names are not detected: delete the cache file then.
    """
    path = None
    if cache_dir is not None:
        key = json.dumps([type(dataset).__name__, ignore_index, num_classes, method,
                          [dataset.label_source(i) for i in range(len(dataset))]])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        path = os.path.join(cache_dir, f"class_weights_{digest}.json")
        cached = _read_cache(path)
        if cached is not None:
            return cached

    counts, present_counts = class_pixel_counts(dataset)
    if method == "median_frequency":
        weights = median_frequency_weights(counts, present_counts)
    else:
        weights = enet_weights(counts)

    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        # Written atomically: processes started by torchrun never read half a file.
        write_json({"dataset": type(dataset).__name__, "method": method, "ignore_index": ignore_index,
                    "num_classes": num_classes, "counts": counts.tolist(),
                    "present_counts": present_counts.tolist(), "weights": weights}, path)
    return weights


def _read_cache(path: str) -> list[float] | None:
    # An unreadable cache is only a lost speed-up: recompute and overwrite it.
    try:
        with open(path, encoding="utf-8") as handle:
            return [float(w) for w in json.load(handle)["weights"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe_class_weights(loss: nn.Module | None, class_names: Sequence[str],
                           key: str = "loss") -> tuple[list[str], list[str]]:
    """What a run logs about the class weights of ``loss`` (the config's ``key``): ``(lines, warnings)``.

    One line per module that weights classes (``weights_source`` and a ``weight`` buffer, as
    ``WeightedCrossEntropyLoss``): ``Class weights of loss (median_frequency): road=0.36, car=1.2``;
    one warning per class of weight 0, which the model then never learns.
    """
    lines: list[str] = []
    warnings: list[str] = []
    for module in loss.modules() if loss is not None else ():
        source, weight = getattr(module, "weights_source", None), getattr(module, "weight", None)
        if source is None or weight is None:
            continue
        values = [float(w) for w in weight.detach().cpu()]
        pairs = ", ".join(f"{name}={value:.4g}" for name, value in zip(class_names, values))
        lines.append(f"Class weights of {key} ({source}): {pairs}")
        why = "it never occurs in the training labels" if source != "listed" else f"{key}.args.weights says so"
        warnings += [f"Class '{name}' has weight 0 in {key} ({why}): the model is not trained to predict it"
                     for name, value in zip(class_names, values) if value == 0]
    return lines, warnings
