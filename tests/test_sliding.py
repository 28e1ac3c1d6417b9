"""Sliding-window inference a row of tiles at a time (predictor.sliding_predict): the numbers of
whole-image accumulation, only tiles on the device, and memory bounded by a row of tiles."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.unet import UNet
from predictor import (InferenceSettings, Normalized, Predictor, label_dtype, sliding_predict, sliding_probs,
                       tile_starts)

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
TILE, OVERLAP = (48, 48), 1 / 3


def reference_sliding_probs(forward, x, tile, overlap, batch_size):
    """``sliding_probs`` before issue 17: every image's ``(K, H, W)`` sums held at once on ``x``'s device."""
    height, width = x.shape[-2:]
    th, tw = min(tile[0], height), min(tile[1], width)
    boxes = [(top, left) for top in tile_starts(height, th, overlap) for left in tile_starts(width, tw, overlap)]
    crops = [(i, top, left) for i in range(x.shape[0]) for top, left in boxes]
    total = count = None
    for start in range(0, len(crops), batch_size):
        chunk = crops[start:start + batch_size]
        probs = torch.softmax(forward(torch.stack([x[i, :, t:t + th, l:l + tw] for i, t, l in chunk])).float(), 1)
        if total is None:
            total = probs.new_zeros(x.shape[0], probs.shape[1], height, width)
            count = probs.new_zeros(1, 1, height, width)
        for p, (i, top, left) in zip(probs, chunk):
            total[i, :, top:top + th, left:left + tw] += p
    for top, left in boxes:
        count[..., top:top + th, left:left + tw] += 1
    return total / count


def reference(forward, x, batch_size, flip):
    probs = reference_sliding_probs(forward, x, TILE, OVERLAP, batch_size)
    if flip:  # predict_probs' flip
        probs = (probs + reference_sliding_probs(forward, x.flip(-1), TILE, OVERLAP, batch_size).flip(-1)) / 2
    return probs


@pytest.fixture(scope="module")
def unet() -> Normalized:
    """A seeded 6-class UNet: 3x3 convolutions, so tiles' borders differ from whole-image outputs."""
    torch.manual_seed(0)
    model = UNet(6, base_channels=4, depth=2)
    with torch.no_grad():
        model.head.weight.mul_(10)
    return Normalized(model, MEAN, STD).eval()


def pixels(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, height, width), dtype=np.uint8))


@torch.no_grad()
@pytest.mark.parametrize("batch_size, flip", [(1, False), (5, True)])
def test_the_numbers_of_whole_image_accumulation(unet, batch_size, flip):
    x = pixels(2, 100, 130)  # 3 rows of 4 tiles of 48x48
    want = reference(unet, x.float(), batch_size, flip)
    labels, confidence, probs = sliding_predict(unet, x, TILE, OVERLAP, batch_size, want_probs=True, flip=flip)
    assert labels.dtype == torch.uint8 and labels.shape == (2, 100, 130)
    assert torch.equal(labels.long(), want.argmax(dim=1))
    assert torch.allclose(probs, want, rtol=0, atol=1e-6)
    assert torch.allclose(confidence, want.max(dim=1).values, rtol=0, atol=1e-6)
    # Float pixels give the same; without probs or confidence only the labels come back.
    again = sliding_predict(unet, x.float(), TILE, OVERLAP, batch_size, want_confidence=False, flip=flip)
    assert torch.equal(again[0], labels) and again[1:] == (None, None)


@torch.no_grad()
@pytest.mark.parametrize("size, tile, overlap", [((9, 13), (16, 16), 0.5), ((40, 17), (16, 16), 0.0),
                                                 ((30, 21), (16, 8), 0.75)])
def test_other_layouts(unet, size, tile, overlap):
    """One tile; tiles without overlap; tiles overlapping by three quarters (rows carried over twice)."""
    x = pixels(1, *size, seed=3).float()
    want = reference_sliding_probs(unet, x, tile, overlap, 3)
    labels, _, probs = sliding_predict(unet, x, tile, overlap, 3, want_probs=True)
    assert torch.allclose(probs, want, rtol=0, atol=1e-6)
    assert torch.equal(labels.long(), want.argmax(dim=1))
    assert torch.allclose(sliding_probs(unet, x, tile, overlap, 3), want, rtol=0, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("flip", [False, True])
def test_the_device_sees_tiles_only(unet, flip):
    seen = []

    def forward(tiles: torch.Tensor) -> torch.Tensor:
        seen.append((tuple(tiles.shape), tiles.dtype))
        return unet(tiles)

    sliding_predict(forward, pixels(2, 60, 100), TILE, OVERLAP, 5, flip=flip)
    assert sum(shape[0] for shape, _ in seen) == 2 * 2 * 3 * (2 if flip else 1)  # 2 images of 2 x 3 tiles
    assert all(shape[0] <= 5 and shape[1:] == (3, 48, 48) and dtype == torch.float32 for shape, dtype in seen)


@torch.no_grad()
def test_half_precision_sums_stay_close(unet):
    x = pixels(1, 100, 130)
    exact = sliding_predict(unet, x, TILE, OVERLAP, 4, want_probs=True)
    half = sliding_predict(unet, x, TILE, OVERLAP, 4, want_probs=True, dtype=torch.bfloat16)
    assert half[2].dtype == torch.float32
    assert (half[2] - exact[2]).abs().max() < 1e-2
    top2 = exact[2].topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.05  # where the classes are not near a tie
    assert torch.equal(half[0][clear], exact[0][clear])


def test_label_dtype():
    assert [label_dtype(k) for k in (2, 256, 257, 2 ** 15)] == [torch.uint8, torch.uint8, torch.int16, torch.int16]


@pytest.mark.parametrize("settings", [InferenceSettings(mode="sliding", tile=(16, 16), batch_size=3, flip=True),
                                      InferenceSettings(mode="sliding", tile=(16, 16), overlap=0.5),
                                      InferenceSettings(), InferenceSettings(mode="multiscale", scales=(0.5, 1.0))])
def test_predictions_reduce_the_probabilities(unet, settings):
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((24, 36, 3), (20, 16, 3), (24, 36, 3))]
    images[1] = images[1][:, ::-1]  # a negatively strided view, as cv2's BGR -> RGB gives
    predictor = Predictor(unet, {}, torch.device("cpu"), settings)
    probabilities = predictor.probabilities(images)
    predictions = predictor.predictions(images, confidence=True, probs=True)
    for probs, prediction, image in zip(probabilities, predictions, images):
        assert prediction.labels.dtype == np.uint8 and prediction.labels.shape == image.shape[:2]
        assert np.array_equal(prediction.labels, probs.argmax(0).numpy())
        assert torch.equal(prediction.confidence, probs.max(0).values)
        assert torch.equal(prediction.probs, probs)
        assert np.array_equal(predictor.predict(image), prediction.labels)
    plain = predictor.predictions(images[:1])[0]
    assert plain.confidence is None and plain.probs is None


@torch.no_grad()
def test_predictor_sliding_probabilities_are_the_former_ones(unet):
    image = np.random.default_rng(5).integers(0, 256, (100, 130, 3), dtype=np.uint8)
    settings = InferenceSettings(mode="sliding", tile=TILE, overlap=OVERLAP, batch_size=4, flip=True)
    got = Predictor(unet, {}, torch.device("cpu"), settings).probabilities([image])[0]
    want = reference(unet, torch.from_numpy(image).permute(2, 0, 1)[None].float(), 4, flip=True)[0]
    assert torch.allclose(got, want, rtol=0, atol=1e-6)


@torch.no_grad()
def test_msocr_tiles_run_at_one_scale_in_the_predictor(monkeypatch):
    from models.msocr import MSOCR

    torch.manual_seed(0)
    net = MSOCR(3, width=18, scales=(0.5, 1.0, 2.0), mid_channels=8, key_channels=8, attention_channels=8).eval()
    calls = []
    at_scale = net.at_scale
    monkeypatch.setattr(net, "at_scale", lambda x, scale: calls.append(scale) or at_scale(x, scale))
    image = np.random.default_rng(1).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    predictor = Predictor(Normalized(net, MEAN, STD), {}, torch.device("cpu"),
                          InferenceSettings(mode="sliding", tile=(32, 32), batch_size=4))
    assert predictor.predict(image).shape == (48, 48)
    assert calls == [1.0, 1.0]  # a batch per row of tiles (2 tiles each), each tile at one scale


# A 10000 x 10000 image of 19 classes: the former accumulation held 19 x 10^8 float32 sums (7.6 GB)
# and the float32 pixels (1.2 GB). The forward is a cheap function of the pixels (the model's cost is
# not the point): each pixel's logits peak at the class whose centre is nearest to its red value.
MEMORY_SCRIPT = """
import json, resource, sys
sys.path.insert(0, {root!r})
import numpy as np
import torch
from predictor import InferenceSettings, Predictor

torch.set_num_threads(1)  # light on a shared machine
centres = torch.linspace(0, 255, 19).view(1, 19, 1, 1)


def forward(tiles):
    return (tiles[:, :1] - centres).square_().mul_(-0.01)


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


before = peak_mb()
image = np.random.default_rng(0).integers(0, 256, (10000, 10000, 3), dtype=np.uint8)  # 300 MB
settings = InferenceSettings(mode="sliding", tile=(256, 256), overlap=0.1, batch_size=16)
prediction = Predictor(forward, {{}}, torch.device("cpu"), settings).predictions([image], confidence=True)[0]
increase = peak_mb() - before
rows = [0, 229, 230, 4999, 9999]  # 230: the first row of the second row of tiles
want = np.abs(image[rows, :, :1].astype(np.float32) - centres.view(-1).numpy()).argmin(-1)
print(json.dumps({{"increase_mb": increase, "labels": bool(np.array_equal(prediction.labels[rows], want)),
                  "dtype": str(prediction.labels.dtype), "confidence": prediction.confidence.shape == (10000, 10000)}}))
"""


@pytest.mark.slow  # about 60 s of one CPU core: 1.3 x 10^8 pixels of 19 classes through softmax and the sums
def test_a_10k_image_of_19_classes_needs_under_2_gb():
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT.format(root=str(ROOT))], capture_output=True,
                          text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {**result, "labels": True, "dtype": "uint8", "confidence": True}
    # Input 300 MB + labels 100 MB + confidence 400 MB + a row of tiles' sums (19 x 256 x 10000 x 4 B:
    # 195 MB) and the rows being reduced: about 1.3 GB.
    assert result["increase_mb"] < 2048, result
