"""Sliding-window, multi-scale and flip inference (predictor), checked exactly on fixed models."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.images import normalize_batch
from models.unet import UNet
from utils.errors import ConfigError
from predictor import (InferenceSettings, Normalized, Predictor, inference_settings, predict_probs,
                           remove_small_clusters, sliding_probs, softmax_probs, tile_starts)

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@pytest.fixture(scope="module")
def unet() -> Normalized:
    """A seeded 3-class UNet in eval mode: 3x3 convolutions, so every output depends on its neighbours."""
    torch.manual_seed(0)
    model = UNet(3, base_channels=4, depth=2)
    with torch.no_grad():
        model.head.weight.mul_(30)  # confident logits, far from softmax's linear range
    return Normalized(model, MEAN, STD).eval()


class Pointwise(nn.Module):
    """A 1x1 convolution: each pixel's logits depend on that pixel only (mirror-equivariant)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.conv(x)}


def pixels(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, height, width)).astype(np.float32))


@torch.no_grad()
def test_tile_starts_cover_evenly():
    assert tile_starts(1024, 512, 1 / 3) == [0, 256, 512]
    assert tile_starts(2048, 512, 1 / 3) == [0, 307, 614, 922, 1229, 1536]
    assert tile_starts(10, 4, 0.0) == [0, 3, 6]
    assert tile_starts(512, 512, 0.5) == [0] and tile_starts(300, 512, 0.5) == [0]
    for size, tile, overlap in ((1000, 333, 0.25), (97, 16, 0.5), (17, 16, 0.9)):
        starts = tile_starts(size, tile, overlap)
        assert starts[0] == 0 and starts[-1] + tile == size
        assert all(b - a <= tile * (1 - overlap) for a, b in zip(starts, starts[1:]))  # at least that overlap


@torch.no_grad()
@pytest.mark.parametrize("size", [(16, 24), (16, 16), (9, 13)])
def test_an_image_no_larger_than_a_tile_is_whole_image_inference(unet, size):
    x = pixels(2, *size)
    whole = softmax_probs(unet, x)
    assert torch.equal(sliding_probs(unet, x, (16, 24), 0.5, batch_size=4), whole)
    assert torch.equal(predict_probs(unet, x, InferenceSettings(mode="sliding", tile=(32, 32), batch_size=2)),
                       whole)


@torch.no_grad()
def test_sliding_averages_probabilities_where_tiles_overlap(unet):
    x = pixels(1, 16, 24)
    got = sliding_probs(unet, x, (16, 16), 0.5, batch_size=1)  # tiles at columns 0 and 8
    left, right = softmax_probs(unet, x[..., :16]), softmax_probs(unet, x[..., 8:])
    expected = torch.cat([left[..., :8], (left[..., 8:] + right[..., :8]) / 2, right[..., 8:]], dim=-1)
    assert torch.equal(got, expected)
    assert not torch.allclose(got, softmax_probs(unet, x), atol=1e-3)  # tiles do see less context
    # Averaging logits instead would give another result: the average really is of probabilities.
    logits = torch.cat([unet(x[..., :16])[..., :8], (unet(x[..., :16])[..., 8:] + unet(x[..., 8:])[..., :8]) / 2,
                        unet(x[..., 8:])[..., 8:]], dim=-1)
    assert not torch.allclose(got, torch.softmax(logits, 1), atol=1e-4)
    # Batched tiles give the same numbers.
    assert torch.allclose(sliding_probs(unet, x, (16, 16), 0.5, batch_size=8), got, atol=1e-6)


@torch.no_grad()
def test_sliding_covers_a_large_image_in_two_directions(unet):
    x = pixels(2, 40, 50, seed=3)
    got = sliding_probs(unet, x, (16, 20), 1 / 3, batch_size=5)
    assert got.shape == (2, 3, 40, 50)
    assert torch.allclose(got.sum(dim=1), torch.ones(2, 40, 50), atol=1e-5)
    # Each pixel is the mean over the tiles holding it: check one pixel by hand.
    rows, cols = tile_starts(40, 16, 1 / 3), tile_starts(50, 20, 1 / 3)
    y, x0 = 15, 18
    holding = [softmax_probs(unet, x[:, :, t:t + 16, l:l + 20])[:, :, y - t, x0 - l]
               for t in rows for l in cols if t <= y < t + 16 and l <= x0 < l + 20]
    assert len(holding) == 4
    assert torch.allclose(got[:, :, y, x0], sum(holding) / 4, atol=1e-6)


@torch.no_grad()
def test_multiscale_and_flip(unet):
    x = pixels(1, 24, 32, seed=5)
    single = softmax_probs(unet, x)
    assert torch.equal(predict_probs(unet, x, InferenceSettings(mode="multiscale", scales=(1.0,))), single)
    # Flip: the mirrored image's prediction, mirrored back, averaged in.
    flipped = predict_probs(unet, x, InferenceSettings(flip=True))
    assert torch.equal(flipped, (single + softmax_probs(unet, x.flip(-1)).flip(-1)) / 2)
    assert not torch.allclose(flipped, single, atol=1e-4)
    # Scales: resized, predicted, probabilities resized back, averaged.
    half = F.interpolate(x, size=(12, 16), mode="bilinear", align_corners=False)
    back = F.interpolate(softmax_probs(unet, half), size=(24, 32), mode="bilinear", align_corners=False)
    got = predict_probs(unet, x, InferenceSettings(mode="multiscale", scales=(0.5, 1.0)))
    assert torch.equal(got, (back + single) / 2)
    # Multiscale with tiles: each scale predicted by the sliding window.
    tiled = predict_probs(unet, x, InferenceSettings(mode="multiscale", scales=(0.5, 1.0), tile=(16, 16)))
    assert torch.equal(tiled, (back + sliding_probs(unet, x, (16, 16), 1 / 3, 1)) / 2)


@torch.no_grad()
def test_flip_changes_nothing_for_a_mirror_equivariant_model():
    model = Normalized(Pointwise(), MEAN, STD).eval()
    x = pixels(2, 7, 9)
    assert torch.allclose(predict_probs(model, x, InferenceSettings(flip=True)), softmax_probs(model, x),
                          atol=1e-7)


@torch.no_grad()
def test_normalized_matches_the_training_normalisation(unet):
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 12, 10, 3), dtype=np.uint8))
    assert torch.equal(unet.normalize(images.permute(0, 3, 1, 2)), normalize_batch(images, MEAN, STD))


def test_images_of_different_sizes_in_one_batch(unet):
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((12, 18, 3), (16, 10, 3), (12, 18, 3))]
    for settings in (InferenceSettings(batch_size=3), InferenceSettings(mode="sliding", tile=(8, 8), batch_size=3)):
        predictor = Predictor(unet, {}, torch.device("cpu"), settings)
        together = predictor.probabilities(images)
        assert [tuple(p.shape) for p in together] == [(3, 12, 18), (3, 16, 10), (3, 12, 18)]
        for image, probs in zip(images, together):
            alone = predictor.probabilities([image])[0]
            assert torch.allclose(probs, alone, atol=1e-6)
            assert np.array_equal(probs.argmax(0).numpy(), predictor.predict(image))


def test_bf16_autocast_stays_close_to_float32(unet):
    image = np.random.default_rng(6).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    fp32 = Predictor(unet, {}, torch.device("cpu")).probabilities([image])[0]
    bf16 = Predictor(unet, {}, torch.device("cpu"), InferenceSettings(amp="bf16")).probabilities([image])[0]
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert (bf16 - fp32).abs().max() < 0.05


def test_settings_are_validated():
    settings = inference_settings({"mode": "sliding", "tile": [512, 1024], "overlap": 0.25, "batch_size": 4})
    assert settings == InferenceSettings(mode="sliding", scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75),
                                         tile=(512, 1024), overlap=0.25, batch_size=4)
    assert settings.used_scales == (1.0,) and inference_settings({}).used_tile is None
    for section, message in (
            ({"mode": "sliding"}, "inference.tile: sliding mode needs the tile size"),
            ({"overlap": 1.0}, "inference.overlap: expected 0 <= overlap < 1, got 1.0"),
            ({"scales": [0.5, -1]}, "inference.scales: expected a non-empty list of positive scales"),
            ({"tile": [16]}, "inference.tile: expected [height, width]"),
            ({"mode": "tiles"}, "inference.mode: expected one of 'single', 'sliding', 'multiscale'"),
            ({"flips": True}, "inference.flips: unknown key. Did you mean 'flip'?"),
            ({"batch_size": 0}, "inference.batch_size: must be >= 1")):
        with pytest.raises(ConfigError) as info:
            inference_settings(section)
        assert message in str(info.value)


def test_small_clusters_take_the_class_around_them():
    pred = np.zeros((6, 7), np.uint8)
    pred[:, 4:] = 2
    pred[1, 1] = 1            # one pixel of 1 inside 0: becomes 0
    pred[3:5, 1:3] = 3        # 4 pixels of 3 inside 0: kept with min_size 4
    pred[0, 6] = 1            # a corner pixel inside 2: becomes 2
    pred[5, 3] = 1            # touches 0 left and above, 2 on the right: 0 wins 2 to 1
    out = remove_small_clusters(pred, 4)
    expected = pred.copy()
    expected[1, 1], expected[0, 6], expected[5, 3] = 0, 2, 0
    assert np.array_equal(out, expected) and out.dtype == np.uint8
    assert np.array_equal(remove_small_clusters(pred, 0), pred)
    assert np.array_equal(remove_small_clusters(np.full((3, 3), 4, np.uint8), 100), np.full((3, 3), 4))


@pytest.mark.slow
@torch.no_grad()
def test_msocr_combines_scales_with_its_attention():
    from models.msocr import MSOCR

    torch.manual_seed(2)
    model = Normalized(MSOCR(3, width=18, mid_channels=16, key_channels=8, attention_channels=8), MEAN, STD).eval()
    x = pixels(1, 32, 32, seed=7)
    settings = InferenceSettings(mode="multiscale", scales=(0.5, 1.0))
    expected = torch.softmax(model.model.forward_scales(model.normalize(x), (0.5, 1.0))["out"], dim=1)
    assert torch.equal(predict_probs(model, x, settings), expected)
    averaged = (F.interpolate(softmax_probs(model, F.interpolate(x, size=(16, 16), mode="bilinear",
                                                                 align_corners=False)),
                              size=(32, 32), mode="bilinear", align_corners=False) + softmax_probs(model, x)) / 2
    assert not torch.allclose(predict_probs(model, x, settings), averaged, atol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("mode, scales, tile, expected", [
    ("single", (1.0,), None, [1.0]),
    ("sliding", (1.0,), (32, 32), [1.0] * 4),         # 48x48 by 32-pixel tiles, overlap 1/3: 2 x 2 tiles
    ("multiscale", (0.5, 1.0), None, [1.0, 0.5]),     # one pass, the attention combines the scales
    ("multiscale", (0.5, 1.0), (32, 32), [1.0] + [1.0] * 4),  # 24x24 whole, then 4 tiles, each at one scale
])
def test_msocr_runs_the_scales_of_the_mode_only(mode, scales, tile, expected, monkeypatch):
    # The model evaluates at three scales by itself (arch.args.scales); the inference modes must not
    # nest those inside their own (single and sliding used to run 0.5, 1 and 2 on every image or tile).
    from models.msocr import MSOCR

    torch.manual_seed(0)
    net = MSOCR(3, width=18, scales=(0.5, 1.0, 2.0), mid_channels=8, key_channels=8, attention_channels=8).eval()
    calls = []
    at_scale = net.at_scale
    monkeypatch.setattr(net, "at_scale", lambda x, scale: calls.append(scale) or at_scale(x, scale))
    settings = InferenceSettings(mode=mode, scales=scales, tile=tile)
    probs = predict_probs(Normalized(net, MEAN, STD), pixels(1, 48, 48, seed=1), settings)
    assert probs.shape == (1, 3, 48, 48)
    assert calls == expected


@torch.no_grad()
def test_msocr_evaluates_at_one_scale_unless_told(monkeypatch):
    from models.msocr import MSOCR

    net = MSOCR(3, width=18, mid_channels=8, key_channels=8, attention_channels=8).eval()
    assert net.scales == (1.0,)
    calls = []
    at_scale = net.at_scale
    monkeypatch.setattr(net, "at_scale", lambda x, scale: calls.append(scale) or at_scale(x, scale))
    net(torch.zeros(1, 3, 32, 32))
    assert calls == [1.0]


def test_report_means_follow_the_metrics_section_and_save_the_confusion_matrix(tmp_path):
    # The same selection as validation during training: "metrics": {"exclude": ["bg"]}.
    from predictor import Report

    meta = {"class_names": ["bg", "a", "b"], "palette": [[0, 0, 0], [255, 0, 0], [0, 255, 0]],
            "num_classes": 3, "ignore_index": 255, "dataset": "Folder"}
    label = np.array([[0, 0, 1, 1], [2, 2, 2, 255]], dtype=np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 0]], dtype=np.uint8)
    image = np.zeros((2, 4, 3), dtype=np.uint8)
    everything, without_bg = Report(meta, worst=1), Report(meta, worst=1, metrics={"exclude": ["bg"]})
    for report in (everything, without_bg):
        report.add("x.png", image, label, pred)
    (tmp_path / "all").mkdir(), (tmp_path / "sel").mkdir()
    all_classes, selected = everything.finish(tmp_path / "all"), without_bg.finish(tmp_path / "sel")
    # Confusion rows (truth) x columns (prediction): bg [1, 1, 0], a [0, 2, 0], b [1, 0, 2].
    assert selected["confusion_matrix"] == {"class_names": ["bg", "a", "b"], "rows": "ground truth",
                                            "columns": "prediction", "matrix": [[1, 1, 0], [0, 2, 0], [1, 0, 2]]}
    iou = {"bg": 1 / 3, "a": 2 / 3, "b": 2 / 3}  # TP / (TP + FP + FN): bg is 1 / (1 + 1 + 1)
    assert all_classes["mIoU"] == pytest.approx(sum(iou.values()) / 3)
    assert selected["mIoU"] == pytest.approx((iou["a"] + iou["b"]) / 2)
    assert selected["class_iou"] == all_classes["class_iou"]
    assert selected["worst_images"][0]["mIoU"] == pytest.approx((iou["a"] + iou["b"]) / 2)
