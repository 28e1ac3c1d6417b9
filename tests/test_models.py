"""Every registered model through one shared test class, then the shared ResNet backbone.

A new architecture needs no new test here: registering it adds it to ``TestEveryModel``.
"""
from __future__ import annotations

import os

import pytest
import torch
import torchvision

import models  # noqa: F401  (registers the models)
from models.backbones import ResNetBackbone
from utils.errors import CheckpointError, ConfigError
from utils.registry import BACKBONES, MODELS

NUM_CLASSES = 5
# Small settings, applied to every model that accepts the argument, keep the file fast.
TINY_ARGS = {"backbone": "resnet18", "base_channels": 8}
RESNET18_FILE = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)


def build(name: str, **args) -> torch.nn.Module:
    tiny = {k: v for k, v in TINY_ARGS.items() if k in MODELS.parameters(name)}
    return MODELS.build({"type": name, "args": {**tiny, **args}}, "arch", num_classes=NUM_CLASSES)


@pytest.mark.parametrize("name", MODELS.names())
class TestEveryModel:
    @pytest.mark.parametrize("size", [(64, 64), (65, 47)])
    def test_forward_shape(self, name, size):
        out = build(name)(torch.randn(2, 3, *size))
        assert out["out"].shape == (2, NUM_CLASSES, *size)
        assert all(v.shape == (2, NUM_CLASSES, *size) for v in out.values())

    def test_backward_gives_finite_grads_everywhere(self, name):
        model = build(name)
        out = model(torch.randn(2, 3, 48, 40))
        sum(v.square().mean() for v in out.values()).backward()
        for pname, param in model.named_parameters():
            assert param.grad is not None, f"{pname} gets no gradient"
            assert torch.isfinite(param.grad).all(), pname

    def test_eval_single_image(self, name):
        model = build(name).eval()
        with torch.no_grad():
            out = model(torch.randn(1, 3, 33, 50))
        assert set(out) == {"out"}
        assert out["out"].shape == (1, NUM_CLASSES, 33, 50)

    def test_param_groups_split_backbone_from_decoder(self, name):
        model = build(name)
        backbone = getattr(model, "backbone", None)
        backbone_ids = set() if backbone is None else {id(p) for p in backbone.parameters()}
        groups = model.param_groups(0.01, 0.1)
        seen = [id(p) for group in groups for p in group["params"]]
        assert len(seen) == len(set(seen))
        assert set(seen) == {id(p) for p in model.parameters()}
        for group in groups:
            for param in group["params"]:
                assert group["lr"] == pytest.approx(0.001 if id(param) in backbone_ids else 0.01)


@pytest.mark.parametrize("depth, channels", [
    (18, [64, 128, 256, 512]), (34, [64, 128, 256, 512]),
    (50, [256, 512, 1024, 2048]), (101, [256, 512, 1024, 2048]), (152, [256, 512, 1024, 2048])])
def test_backbone_out_channels(depth, channels):
    backbone = BACKBONES.build(f"resnet{depth}", "backbone").eval()
    assert backbone.out_channels == dict(zip(["stem", "layer1", "layer2", "layer3", "layer4"], [64, *channels]))
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 32, 32))
    assert {k: v.shape[1] for k, v in feats.items()} == backbone.out_channels


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])  # BasicBlock and Bottleneck
@pytest.mark.parametrize("output_stride, layer3_size, layer4_size", [(8, 8, 8), (16, 4, 4), (32, 4, 2)])
def test_backbone_output_stride_by_dilation(name, output_stride, layer3_size, layer4_size):
    backbone = BACKBONES.build({"type": name, "args": {"output_stride": output_stride}}, "backbone").eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 64))
    sizes = {k: tuple(v.shape[-2:]) for k, v in feats.items()}
    assert sizes == {"stem": (32, 32), "layer1": (16, 16), "layer2": (8, 8),
                     "layer3": (layer3_size,) * 2, "layer4": (layer4_size,) * 2}
    assert {k: 64 // s for k, s in backbone.strides.items()} == {k: s[0] for k, s in sizes.items()}
    # The stride a stage gave up reappears as the dilation of all its 3x3 convs.
    for stage, nominal_stride in [("layer3", 16), ("layer4", 32)]:
        dilation = nominal_stride // backbone.strides[stage]
        convs = [m for m in getattr(backbone, stage).modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(c.dilation == c.padding == (dilation, dilation) for c in convs if c.kernel_size == (3, 3))
        assert any(c.stride == (2, 2) for c in convs) == (dilation == 1)


def test_bad_output_stride_is_rejected():
    with pytest.raises(ConfigError, match=r"output_stride must be one of \(8, 16, 32\), got 4"):
        build("DeepLabV3Plus", output_stride=4)
    with pytest.raises(ValueError, match="output_stride"):
        ResNetBackbone(18, output_stride=12)


def test_unknown_backbone_lists_choices():
    with pytest.raises(ConfigError, match=r"^arch.args.backbone: expected one of 'resnet101', 'resnet152', "
                                          r"'resnet18', 'resnet34', 'resnet50', got 'resnet05'. "
                                          r"Did you mean 'resnet50'\?$"):
        build("DeepLabV3Plus", backbone="resnet05")


def test_pretrained_without_weights_file_names_both_places(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ConfigError) as info:
        build("DeepLabV3Plus", pretrained=True)
    message = str(info.value)
    assert str(tmp_path / "checkpoints" / RESNET18_FILE) in message
    assert f"'{RESNET18_FILE}'" in message and "weights_path" in message
    with pytest.raises(ConfigError, match="weights_path .*missing.pth does not exist"):
        build("DeepLabV3Plus", pretrained=True, weights_path=str(tmp_path / "missing.pth"))


def test_weights_path_without_pretrained_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="pretrained is false"):
        build("DeepLabV3Plus", weights_path=str(tmp_path / "w.pth"))


@pytest.mark.parametrize("from_hub_cache", [False, True])
def test_pretrained_weights_are_loaded(monkeypatch, tmp_path, from_hub_cache):
    reference = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path / "checkpoints" / RESNET18_FILE
    path.parent.mkdir()
    torch.save(reference, path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    weights_path = None if from_hub_cache else str(path)
    model = build("DeepLabV3Plus", output_stride=8, pretrained=True, weights_path=weights_path)
    loaded = model.backbone.state_dict()
    assert set(loaded) == {k for k in reference if not k.startswith("fc.")}
    assert all(torch.equal(value, reference[key]) for key, value in loaded.items())


def test_corrupt_weights_file_names_it(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pth"):
        build("DeepLabV3Plus", pretrained=True, weights_path=str(path))


def test_freeze_bn_keeps_running_statistics():
    model = build("DeepLabV3Plus", freeze_bn=True).train()
    before = model.backbone.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(model.backbone.bn1.running_mean, before)


def test_unet_transposed_upsampling_any_size():
    model = build("UNet", upsampling="transpose", depth=3)
    assert model(torch.randn(2, 3, 37, 53))["out"].shape == (2, NUM_CLASSES, 37, 53)


def test_unet_accepts_inputs_smaller_than_its_pooling():
    model = MODELS.build({"type": "UNet", "args": {"base_channels": 4, "depth": 4}}, "arch", num_classes=3)
    assert model(torch.zeros(2, 3, 7, 9))["out"].shape == (2, 3, 7, 9)  # 16x16 needed: padded, then cropped
