"""Turning a model into class probabilities for whole images: single, sliding-window and multi-scale.

Everything here works on *raw pixel values*: float ``(N, 3, H, W)`` tensors in
0-255, as decoded. Normalisation is part of the model call (:class:`Normalized`),
so resizing and tiling do not depend on the statistics, and an exported model
that embeds them is called the same way.

A *forward* is any callable ``pixels (N, 3, h, w) -> logits (N, K, h, w)``: a
:class:`Normalized` PyTorch model or an ONNX session (:class:`OnnxForward`).

- ``single``: the whole image at once.
- ``sliding``: tiles of ``tile`` pixels overlapping by ``overlap`` cover the
  image; their softmax probabilities are averaged where they overlap. A side
  shorter than the tile is predicted whole in that direction, never resized,
  so an image no larger than one tile is exactly whole-image inference.
- ``multiscale``: the image is resized by each of ``scales``, predicted (whole,
  or by tiles when ``tile`` is set) and its probabilities resized back and
  averaged. ``flip`` adds each prediction of the mirrored image, mirrored back.
  A model with ``forward_scales(x, scales)`` (MS-OCR) combines the scales with
  its learned attention instead of the average (when no tiles are asked for).

The mode alone decides the scales: a model with ``forward_scales`` is run at
one scale in ``single`` and ``sliding`` mode, and at each of the mode's scales
in ``multiscale`` mode, whatever scales it evaluates at by itself (MS-OCR's
``scales`` argument, which validation during training uses).
"""
from __future__ import annotations

import json
import math
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
from utils.images import normalize_batch

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

    Args:
        forward: pixels -> logits.
        x: pixels ``(N, 3, H, W)``.
        tile: ``(height, width)``; clipped to the image (never padded or resized).
        overlap: fraction of a tile shared with its neighbour.
        batch_size: tiles per forward pass.

    Returns:
        ``(N, K, H, W)`` float32 probabilities.
    """
    height, width = x.shape[-2:]
    th, tw = min(tile[0], height), min(tile[1], width)
    boxes = [(top, left) for top in tile_starts(height, th, overlap) for left in tile_starts(width, tw, overlap)]
    crops = [(i, top, left) for i in range(x.shape[0]) for top, left in boxes]
    total = count = None
    for start in range(0, len(crops), batch_size):
        chunk = crops[start:start + batch_size]
        probs = softmax_probs(forward, torch.stack([x[i, :, t:t + th, l:l + tw] for i, t, l in chunk]))
        if total is None:
            total = probs.new_zeros(x.shape[0], probs.shape[1], height, width)
            count = probs.new_zeros(1, 1, height, width)
        for p, (i, top, left) in zip(probs, chunk):
            total[i, :, top:top + th, left:left + tw] += p
    for top, left in boxes:
        count[..., top:top + th, left:left + tw] += 1
    return total / count


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
        def forward(pixels: torch.Tensor) -> torch.Tensor:
            return model.forward_scales(normalized.normalize(pixels), (1.0,))["out"]
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
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(image.shape, []).append(index)
        out: list[torch.Tensor | None] = [None] * len(images)
        for indices in by_size.values():
            batch = torch.from_numpy(np.stack([images[i] for i in indices])).to(self.device)
            pixels = batch.permute(0, 3, 1, 2).float().contiguous()
            with self._autocast():
                probs = predict_probs(self.forward, pixels, self.settings).cpu()
            for i, p in zip(indices, probs):
                out[i] = p
        return out

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class-index map ``(H, W)`` of one RGB ``uint8`` image ``(H, W, 3)``."""
        return self.probabilities([image])[0].argmax(dim=0).numpy()

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
        if self.size is not None and tuple(pixels.shape[-2:]) != self.size:
            raise ConfigError(f"-m {self.path}: the file takes {self.size[0]}x{self.size[1]} images only (exported "
                              f"without --dynamic), got {pixels.shape[-2]}x{pixels.shape[-1]}; export with "
                              f"--dynamic, or use --mode sliding --tile {self.size[0]} {self.size[1]} on larger images")
        if self.input_kind == "uint8":
            x = pixels.round().clamp_(0, 255).to(torch.uint8)
        elif self.input_kind == "float":
            x = pixels / 255.0
        else:
            x = Normalized(nn.Identity(), self.meta["mean"], self.meta["std"]).normalize(pixels)
        return torch.from_numpy(self.session.run(None, {self.input_name: x.numpy()})[0])
