"""ENet, HRNetV2, OCR and MS-OCR: published sizes and the behaviour each paper relies on."""
from __future__ import annotations

import math

import pytest
import torch

import models  # noqa: F401  (registers the models)
from models.enet import ENet, SpatialDropout
from models.hrnet import HRNetEncoder, concat_resolutions
from models.ocr import ObjectAttention, object_regions
from utils.registry import MODELS


def build(name: str, num_classes: int = 5, **args) -> torch.nn.Module:
    return MODELS.build({"type": name, "args": args}, "arch", num_classes=num_classes)


def test_enet_parameter_count_matches_the_published_figures():
    # Paper: 0.37 M; the reference PyTorch ENet: 350,652 (one PReLU slope per layer, a PReLU
    # after every expansion, 2x2 transposed convs in its upsampling). Ours has one slope per
    # channel and the paper's 3x3 transposed convs, and no activation after the expansion.
    count = build("ENet", num_classes=12).num_parameters()
    assert count == 359_843
    assert abs(count - 370_000) / 370_000 < 0.03
    assert abs(count - 350_652) / 350_652 < 0.03


@pytest.mark.parametrize("size", [(37, 53), (5, 3), (24, 16)])
def test_enet_any_input_size(size):
    model = build("ENet").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size))["out"].shape == (1, 5, *size)


@pytest.mark.parametrize("pool", ["down1", "down2"])
def test_enet_unpools_at_the_encoders_max_pool_indices(pool):
    torch.manual_seed(0)
    model = build("ENet").eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        before = model(x)["out"]
        # Reversing each row of indices keeps them valid but moves every unpooled value.
        handle = getattr(model, pool).pool.register_forward_hook(
            lambda module, inputs, output: (output[0], output[1].flip(-1)))
        after = model(x)["out"]
        handle.remove()
        again = model(x)["out"]
    assert not torch.allclose(before, after, atol=1e-4)
    assert torch.equal(before, again)


def test_enet_unpooling_puts_values_where_the_maxima_were():
    up = build("ENet").up5.eval()
    x = torch.randn(1, 64, 4, 4)
    pooled, indices = torch.nn.functional.max_pool2d(torch.randn(1, 16, 8, 8), 2, return_indices=True)
    with torch.no_grad():
        shortcut = up.unpool(up.project(x)[:, :16], indices)
    mask = torch.zeros(1, 16, 64, dtype=torch.bool).scatter_(2, indices.flatten(2), True).view(1, 16, 8, 8)
    assert (shortcut[~mask] == 0).all()
    assert (shortcut[mask] != 0).all()


def test_enet_backward_and_dropout_only_in_training():
    torch.manual_seed(0)
    model = build("ENet")
    x = torch.randn(2, 3, 16, 24)
    model(x)["out"].square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x)["out"], model(x)["out"])


def test_enet_channels_last_computes_the_same():
    torch.manual_seed(0)
    plain = build("ENet").eval()
    fast = build("ENet", channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    assert fast.initial.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        torch.testing.assert_close(fast(x)["out"], plain(x)["out"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shortcut_channels", [6, 2])
def test_spatial_dropout_drops_whole_channels_of_the_branch(shortcut_channels):
    torch.manual_seed(0)
    drop = SpatialDropout(0.5)
    shortcut, branch = torch.randn(8, shortcut_channels, 3, 3), torch.randn(8, 6, 3, 3)
    padded = torch.cat([shortcut, torch.zeros(8, 6 - shortcut_channels, 3, 3)], dim=1)
    out = drop(shortcut, branch)
    kept = (out - padded).flatten(2)
    dropped = kept.abs().amax(-1) == 0
    assert 0 < dropped.sum() < dropped.numel()
    torch.testing.assert_close(kept[~dropped], 2 * branch.flatten(2)[~dropped])
    drop.eval()
    torch.testing.assert_close(drop(shortcut, branch), padded + branch)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\), got 1.0"):
        SpatialDropout(1.0)


def test_enet_rejects_a_bad_dropout_with_its_config_path():
    from utils.errors import ConfigError
    with pytest.raises(ConfigError, match=r"^arch \(ENet\): dropout must be in \[0, 1\), got 1.5$"):
        build("ENet", dropout=1.5)
    assert isinstance(build("ENet"), ENet)


def count_on_meta(name: str, **args) -> int:
    with torch.device("meta"):  # no memory, no initialisation: counting a 70 M model is instant
        return build(name, num_classes=19, **args).num_parameters()


@pytest.mark.parametrize("name, width, published", [
    ("HRNetV2", 48, 65.9e6),   # HRNetV2-W48, Cityscapes (Wang et al. 2019, table 3)
    ("HRNetOCR", 48, 70.3e6),  # HRNetV2-W48 + OCR (Yuan et al. 2020, table 7)
])
def test_hrnet_parameter_counts_match_the_papers(name, width, published):
    assert abs(count_on_meta(name, width=width) - published) / published < 0.005


def test_hrnet_widths_and_the_scale_attention_head():
    counts = {w: count_on_meta("HRNetV2", width=w) for w in (18, 32, 48)}
    assert counts[18] < counts[32] < counts[48]
    assert abs(counts[18] - 9.6e6) / 9.6e6 < 0.02  # HRNetV2-W18 backbone (9.56 M) + head
    # Two 3x3 ConvBNReLU of 256 channels on the 512 OCR channels, and a 1x1 conv to one map.
    attention = 512 * 256 * 9 + 2 * 256 + 256 * 256 * 9 + 2 * 256 + 256
    assert count_on_meta("MSOCR", width=48) - count_on_meta("HRNetOCR", width=48) == attention


def test_hrnet_encoder_interface_and_registration():
    from models.backbones import build_encoder
    from utils.errors import ConfigError

    encoder = build_encoder("hrnet_w18").eval()
    assert encoder.out_channels == (18, 36, 72, 144)
    assert encoder.strides == (4, 8, 16, 32)
    assert encoder.pretrained_normalization is None
    with torch.no_grad():
        feats = encoder(torch.randn(1, 3, 65, 47))
    assert [tuple(f.shape) for f in feats] == [(1, 18, 17, 12), (1, 36, 9, 6), (1, 72, 5, 3), (1, 144, 3, 2)]
    with pytest.raises(ConfigError, match="output_stride 8 is not available for hrnet_w18.*choose 32"):
        build_encoder("hrnet_w18", output_stride=8)


def test_hrnet_features_of_a_padded_input_are_those_of_the_input():
    # Padding to a multiple of 32 only adds rows and columns below and to the right: the
    # cropped features equal those of the same input padded by hand.
    torch.manual_seed(0)
    encoder = HRNetEncoder(18).eval()
    x = torch.randn(1, 3, 33, 20)
    with torch.no_grad():
        cropped, full = encoder(x), encoder.net(torch.nn.functional.pad(x, (0, 12, 0, 31)))
    for a, b in zip(cropped, full):
        assert torch.equal(a, b[..., :a.shape[-2], :a.shape[-1]])


def test_object_regions_average_the_pixels_under_each_class_softmax():
    pixels = torch.tensor([[[[1.0, 3.0]]]])                     # (1, C=1, 1, 2)
    soft = torch.tensor([[[[0.0, 0.0]], [[0.0, math.log(3.0)]]]])  # (1, K=2, 1, 2)
    # class 0: weights (1/2, 1/2) -> 2; class 1: weights (1/4, 3/4) -> 2.5
    torch.testing.assert_close(object_regions(pixels, soft), torch.tensor([[[[2.0], [2.5]]]]))


def test_object_context_is_a_convex_combination_of_the_regions():
    torch.manual_seed(0)
    attention = ObjectAttention(8, 4).eval()
    pixels = torch.randn(2, 8, 3, 5)
    same = torch.randn(2, 8, 1, 1).expand(2, 8, 3, 1)  # three identical regions
    with torch.no_grad():
        context = attention(pixels, same)
        expected = attention.out(attention.value(same[:, :, :1]))  # whatever the weights, they sum to 1
    torch.testing.assert_close(context, expected.expand_as(context), rtol=1e-5, atol=1e-5)


def test_ocr_aux_is_the_soft_object_regions_in_training_only():
    torch.manual_seed(0)
    model = build("HRNetOCR", width=18, freeze_bn=True).train()  # BN frozen: same statistics twice
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    with torch.no_grad():
        soft = model.aux(concat_resolutions(model.backbone(x)))
    assert out["aux"].shape == out["out"].shape == (2, 5, 32, 32)
    torch.testing.assert_close(out["aux"], model.resize_to(soft, (32, 32)))
    with torch.no_grad():
        assert set(model.eval()(x)) == {"out"}


def fixed(model: torch.nn.Module) -> torch.nn.Module:
    """A deterministic random network: training mode, so batch norm normalises by the batch itself
    (a random network in eval mode explodes or saturates the attention), with dropout off."""
    model.head.augment[1].p = 0.0
    return model.train()


@pytest.fixture(scope="module")
def msocr():
    torch.manual_seed(0)
    return fixed(build("MSOCR", width=18, scales=[0.5, 1.0, 2.0]))


def test_msocr_with_one_scale_is_the_single_scale_network(msocr):
    single = fixed(build("HRNetOCR", width=18))
    missing, unexpected = single.load_state_dict(msocr.state_dict(), strict=False)
    assert missing == [] and all(k.startswith("attention.") for k in unexpected)
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad():
        ours, theirs = msocr.forward_scales(x, [1.0]), single(x)
    for key in ("out", "aux"):
        torch.testing.assert_close(ours[key], theirs[key])


def test_msocr_combines_the_scales_by_their_attention(msocr, monkeypatch):
    x = torch.randn(2, 3, 32, 32)  # two images: batch norm in training mode needs two values at stride 32
    size = (32, 32)
    resize = msocr.resize_to
    with torch.no_grad():
        outputs = {s: msocr.at_scale(x, s) for s in (2.0, 1.0, 0.5)}
    # forward_scales gets these same per-scale outputs: only the combination is under test (and fast).
    monkeypatch.setattr(msocr, "at_scale", lambda inputs, s: outputs[s] if inputs is x else None)
    with torch.no_grad():
        (big, big_aux, _), (mid, mid_aux, a_mid), (small, small_aux, a_small) = outputs.values()
        assert big.shape[-2:] == (64, 64) and small.shape[-2:] == (16, 16)
        assert ((a_mid > 0.01) & (a_mid < 0.99)).all()
        # From the largest scale down: c = a * p + (1 - a) * c, at the finer of the two resolutions.
        expected = {}
        for key, (b, m, s) in {"out": (big, mid, small), "aux": (big_aux, mid_aux, small_aux)}.items():
            combined = a_mid * m + (1 - a_mid) * resize(b, size)
            expected[key] = resize(a_small * s, size) + (1 - resize(a_small, size)) * combined
        two = resize(a_small * small, size) + (1 - resize(a_small, size)) * mid
        three = msocr.forward_scales(x, msocr.scales)
        unordered = msocr.forward_scales(x, [1.0, 0.5, 2.0])["out"]
        pair = msocr.forward_scales(x, [0.5, 1.0])["out"]
    torch.testing.assert_close(three["out"], expected["out"])
    torch.testing.assert_close(three["aux"], expected["aux"])
    torch.testing.assert_close(unordered, expected["out"])
    torch.testing.assert_close(pair, two)


def test_msocr_forward_uses_the_training_then_the_configured_scales(msocr, monkeypatch):
    calls = []
    monkeypatch.setattr(msocr, "forward_scales", lambda x, scales: calls.append(tuple(scales)))
    msocr.train()(torch.zeros(1))
    msocr.eval()(torch.zeros(1))
    msocr.train()
    assert calls == [(0.5, 1.0), (0.5, 1.0, 2.0)]


@pytest.mark.parametrize("scales", [[], [1.0, 0.0]])
def test_msocr_rejects_bad_scales(scales):
    from utils.errors import ConfigError
    with pytest.raises(ConfigError, match=r"^arch \(MSOCR\): scales must be a non-empty list of positive"):
        build("MSOCR", width=18, scales=scales)


@pytest.mark.parametrize("name, arch", [("camvid_enet", "ENet"), ("camvid_segnet", "SegNet"),
                                        ("cityscapes_hrnet_ocr", "HRNetOCR"), ("cityscapes_msocr", "MSOCR")])
def test_shipped_configs_validate_and_build(name, arch):
    from pathlib import Path

    from builder import build_model
    from utils.config import load_config

    config = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.json")
    assert config["arch"]["type"] == arch
    with torch.device("meta"):  # the full-size networks, without memory or initialisation
        model = build_model(config)
    assert model.num_classes == (11 if name.startswith("camvid") else 19)
    if name == "camvid_enet":  # the paper's recipe
        assert config["optimizer"]["type"] == "Adam"
        assert config["optimizer"]["args"]["lr"] == 5e-4 and config["optimizer"]["args"]["weight_decay"] == 2e-4
        assert config["loss"]["args"]["weights"] == "enet"


def test_segnet_parameter_count_matches_the_paper():
    with torch.device("meta"):
        count = build("SegNet", num_classes=11).num_parameters()
    assert abs(count - 29.4e6) / 29.4e6 < 0.01  # the paper's 29.5 M; VGG16-BN's 13 convs are 14.7 M of it


def test_segnet_unpools_at_the_encoders_max_pool_indices(monkeypatch):
    torch.manual_seed(0)
    model = build("SegNet").train()  # batch statistics: a random network's signal neither vanishes nor explodes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)["out"]
        unpool = torch.nn.functional.max_unpool2d
        # Reversed rows of indices stay valid but move every unpooled value.
        monkeypatch.setattr(torch.nn.functional, "max_unpool2d",
                            lambda y, where, **kw: unpool(y, where.flip(-1), **kw))
        after = model(x)["out"]
    assert not torch.allclose(before, after, atol=1e-4)
    assert set(model.backbone.parameters()) <= set(model.parameters())
    assert [len(stage) for stage in model.decoder] == [3, 3, 3, 2, 2]  # VGG16's 3, 3, 3, 2, 2 from the top


def test_hrnet_weights_file_is_loaded(tmp_path):
    import timm

    torch.manual_seed(1)
    classifier = timm.create_model("hrnet_w18")  # a checkpoint as timm's ImageNet files hold it
    path = tmp_path / "hrnet_w18.pth"
    torch.save(classifier.state_dict(), path)
    encoder = HRNetEncoder(18, pretrained=True, weights_path=str(path))
    reference = classifier.state_dict()
    loaded = encoder.net.state_dict()
    assert loaded and all(torch.equal(value, reference[key]) for key, value in loaded.items())
    assert encoder.pretrained_normalization == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_hrnet_bad_weights_files_are_named(tmp_path):
    from utils.errors import CheckpointError, ConfigError

    with pytest.raises(ConfigError, match="weights_path .*missing.pth does not exist"):
        HRNetEncoder(18, pretrained=True, weights_path=str(tmp_path / "missing.pth"))
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read weights file .*broken.pth: "):
        HRNetEncoder(18, pretrained=True, weights_path=str(broken))
    with pytest.raises(ConfigError, match="weights_path is set but pretrained is false"):
        HRNetEncoder(18, weights_path=str(broken))
