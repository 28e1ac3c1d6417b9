"""Turning a model into class probabilities for whole images: single, sliding-window and multi-scale.

Everything here works on *raw pixel values*: float ``(N, 3, H, W)`` tensors in
0-255, as decoded. Normalisation is part of the model call (:class:`Normalized`),
so resizing and tiling do not depend on the statistics, and an exported model
that embeds them is called the same way.

A *forward* is any callable ``pixels (N, 3, h, w) -> logits (N, K, h, w)``: a
:class:`Normalized` PyTorch model or a file of ``tools.export`` (:func:`open_exported`:
ONNX by :class:`OnnxForward`, ``torch.export`` programs by :class:`ExportedForward`,
TorchScript by :class:`TorchScriptForward`).

- ``single``: the whole image at once.
- ``sliding``: tiles of ``tile`` pixels overlapping by ``overlap`` cover the
  image; their softmax probabilities are averaged where they overlap. A side
  shorter than the tile is predicted whole in that direction, never resized,
  so an image no larger than one tile is exactly whole-image inference. The
  sums are kept on the CPU a row of tiles at a time (:func:`sliding_predict`),
  so huge images need no ``K x H x W`` accumulator.
- ``multiscale``: the image is resized by each of ``scales``, predicted (whole,
  or by tiles when ``tile`` is set) and its probabilities resized back and
  averaged. ``flip`` adds each prediction of the mirrored image, mirrored back.
  A model with ``forward_scales(x, scales)`` (MS-OCR) combines the scales with
  its learned attention instead of the average (when no tiles are asked for).

The mode alone decides the scales: a model with ``forward_scales`` is run at
one scale in ``single`` and ``sliding`` mode, and at each of the mode's scales
in ``multiscale`` mode, whatever scales it evaluates at by itself (MS-OCR's
``scales`` argument, which validation during training uses).

:class:`Report` scores predictions against labels (one confusion matrix, the data
set's benchmark, the worst images) for ``inference.py --labels`` and ``tools.evaluate``.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from utils.config import INFERENCE_KEYS, _check_keys
from utils.errors import ConfigError, DataError
from utils.files import write_json
from utils.images import normalize_batch
from utils.metrics import ConfusionMatrix, confusion_matrix_json, segmentation_metrics
from utils.registry import DATASETS
from utils.visualize import colorize, save_confusion_plot, save_rgb_png

Forward = Callable[[torch.Tensor], torch.Tensor]
#: What an exported file takes: normalised floats, uint8 pixels, or floats in 0-1.
InputKind = Literal["normalized", "uint8", "float"]
#: The ONNX metadata key that holds the classes and input kind of an exported file.
META_KEY = "segmentation"



@dataclass(frozen=True)
class InferenceSettings:
    """How to predict; see the module docstring. Build with :func:`inference_settings`."""
    mode: str = "single"
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    tile: tuple[int, int] | None = None
    overlap: float = 1 / 3
    batch_size: int = 1
    amp: str | None = None

    @property
    def used_scales(self) -> tuple[float, ...]:
        return self.scales if self.mode == "multiscale" else (1.0,)

    @property
    def used_tile(self) -> tuple[int, int] | None:
        return None if self.mode == "single" else self.tile


def inference_settings(section: dict | None, path: str = "inference") -> InferenceSettings:
    """Validate an ``inference`` config section (or CLI values in its form) into settings.

    Raises:
        ConfigError: naming ``path.key`` for an unknown key, a wrong type or a value out of range.
    """
    values = _check_keys(section or {}, INFERENCE_KEYS, path)
    scales, tile, overlap = values["scales"], values["tile"], values["overlap"]
    if not scales or any(s <= 0 for s in scales):
        raise ConfigError(f"{path}.scales: expected a non-empty list of positive scales, got {scales}")
    if tile is not None and (len(tile) != 2 or min(tile) < 1):
        raise ConfigError(f"{path}.tile: expected [height, width] of at least 1 pixel, got {tile}")
    if not 0 <= overlap < 1:
        raise ConfigError(f"{path}.overlap: expected 0 <= overlap < 1, got {overlap}")
    if values["batch_size"] < 1:
        raise ConfigError(f"{path}.batch_size: must be >= 1, got {values['batch_size']}")
    if values["mode"] == "sliding" and tile is None:
        raise ConfigError(f"{path}.tile: sliding mode needs the tile size [height, width] (--tile H W)")
    return InferenceSettings(mode=values["mode"], scales=tuple(float(s) for s in scales), flip=values["flip"],
                             tile=None if tile is None else (tile[0], tile[1]), overlap=float(overlap),
                             batch_size=values["batch_size"], amp=values["amp"])


class Normalized(nn.Module):
    """A segmentation model fed raw pixel values: ``model(normalize(x))["out"]``.

    Normalisation is :func:`base.base_dataset.normalize_batch`, the training
    pipeline's own, so the numbers are the same as in validation.

    Args:
        model: a model returning ``{"out": logits}``.
        mean, std: RGB statistics in the 0-1 range.
        pixel_range: the value of a white pixel in the input (255 for 0-255 pixels, 1 for 0-1).

    Shape:
        ``(N, 3, H, W)`` float (or ``uint8``) -> ``(N, K, H, W)`` logits.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 pixel_range: float = 255.0) -> None:
        super().__init__()
        self.model = model
        self.mean, self.std = tuple(mean), tuple(std)
        self.pixel_range = float(pixel_range)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.pixel_range != 255.0:
            x = x * (255.0 / self.pixel_range)  # a new tensor
        elif x.dtype == torch.float32:
            # normalize_batch scales in place after its float conversion, which float32 input skips.
            x = x.clone()
        return normalize_batch(x.permute(0, 2, 3, 1), self.mean, self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(x))["out"]


def tile_starts(size: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``size`` with at least ``overlap`` shared.

    Tiles are spread evenly, the first at 0 and the last ending at ``size``; a
    side no longer than the tile is one tile (of the side's length).
    """
    if size <= tile:
        return [0]
    stride = max(1, math.floor(tile * (1 - overlap)))
    count = math.ceil((size - tile) / stride) + 1
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def softmax_probs(forward: Forward, x: torch.Tensor) -> torch.Tensor:
    """Class probabilities (float32) of a batch predicted whole."""
    return torch.softmax(forward(x).float(), dim=1)


def sliding_probs(forward: Forward, x: torch.Tensor, tile: tuple[int, int], overlap: float,
                  batch_size: int) -> torch.Tensor:
    """Probabilities of overlapping tiles, averaged where they overlap.

    The sums are kept on the CPU a row of tiles at a time (:func:`sliding_predict`); only the
    result is whole-image sized.

    Args:
        forward: pixels -> logits.
        x: pixels ``(N, 3, H, W)``.
        tile: ``(height, width)``; clipped to the image (never padded or resized).
        overlap: fraction of a tile shared with its neighbour.
        batch_size: tiles per forward pass.

    Returns:
        ``(N, K, H, W)`` float32 probabilities, on ``x``'s device.
    """
    _, _, probs = sliding_predict(forward, x, tile, overlap, batch_size, want_probs=True, want_confidence=False)
    return probs.to(x.device)


def label_dtype(num_classes: int) -> torch.dtype:
    """The smallest integer type of class indices ``0 .. num_classes - 1``: uint8 up to 256 classes, else int16."""
    if num_classes <= 256:
        return torch.uint8
    return torch.int16 if num_classes <= 2 ** 15 else torch.int64


def _coverage(size: int, starts: Sequence[int], length: int) -> torch.Tensor:
    """How many of the spans ``[start, start + length)`` cover each of ``size`` positions (float32)."""
    cover = torch.zeros(size)
    for start in starts:
        cover[start:start + length] += 1
    return cover


def sliding_predict(forward: Forward, x: torch.Tensor, tile: tuple[int, int], overlap: float, batch_size: int,
                    want_probs: bool = False, *, want_confidence: bool = True, flip: bool = False,
                    device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Sliding-window prediction reduced as it goes: class indices (and confidence) without ever
    holding the ``(N, K, H, W)`` probabilities, unless they are asked for.

    The tiles are those of :func:`sliding_probs` and their probabilities are summed in the same
    order and divided by the same counts, so the probabilities (and their argmax) are the same
    numbers. With ``flip`` the mirrored image is predicted the same way and the two averaged,
    as :func:`predict_probs` does.

    Memory: the device sees ``batch_size`` tiles at a time. The CPU holds the sums of one row of
    tiles, ``(N, K, tile height, W)`` in ``dtype`` (twice with ``flip``): before each row of tiles,
    the rows that no later tile reaches are reduced to their outputs and the rows shared with the
    new row are carried over. Add the outputs: labels (1 byte a pixel), confidence (4 bytes,
    when asked) and probabilities (``4 K`` bytes, when asked).

    Args:
        forward: pixels -> logits.
        x: pixels ``(N, 3, H, W)``, float or uint8 (tiles are made float32 on their way to the
            device); a uint8 CPU view of the decoded image is never copied whole.
        tile: ``(height, width)``; clipped to the image (never padded or resized).
        overlap: fraction of a tile shared with its neighbour.
        batch_size: tiles per forward pass.
        want_probs: also return the averaged probabilities.
        want_confidence: return the largest probability of each pixel.
        flip: average with the prediction of the mirrored image, mirrored back.
        device: where tiles are predicted; default ``x``'s device.
        dtype: the sums' type: float32 (exactly :func:`sliding_probs`), or float16/bfloat16 to
            halve their memory (at that precision).

    Returns:
        ``(labels, confidence, probs)`` on the CPU: labels ``(N, H, W)`` of :func:`label_dtype`,
        confidence ``(N, H, W)`` float32 or None, probs ``(N, K, H, W)`` float32 or None.
    """
    n, _, height, width = x.shape
    th, tw = min(tile[0], height), min(tile[1], width)
    tops, lefts = tile_starts(height, th, overlap), tile_starts(width, tw, overlap)
    device = x.device if device is None else torch.device(device)
    # One pass per prediction averaged: (column starts in the image, in the order they are summed; mirrored).
    # The mirrored image's tile at column l is the image's tile at width - l - tw, mirrored.
    passes = [(lefts, False)] + ([([width - left - tw for left in lefts], True)] if flip else [])
    # Tiles are every top with every left, so a pixel's count is (tiles over its row) x (over its column).
    row_cover = _coverage(height, tops, th)
    col_covers = [_coverage(width, starts, tw) for starts, _ in passes]
    crops = [(p, i, left) for i in range(n) for p, (starts, _) in enumerate(passes) for left in starts]
    sums = labels = confidence = probs = None
    top = 0  # the image row of sums[..., 0, :]

    def finish(first: int, stop: int) -> None:
        """Reduce image rows ``[first, stop)``, which no later tile reaches, to the outputs."""
        rows = slice(first - top, stop - top)
        mean = None
        for p, cover in enumerate(col_covers):
            part = sums[p, :, :, rows].float() / (row_cover[first:stop, None] * cover)
            mean = part if mean is None else (mean + part) / 2
        best, index = mean.max(dim=1)
        labels[:, first:stop] = index
        if confidence is not None:
            confidence[:, first:stop] = best
        if probs is not None:
            probs[:, :, first:stop] = mean

    for row_top in tops:
        if sums is not None:
            finish(top, row_top)
            shift, keep = row_top - top, th - (row_top - top)
            if keep > 0:  # the rows shared with the previous row of tiles
                sums[..., :keep, :] = sums[..., shift:, :].clone()
            sums[..., max(keep, 0):, :] = 0
            top = row_top
        for start in range(0, len(crops), batch_size):
            chunk = crops[start:start + batch_size]
            pixels = torch.stack([_tile(x, i, row_top, left, th, tw, passes[p][1]) for p, i, left in chunk])
            pixels = pixels.to(device)
            out = softmax_probs(forward, pixels if pixels.is_floating_point() else pixels.float()).cpu()
            if sums is None:
                classes = out.shape[1]
                sums = torch.zeros(len(passes), n, classes, th, width, dtype=dtype)
                labels = torch.empty(n, height, width, dtype=label_dtype(classes))
                confidence = torch.empty(n, height, width) if want_confidence else None
                probs = torch.empty(n, classes, height, width) if want_probs else None
            for prob, (p, i, left) in zip(out, chunk):
                sums[p, i, :, :, left:left + tw] += prob.flip(-1) if passes[p][1] else prob
    finish(top, height)
    return labels, confidence, probs


def _tile(x: torch.Tensor, index: int, top: int, left: int, height: int, width: int, mirrored: bool
          ) -> torch.Tensor:
    crop = x[index, :, top:top + height, left:left + width]
    return crop.flip(-1) if mirrored else crop


def predict_probs(forward: Forward, x: torch.Tensor, settings: InferenceSettings) -> torch.Tensor:
    """Class probabilities of a batch of same-size images under ``settings``.

    Args:
        forward: pixels -> logits (see the module docstring).
        x: pixels ``(N, 3, H, W)`` in 0-255.

    Returns:
        ``(N, K, H, W)`` float32 probabilities at the input size.
    """
    size = tuple(x.shape[-2:])
    scales, tile = settings.used_scales, settings.used_tile

    def predict(pixels: torch.Tensor) -> torch.Tensor:
        if tile is None:
            return softmax_probs(forward, pixels)
        return sliding_probs(forward, pixels, tile, settings.overlap, settings.batch_size)

    model = getattr(forward, "model", None)
    if hasattr(model, "forward_scales"):  # MS-OCR
        normalized = forward
        if len(scales) > 1 and tile is None:
            # Its learned attention combines the scales instead of the average.
            return _with_flip(lambda p: torch.softmax(
                model.forward_scales(normalized.normalize(p), scales)["out"].float(), dim=1), x, settings.flip)

        # Every prediction below is of one image (or tile) at one scale: the scales of the model's
        # own evaluation (arch.args.scales, for validation) are never nested inside the mode's.
        forward = _one_scale(normalized)
    total = None
    for scale in scales:
        pixels = x if scale == 1.0 else F.interpolate(
            x, size=(max(1, round(size[0] * scale)), max(1, round(size[1] * scale))), mode="bilinear",
            align_corners=False)
        probs = _with_flip(predict, pixels, settings.flip)
        if scale != 1.0:
            probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
        total = probs if total is None else total + probs
    return total / len(scales)


def _one_scale(forward: Forward) -> Forward:
    """``forward``, except that a model with ``forward_scales`` (MS-OCR) predicts at its one scale."""
    model = getattr(forward, "model", None)
    if not hasattr(model, "forward_scales"):
        return forward
    return lambda pixels: model.forward_scales(forward.normalize(pixels), (1.0,))["out"]


def _with_flip(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, flip: bool) -> torch.Tensor:
    """``predict(x)``, averaged with the mirrored prediction of the mirrored image when ``flip``."""
    probs = predict(x)
    if not flip:
        return probs
    return (probs + predict(x.flip(-1)).flip(-1)) / 2


def remove_small_clusters(pred: np.ndarray, min_size: int) -> np.ndarray:
    """Give connected regions (4-connected) smaller than ``min_size`` pixels the class of their surroundings.

    The surroundings are the pixels touching the region; the most frequent class
    among them wins (the smaller class index on a tie). A region touching no
    other class (the whole image) keeps its class. Regions are judged on the
    original map, so the result does not depend on the order they are visited.

    Args:
        pred: class indices ``(H, W)``.
        min_size: regions of fewer pixels are relabelled; 0 or 1 changes nothing.

    Returns:
        A new ``(H, W)`` map of the same dtype.
    """
    out = pred.copy()
    if min_size <= 1:
        return out
    cross = ndimage.generate_binary_structure(2, 1)
    for cls in np.unique(pred):
        regions, _ = ndimage.label(pred == cls, structure=cross)
        sizes = np.bincount(regions.ravel())
        for index, box in enumerate(ndimage.find_objects(regions), start=1):
            if box is None or sizes[index] >= min_size:
                continue
            # Grow the box by one pixel so the ring around the region fits in it.
            rows = slice(max(box[0].start - 1, 0), box[0].stop + 1)
            cols = slice(max(box[1].start - 1, 0), box[1].stop + 1)
            region = regions[rows, cols] == index
            ring = ndimage.binary_dilation(region, structure=cross) & ~region
            neighbours = pred[rows, cols][ring]
            if neighbours.size:
                out[rows, cols][region] = np.bincount(neighbours.astype(np.int64)).argmax()
    return out


@dataclass
class Prediction:
    """One image's prediction (:meth:`Predictor.predictions`)."""
    #: Class indices ``(H, W)``, uint8 (int16 above 256 classes).
    labels: np.ndarray
    #: The largest class probability of each pixel ``(H, W)``, float32; None unless asked for.
    confidence: torch.Tensor | None = None
    #: Class probabilities ``(K, H, W)``, float32; None unless asked for.
    probs: torch.Tensor | None = None


class Predictor:
    """A forward with the classes and normalisation it was trained with, predicting under ``settings``.

    Args:
        forward: pixels -> logits (a :class:`Normalized` model or an ONNX session).
        meta: the checkpoint's ``meta`` (classes, palette, mean/std, ignore index).
        device: where the pixels go.
        settings: mode, scales, flip, tiles, batch size, autocast.
    """

    def __init__(self, forward: Forward, meta: dict, device: torch.device,
                 settings: InferenceSettings = InferenceSettings()) -> None:
        if isinstance(forward, nn.Module):
            forward = forward.to(device).eval()
        elif settings.amp is not None:
            raise ConfigError(f"--amp {settings.amp}: autocast applies to PyTorch models, not to an exported file")
        self.forward = forward
        self.meta = meta
        self.device = device
        self.settings = settings

    @torch.no_grad()
    def probabilities(self, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """Probabilities of RGB ``uint8`` images ``(H, W, 3)`` of any sizes.

        Images of the same size are predicted as one batch.

        Returns:
            One float32 ``(K, H, W)`` CPU tensor per image, in order.
        """
        if self._bounded:
            return [p.probs for p in self.predictions(images, probs=True)]
        out: list[torch.Tensor | None] = [None] * len(images)
        for indices, batch in self._groups(images):
            pixels = batch.to(self.device).permute(0, 3, 1, 2).float().contiguous()
            with self._autocast():
                probs = predict_probs(self.forward, pixels, self.settings).cpu()
            for i, p in zip(indices, probs):
                out[i] = p
        return out

    @torch.no_grad()
    def predictions(self, images: Sequence[np.ndarray], confidence: bool = False, probs: bool = False
                    ) -> list[Prediction]:
        """Class indices of RGB ``uint8`` images ``(H, W, 3)`` of any sizes, with their confidence and
        probabilities on request.

        In sliding mode the probabilities of a whole image are never held unless ``probs``
        is asked for (:func:`sliding_predict`: the device sees tiles, the CPU one row of
        tiles); the other modes predict whole images and reduce their probabilities.
        """
        out: list[Prediction | None] = [None] * len(images)
        for indices, batch in self._groups(images):
            if self._bounded:
                settings = self.settings
                with self._autocast():
                    labels, best, all_probs = sliding_predict(
                        _one_scale(self.forward), batch.permute(0, 3, 1, 2), settings.tile, settings.overlap,
                        settings.batch_size, want_probs=probs, want_confidence=confidence, flip=settings.flip,
                        device=self.device)
            else:
                pixels = batch.to(self.device).permute(0, 3, 1, 2).float().contiguous()
                with self._autocast():
                    all_probs = predict_probs(self.forward, pixels, self.settings).cpu()
                best, labels = all_probs.max(dim=1)
                labels = labels.to(label_dtype(all_probs.shape[1]))
                best, all_probs = (best if confidence else None), (all_probs if probs else None)
            for k, i in enumerate(indices):
                out[i] = Prediction(labels[k].numpy(), None if best is None else best[k],
                                    None if all_probs is None else all_probs[k])
        return out

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class-index map ``(H, W)`` (uint8; int16 above 256 classes) of one RGB ``uint8`` image ``(H, W, 3)``."""
        return self.predictions([image])[0].labels

    @property
    def _bounded(self) -> bool:
        """Whether images are predicted a row of tiles at a time (sliding mode)."""
        return self.settings.mode == "sliding" and self.settings.tile is not None

    @staticmethod
    def _groups(images: Sequence[np.ndarray]):
        """``(indices, (N, H, W, 3) uint8 CPU tensor)`` of the images of each size; one image is not copied."""
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.shape, []).append(index)
        for indices in by_size.values():
            if len(indices) == 1:
                batch = torch.from_numpy(np.ascontiguousarray(images[indices[0]]))[None]
            else:
                batch = torch.from_numpy(np.stack([images[i] for i in indices]))
            yield indices, batch

    def _autocast(self):
        if self.settings.amp is None:
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.settings.amp == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)


class OnnxForward:
    """An exported ONNX file run by onnxruntime as a forward: pixels 0-255 ``(N, 3, H, W)`` -> logits.

    The file's metadata gives the classes (``meta``) and what input it takes.
    """

    def __init__(self, path: str | Path) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise ConfigError(f"-m {path}: running an ONNX file needs onnxruntime (pip install onnxruntime)") \
                from None
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors for unreadable files
            raise DataError(f"{path}: not a readable ONNX file ({str(exc).splitlines()[0][:200]})") from None
        props = self.session.get_modelmeta().custom_metadata_map
        if META_KEY not in props:
            raise DataError(f"{path}: this ONNX file was not written by tools.export (no '{META_KEY}' metadata)")
        self.meta = json.loads(props[META_KEY])
        self.input_kind: InputKind = self.meta["input"]
        self.input_name = self.session.get_inputs()[0].name
        self.path = path
        # A file exported without --dynamic has a fixed height and width.
        height, width = self.session.get_inputs()[0].shape[2:]
        self.size = (height, width) if isinstance(height, int) and isinstance(width, int) else None

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        _check_size(self.path, self.size, pixels)
        x = exported_input(pixels, self.meta)
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])


def exported_input(pixels: torch.Tensor, meta: dict) -> torch.Tensor:
    """Pixels 0-255 ``(N, 3, H, W)`` as an exported file takes them (its meta's ``input``)."""
    kind: InputKind = meta["input"]
    if kind == "uint8":
        return pixels.round().clamp_(0, 255).to(torch.uint8)
    if kind == "float":
        return pixels / 255.0
    return Normalized(nn.Identity(), meta["mean"], meta["std"]).normalize(pixels)


def _check_size(path: str | Path, size: tuple[int, int] | None, pixels: torch.Tensor) -> None:
    """A file exported without ``--dynamic`` takes its export size only: say so, and what to do."""
    if size is not None and tuple(pixels.shape[-2:]) != tuple(size):
        raise ConfigError(f"-m {path}: the file takes {size[0]}x{size[1]} images only (exported "
                          f"without --dynamic), got {pixels.shape[-2]}x{pixels.shape[-1]}; export with "
                          f"--dynamic, or use --mode sliding --tile {size[0]} {size[1]} on larger images")


#: What ``-m`` of ``inference.py`` and ``tools.evaluate`` takes, for messages.
MODEL_FORMATS = ("a checkpoint of train.py (.pth) or a file of tools.export: ONNX (.onnx), "
                 "ExportedProgram (.pt2) or TorchScript (.pt)")
#: The extra file of a ``.pt2`` or TorchScript export that holds its meta (classes, input kind...).
META_FILE = "meta.json"

ExportedFormat = Literal["onnx", "pt2", "torchscript"]


def exported_format(path: str | Path) -> ExportedFormat | None:
    """The format of a file written by ``tools.export``; None for anything else (a checkpoint, say).

    ONNX is told by its suffix; ``torch.export`` and TorchScript archives by their
    content (a zip holding ``archive_format``, or ``code/``), whatever their suffix.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        return "onnx"
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return None
    if any(name.endswith("/archive_format") for name in names):
        return "pt2"
    if any("/code/" in name for name in names) and any(name.endswith("/constants.pkl") for name in names):
        return "torchscript"
    return None


def open_exported(path: str | Path, file_format: ExportedFormat | None = None) -> "Forward":
    """The forward of an exported file (see :func:`exported_format`); it has the file's ``meta``.

    Every exported file runs on the CPU (onnxruntime's CPU provider; ``.pt2`` and
    TorchScript as exported).
    """
    file_format = file_format or exported_format(path)
    if file_format == "onnx":
        return OnnxForward(path)
    if file_format == "pt2":
        return ExportedForward(path)
    if file_format == "torchscript":
        return TorchScriptForward(path)
    raise DataError(f"{path}: not {MODEL_FORMATS}")


def _export_size(meta: dict) -> tuple[int, int] | None:
    """The only size a file exported without ``--dynamic`` takes (None: free, or not recorded)."""
    size = meta.get("size")
    return None if meta.get("dynamic", True) or size is None else (int(size[0]), int(size[1]))


class ExportedForward:
    """A ``torch.export`` program saved as ``.pt2`` (``tools.export --format pt2``), run as a forward.

    Its extra file ``meta.json`` gives the classes (``meta``) and what input it takes.
    """

    def __init__(self, path: str | Path) -> None:
        files = {META_FILE: ""}
        try:
            program = torch.export.load(str(path), extra_files=files)
        except Exception as exc:  # torch.export raises its own error types for unreadable archives
            raise DataError(f"{path}: not a readable .pt2 file ({_first_line(exc)})") from None
        if not files[META_FILE]:
            raise DataError(f"{path}: this .pt2 file was not written by tools.export (no {META_FILE})")
        self.meta = json.loads(files[META_FILE])
        self.module = program.module()
        self.path = path
        self.size = _export_size(self.meta)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        _check_size(self.path, self.size, pixels)
        try:
            return self.module(exported_input(pixels, self.meta))
        except (AssertionError, RuntimeError) as exc:  # a shape outside the range the program was exported for
            raise ConfigError(f"-m {self.path}: the file does not take {pixels.shape[-2]}x{pixels.shape[-1]} "
                              f"images ({_first_line(exc)})") from None


class TorchScriptForward:
    """A TorchScript file (``tools.export --format torchscript``) run as a forward.

    TorchScript is deprecated in PyTorch (``torch.jit.save``/``load``), and
    loading one warns so: ``--format pt2`` is its successor.
    """

    def __init__(self, path: str | Path) -> None:
        files = {META_FILE: ""}
        warnings.warn(f"{path}: TorchScript is deprecated in PyTorch; export with --format pt2 "
                      "(torch.export) instead", FutureWarning, stacklevel=2)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch's own notice, said above
                self.module = torch.jit.load(str(path), map_location="cpu", _extra_files=files).eval()
        except Exception as exc:  # the TorchScript loader raises its own error types
            raise DataError(f"{path}: not a readable TorchScript file ({_first_line(exc)})") from None
        if not files[META_FILE]:
            raise DataError(f"{path}: this TorchScript file was not written by tools.export (no {META_FILE})")
        self.meta = json.loads(files[META_FILE])
        self.path = path
        self.size = _export_size(self.meta)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        _check_size(self.path, self.size, pixels)
        return self.module(exported_input(pixels, self.meta))


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


# --- the command line -----------------------------------------------------------------------------
def add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    """The mode flags of ``inference.py`` and ``tools.evaluate`` (an ``argparse`` parser); they override
    the config's ``inference`` section (:func:`mode_flags` turns them into its form)."""
    mode = parser.add_argument_group("mode (override the config's inference section)")
    mode.add_argument("--mode", choices=("single", "sliding", "multiscale"))
    mode.add_argument("--tile", type=int, nargs=2, metavar=("H", "W"), help="sliding-window tile size")
    mode.add_argument("--overlap", type=float, help="fraction of a tile shared with its neighbour (default 1/3)")
    mode.add_argument("--scales", type=_scales, help="multiscale scales, e.g. 0.5,0.75,1.0,1.25")
    mode.add_argument("--flip", action="store_true", default=None, help="add mirrored predictions")
    mode.add_argument("--batch-size", type=int, help="images (tiles in sliding mode) per forward pass")
    mode.add_argument("--amp", choices=("bf16", "fp16"), help="autocast the model")


def _scales(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0.5,1.0,1.5, got {text!r}") \
            from None


def mode_flags(args: argparse.Namespace | None) -> dict:
    """The mode flags given on the command line (:func:`add_mode_arguments`), as ``inference`` section keys."""
    if args is None:
        return {}
    flags = {"mode": args.mode, "tile": args.tile, "overlap": args.overlap, "scales": args.scales,
             "flip": args.flip, "batch_size": args.batch_size, "amp": args.amp}
    return {key: value for key, value in flags.items() if value is not None}

# --- scoring --------------------------------------------------------------------------------------
class Report:
    """Predictions scored against their labels: one confusion matrix over all images, the data set's
    own benchmark (Cityscapes' iIoU, when instance maps are given) and the worst images.

    ``inference.py --labels`` and ``tools.evaluate`` write it the same way (:meth:`finish`).

    Args:
        meta: the model's meta (classes, palette, ignore index, data set).
        worst: how many images of lowest mIoU to keep for ``worst/``.
        metrics: the config's ``metrics`` section (``classes`` or ``exclude``: which classes the
            means cover), as validation during training uses it; None: every class.
    """

    def __init__(self, meta: dict, worst: int = 5, metrics: dict | None = None) -> None:
        self.meta = meta
        self.selection = {"metric_classes": (metrics or {}).get("classes"), "exclude": (metrics or {}).get("exclude")}
        self.confusion = ConfusionMatrix(meta["num_classes"], meta["ignore_index"])
        self.benchmark = DATASETS.get(meta["dataset"]).benchmark_evaluator(meta["ignore_index"])
        self.worst = worst
        self.num_images = 0
        self.text = ""
        # A bounded heap of (-mIoU, name, order, (image, label, prediction)): the `worst` lowest scores.
        self._scores: list[tuple[float, str, int, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []

    def add(self, name: str, image: np.ndarray, label: np.ndarray, pred: np.ndarray,
            instances: np.ndarray | None = None, label_name: str | None = None) -> None:
        """Score one image: its RGB pixels, class-index label and prediction ``(H, W)``.

        ``instances``: its instance map, for the data set's benchmark; ``label_name``
        names the label in a size mismatch (default: ``name``).
        """
        if label.shape != pred.shape:
            raise DataError(f"{label_name or name}: label is {label.shape[1]}x{label.shape[0]} but image {name} "
                            f"is {pred.shape[1]}x{pred.shape[0]} (width x height)")
        one = ConfusionMatrix(self.meta["num_classes"], self.meta["ignore_index"])
        one.update(torch.from_numpy(np.ascontiguousarray(pred)), torch.from_numpy(np.ascontiguousarray(label)))
        self.confusion.matrix += one.matrix
        self.num_images += 1
        if self.benchmark is not None:
            self.benchmark.update(pred, label, instances)
        if not one.matrix.sum() or not self.worst:  # nothing labelled: no score to rank
            return
        score = segmentation_metrics(one.matrix, self.meta["class_names"], **self.selection)["mIoU"]
        item = (-score, name, self.num_images, (image, label, pred))
        if len(self._scores) < self.worst:
            heapq.heappush(self._scores, item)
        else:
            heapq.heappushpop(self._scores, item)

    def finish(self, out_dir: Path) -> dict:
        """Write ``results.json``, ``results.txt``, ``confusion_matrix.png`` and ``worst/`` into ``out_dir``;
        returns the results (the text is :attr:`text`)."""
        out_dir = Path(out_dir)
        names = self.meta["class_names"]
        worst = sorted(self._scores, reverse=True)
        results = {"num_images": self.num_images,
                   **segmentation_metrics(self.confusion.matrix, names, **self.selection),
                   "confusion_matrix": confusion_matrix_json(self.confusion.matrix, names),
                   "worst_images": [{"image": name, "mIoU": -score} for score, name, _, _ in worst]}
        if self.benchmark is not None:
            scores = self.benchmark.result()
            results[self.benchmark.name] = {"iIoU": _finite(scores["iIoU"]),
                                            "class_iiou": {k: _finite(v) for k, v in scores["class_iiou"].items()}}
        write_json(results, out_dir / "results.json")
        self.text = format_results(results, names, [self.benchmark.name] if self.benchmark is not None else [])
        (out_dir / "results.txt").write_text(self.text)
        save_confusion_plot(self.confusion.matrix.numpy(), names, out_dir / "confusion_matrix.png")
        if worst:
            (out_dir / "worst").mkdir(exist_ok=True)
        palette, ignore = self.meta["palette"], self.meta["ignore_index"]
        for rank, (_, name, _, (image, label, pred)) in enumerate(worst, start=1):
            row = np.concatenate([image, colorize(label, palette, ignore), colorize(pred, palette, ignore)], 1)
            save_rgb_png(row, out_dir / "worst" / f"{rank:02d}_{Path(name).stem}.png")
        return results


def format_results(results: dict, class_names: Sequence[str], benchmarks: Sequence[str] = ()) -> str:
    """A plain-text table of the metrics, the data set's benchmark scores (under the keys
    ``benchmarks``) and the worst images."""
    lines = [f"images         {results['num_images']}",
             f"pixel accuracy {results['pixel_acc']:.4f}",
             f"mean accuracy  {results['mean_acc']:.4f}",
             f"mIoU           {results['mIoU']:.4f}",
             f"fwIoU          {results['fwIoU']:.4f}",
             "", f"{'class':<20}{'IoU':>8}{'accuracy':>10}"]
    for name, iou, acc in zip(class_names, results["class_iou"], results["class_acc"]):
        lines.append(f"{name:<20}{_cell(iou):>8}{_cell(acc):>10}")
    lines.append("(- : no IoU when a class is in neither labels nor predictions, no accuracy when it is not "
                 "in the labels; such classes are left out of the means)")
    for benchmark in benchmarks:
        iiou, scores = results[benchmark]["iIoU"], results[benchmark]
        lines += ["", f"iIoU           {_cell(iiou)}  ({benchmark} benchmark, instance classes"
                      f"{'' if iiou is not None else '; needs the instance maps beside the labels'})"]
        lines += [f"{name:<20}{_cell(v):>8}" for name, v in scores["class_iiou"].items()]
    if results["worst_images"]:
        lines += ["", "worst images (mIoU of the image alone; see worst/: image | ground truth | prediction)"]
        lines += [f"{item['mIoU']:.4f}  {item['image']}" for item in results["worst_images"]]
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _finite(value: float) -> float | None:
    """JSON has no NaN: a score that does not exist is null."""
    return None if math.isnan(value) else value
