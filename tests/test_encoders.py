"""The shared encoders: channels and strides, dilation, input channels, pretrained weights."""
from __future__ import annotations

import os
import re
import types
import urllib.error

import pytest
import torch
import torchvision

import models  # noqa: F401  (registers the encoders)
from models.backbones import IMAGENET_MEAN_STD, build_encoder, check_encoder_name, feature_at_stride
from utils.errors import CheckpointError, ConfigError

RESNET18_FILE = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
slow = pytest.mark.slow

# At output stride 32; the channels are torchvision's documented stage widths.
ENCODERS = [
    ("resnet18", (64, 64, 128, 256, 512)),
    ("resnet34", (64, 64, 128, 256, 512)),
    ("resnet50", (64, 256, 512, 1024, 2048)),
    pytest.param("resnet101", (64, 256, 512, 1024, 2048), marks=slow),
    pytest.param("resnet152", (64, 256, 512, 1024, 2048), marks=slow),
    ("resnext50_32x4d", (64, 256, 512, 1024, 2048)),
    pytest.param("resnext101_32x8d", (64, 256, 512, 1024, 2048), marks=slow),
    ("mobilenet_v2", (16, 24, 32, 96, 1280)),
    ("mobilenet_v3_large", (16, 24, 40, 112, 960)),
    ("vgg16_bn", (64, 128, 256, 512, 512)),  # pool1 ... pool5
]


def shapes(encoder: torch.nn.Module, size: tuple[int, int], in_channels: int = 3) -> list[tuple[int, ...]]:
    with torch.no_grad():
        return [tuple(f.shape) for f in encoder.eval()(torch.randn(1, in_channels, *size))]


@pytest.mark.parametrize("name, channels", ENCODERS)
def test_channels_and_strides_are_read_from_the_network(name, channels):
    encoder = build_encoder(name)
    assert encoder.out_channels == channels
    assert encoder.strides == (2, 4, 8, 16, 32)
    assert shapes(encoder, (96, 128)) == [(1, c, 96 // s, 128 // s) for c, s in zip(channels, encoder.strides)]
    assert encoder.pretrained_normalization is None


@pytest.mark.parametrize("name", ["resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("output_stride, dilate", [(8, [False, True, True]), (16, [False, False, True])])
def test_dilation_is_torchvisions(name, output_stride, dilate):
    """Every convolution has the stride, dilation and padding of torchvision's replace_stride_with_dilation."""
    ours = build_encoder(name, output_stride=output_stride)
    theirs = getattr(torchvision.models, name)(replace_stride_with_dilation=dilate)
    geometry = {n: (m.stride, m.dilation, m.padding) for n, m in theirs.named_modules()
                if isinstance(m, torch.nn.Conv2d)}
    assert {n: (m.stride, m.dilation, m.padding) for n, m in ours.named_modules()
            if isinstance(m, torch.nn.Conv2d)} == geometry
    assert ours.strides == (2, 4, 8, min(16, output_stride), output_stride)


def test_basic_blocks_follow_the_same_rule():
    """torchvision refuses to dilate BasicBlock; ours: first block of a stage keeps the previous rate."""
    encoder = build_encoder("resnet18", output_stride=8)
    rates = [[(b.conv1.dilation[0], b.conv2.dilation[0]) for b in layer] for layer in (encoder.layer3, encoder.layer4)]
    assert rates == [[(1, 1), (2, 2)], [(2, 2), (4, 4)]]
    assert all(b.conv1.stride == (1, 1) for b in encoder.layer4)
    assert shapes(encoder, (64, 64))[2:] == [(1, 128, 8, 8), (1, 256, 8, 8), (1, 512, 8, 8)]


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_large"])
@pytest.mark.parametrize("output_stride, strides, stage_rates", [
    (8, (2, 4, 8, 8, 8), {3: (1, 2), 4: (2, 4)}), (16, (2, 4, 8, 16, 16), {4: (1, 2)})])
def test_mobilenets_dilate_by_the_same_rule(name, output_stride, strides, stage_rates):
    encoder = build_encoder(name, output_stride=output_stride)
    assert encoder.strides == strides
    assert [s[-1] for s in shapes(encoder, (64, 64))] == [64 // s for s in strides]
    for stage, (first_rate, rate) in stage_rates.items():
        blocks = encoder.features[encoder.taps[stage - 1] + 1:encoder.taps[stage] + 1]
        spatial = [[m for m in block.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size[0] > 1]
                   for block in blocks]
        rates = [{m.dilation[0] for m in convs} for convs in spatial if convs]
        assert rates == [{first_rate}] + [{rate}] * (len(rates) - 1)
        assert all(m.stride == (1, 1) for convs in spatial for m in convs)


@pytest.mark.parametrize("name, output_stride, choices", [("vgg16_bn", 8, "choose 32"),
                                                          ("resnet18", 4, "choose 8 or 16 or 32")])
def test_unsupported_output_stride_names_the_choices(name, output_stride, choices):
    with pytest.raises(ConfigError, match=f"output_stride {output_stride} is not available for {name}: {choices}"):
        build_encoder(name, output_stride=output_stride)


def test_unknown_names_get_a_did_you_mean():
    with pytest.raises(ConfigError, match=r"^arch.args.backbone: unknown backbone 'resnet05'. Did you mean "
                                          r"'resnet50'\? Available: .*mobilenet_v2, .*, vgg16_bn, or 'timm:<name>'"):
        check_encoder_name("resnet05", "arch.args.backbone")
    with pytest.raises(ConfigError, match=r"^b: unknown timm model 'convnext_tiniest'. Did you mean 'convnext_t"):
        check_encoder_name("timm:convnext_tiniest", "b")
    check_encoder_name("timm:resnet10t.c3_in1k", "b")  # a pretrained tag may follow the name


def test_timm_encoder_reads_feature_info():
    import timm

    encoder = build_encoder("timm:resnet10t", output_stride=8)
    reference = timm.create_model("resnet10t", features_only=True, output_stride=8)
    assert encoder.out_channels == tuple(reference.feature_info.channels()) == (64, 64, 128, 256, 512)
    assert encoder.strides == (2, 4, 8, 8, 8)
    assert shapes(encoder, (64, 64)) == [(1, 64, 32, 32), (1, 64, 16, 16), (1, 128, 8, 8), (1, 256, 8, 8),
                                         (1, 512, 8, 8)]


@pytest.mark.parametrize("strides, stride, or_coarser, index", [
    ((2, 4, 8, 16, 32), 4, False, 1),
    ((2, 4, 8, 16, 32), 4, True, 1),  # a pyramid from stride 4 leaves the stem's stride-2 map out
    ((2, 4, 8, 8, 8), 8, False, 4),  # a dilated run: the deepest feature at that stride
    ((2, 4, 8, 8, 8), 8, True, 2),  # a pyramid starts at its first
    ((4, 8, 16, 32), 4, False, 0),  # HRNet
    ((8, 16, 32), 4, True, 0),  # no stride-4 feature: the pyramid starts at the finest there is
])
def test_feature_at_stride(strides, stride, or_coarser, index):
    assert feature_at_stride(types.SimpleNamespace(strides=strides), stride, or_coarser=or_coarser) == index


@pytest.mark.parametrize("strides, or_coarser", [((8, 16, 32), False), ((2,), True), ((2,), False)])
def test_feature_at_stride_names_the_strides_when_there_is_none(strides, or_coarser):
    with pytest.raises(ConfigError, match=rf"needs a stride-4 feature, .* strides {re.escape(str(strides))}"):
        feature_at_stride(types.SimpleNamespace(strides=strides), 4, or_coarser=or_coarser)


def test_timm_combination_it_cannot_build_is_a_config_error():
    with pytest.raises(ConfigError, match="timm model 'vit_tiny_patch16_224' cannot be built with output_stride 8"):
        build_encoder("timm:vit_tiny_patch16_224", output_stride=8)


def fake_weights(tmp_path, name: str = "resnet18"):
    """A torchvision ImageNet-shaped state dict (random) in a fresh TORCH_HOME, at the cache path."""
    reference = getattr(torchvision.models, name)(weights=None).state_dict()
    path = tmp_path / "hub" / "checkpoints" / os.path.basename(
        torchvision.models.get_model_weights(name).IMAGENET1K_V1.url)
    path.parent.mkdir(parents=True)
    torch.save(reference, path)
    return reference, path


@pytest.mark.parametrize("from_cache", [True, False])
def test_pretrained_weights_from_the_cache_or_a_local_file(monkeypatch, tmp_path, from_cache):
    reference, path = fake_weights(tmp_path)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", pytest.fail)  # the cache is used: no download
    encoder = build_encoder("resnet18", output_stride=8, pretrained=True,
                            weights_path=None if from_cache else str(path))
    loaded = encoder.state_dict()
    assert set(loaded) == {k for k in reference if not k.startswith("fc.")}
    assert all(torch.equal(value, reference[key]) for key, value in loaded.items())
    assert encoder.pretrained_normalization == IMAGENET_MEAN_STD


def test_pretrained_weights_are_downloaded_into_the_cache(monkeypatch, tmp_path):
    reference = torchvision.models.resnet18(weights=None).state_dict()
    urls = []

    def download(url, dst, progress=True):
        urls.append(url)
        torch.save(reference, dst)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    encoder = build_encoder("resnet18", pretrained=True)
    assert urls == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url]
    assert (tmp_path / "hub" / "checkpoints" / RESNET18_FILE).is_file()
    assert torch.equal(encoder.conv1.weight, reference["conv1.weight"])


def test_offline_without_the_file_says_where_to_put_it(monkeypatch, tmp_path):
    def offline(url, dst, progress=True):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(ConfigError) as info:
        build_encoder("resnet18", pretrained=True)
    message = str(info.value)
    assert str(tmp_path / "hub" / "checkpoints" / RESNET18_FILE) in message
    assert torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url in message
    assert "name resolution" in message and "weights_path" in message
    with pytest.raises(ConfigError, match="weights_path .*missing.pth does not exist"):
        build_encoder("resnet18", pretrained=True, weights_path=str(tmp_path / "missing.pth"))


def test_corrupt_or_foreign_weights_file_is_named(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read weights file .*broken.pth"):
        build_encoder("resnet18", pretrained=True, weights_path=str(broken))
    foreign = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), foreign)
    # Every tensor of resnet18 is in resnet34's file, with its shape: its blocks more give it away.
    with pytest.raises(CheckpointError, match=r"resnet34.pth: all 100 tensors of torchvision's resnet18 match by "
                                              r"name and shape, but the file has 80 more inside its modules "
                                              r"\(layer1.2.conv1.weight, .*another network"):
        build_encoder("resnet18", pretrained=True, weights_path=str(foreign))


def test_weights_path_without_pretrained_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="pretrained is false"):
        build_encoder("resnet18", weights_path=str(tmp_path / "w.pth"))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", pytest.param("vgg16_bn", marks=slow)])
@pytest.mark.parametrize("in_channels", [1, 4])
def test_other_input_channels_adapt_the_pretrained_first_conv(monkeypatch, tmp_path, name, in_channels):
    reference, _ = fake_weights(tmp_path, name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    encoder = build_encoder(name, pretrained=True, in_channels=in_channels)
    first = next(m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d))
    rgb = reference[next(k for k in reference if k.endswith("weight") and reference[k].dim() == 4)]
    expected = rgb.sum(1, keepdim=True) if in_channels == 1 else rgb[:, [0, 1, 2, 0]] * 3 / 4
    assert torch.allclose(first.weight, expected)
    assert [s[1] for s in shapes(encoder, (64, 64), in_channels)] == list(encoder.out_channels)
    assert encoder.pretrained_normalization is None  # ImageNet's RGB statistics do not apply


def test_timm_in_channels_and_local_weights(tmp_path):
    import timm

    full = timm.create_model("resnet10t")
    path = tmp_path / "resnet10t.pth"
    torch.save(full.state_dict(), path)
    encoder = build_encoder("timm:resnet10t", pretrained=True, weights_path=str(path))
    assert torch.equal(encoder.net.conv1[0].weight, full.conv1[0].weight)
    assert encoder.pretrained_normalization == IMAGENET_MEAN_STD
    gray = build_encoder("timm:resnet10t", in_channels=1)
    assert shapes(gray, (64, 64), 1)[-1] == (1, 512, 2, 2)
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read weights file .*resnet10t.pth: .*Unsupported operand"):
        build_encoder("timm:resnet10t", pretrained=True, weights_path=str(path))


@pytest.fixture
def hf_cache(monkeypatch, tmp_path):
    """An empty Hugging Face cache that is never allowed to reach the network."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def test_timm_weights_from_its_cache(hf_cache):
    import timm
    from safetensors.torch import save_file

    full = timm.create_model("resnet10t")
    repo = hf_cache / "models--timm--resnet10t.c3_in1k"
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    save_file(full.state_dict(), repo / "snapshots" / ("0" * 40) / "model.safetensors")
    encoder = build_encoder("timm:resnet10t", pretrained=True)
    assert torch.equal(encoder.net.layer4[0].conv1.weight, full.layer4[0].conv1.weight)


def test_timm_offline_without_its_cache_says_what_to_do(hf_cache):
    with pytest.raises(ConfigError, match=r"weights of timm model 'resnet10t' are not in timm's cache "
                                          rf"\({hf_cache}\) and cannot be downloaded.*weights_path"):
        build_encoder("timm:resnet10t", pretrained=True)


# timm's other feature formats: channels-last features (Swin, MambaOut) and single-stride ViTs.
TIMM_FAMILIES = [
    ("timm:resnet18", "UPerNet", {}),  # a CNN
    ("timm:swin_tiny_patch4_window7_224", "UPerNet", {"dynamic_img_size": True}),  # NHWC features
    ("timm:vit_small_patch16_224", "DeepLabV3", {"dynamic_img_size": True}),  # every feature at stride 16
    ("timm:convnext_tiny", "UPerNet", {}),
]
DECODER_ARGS = {"UPerNet": {"channels": 32}, "DeepLabV3": {"output_stride": 16}}


def timm_backbone(name: str, args: dict):
    """A ``backbone`` value: the name alone, or the name with timm.create_model arguments."""
    return {"type": name, "args": args} if args else name


@pytest.mark.parametrize("backbone, model, args", TIMM_FAMILIES, ids=[b for b, _, _ in TIMM_FAMILIES])
def test_timm_families_train_a_step_on_a_non_square_input(backbone, model, args):
    from utils.registry import MODELS

    torch.manual_seed(0)
    spec = {"type": model, "args": {"backbone": timm_backbone(backbone, args), **DECODER_ARGS[model]}}
    MODELS.validate(spec, "arch", injected=("num_classes",))
    net = MODELS.build(spec, "arch", num_classes=3).train()
    x, target = torch.randn(2, 3, 64, 96), torch.randint(0, 3, (2, 64, 96))
    with torch.no_grad():
        feats = net.backbone(x)
    assert [f.shape[1] for f in feats] == list(net.backbone.out_channels)
    assert [(64 // s, 96 // s) for s in net.backbone.strides] == [tuple(f.shape[-2:]) for f in feats]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    before = [p.detach().clone() for p in net.backbone.parameters()]
    out = net(x)["out"]
    assert out.shape == (2, 3, 64, 96)
    torch.nn.functional.cross_entropy(out, target).backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, net.backbone.parameters()))


def test_timm_encoder_args_are_checked_with_the_config():
    check_encoder_name({"type": "timm:vit_small_patch16_224", "args": {"img_size": [64, 96]}}, "b")
    with pytest.raises(ConfigError, match=r"^b.args: .*only.* timm"):
        check_encoder_name({"type": "resnet18", "args": {"img_size": 64}}, "b")
    with pytest.raises(ConfigError, match=r"^b.args.in_chans: .*in_channels"):
        check_encoder_name({"type": "timm:resnet18", "args": {"in_chans": 1}}, "b")
    with pytest.raises(ConfigError, match=r"^b.typo: unknown key"):
        check_encoder_name({"type": "timm:resnet18", "typo": 1}, "b")
    with pytest.raises(ConfigError, match=r"timm model 'resnet18' cannot be built .*not_an_arg"):
        build_encoder({"type": "timm:resnet18", "args": {"not_an_arg": 1}})


def test_vit_with_a_fixed_size_says_how_to_take_other_sizes():
    encoder = build_encoder({"type": "timm:vit_tiny_patch16_224", "args": {"img_size": [64, 96]}})
    assert encoder.strides == (16, 16, 16)
    assert shapes(encoder, (64, 96))[-1] == (1, 192, 4, 6)
    with pytest.raises(ConfigError, match=r"got a 96x64 input .*dynamic_img_size.*img_size"):
        shapes(encoder, (96, 64))


def test_decoders_that_need_several_strides_say_so_for_a_vit():
    from utils.registry import MODELS

    with pytest.raises(ConfigError, match=r"stride-4 feature, .* strides \(16, 16, 16\)"):
        MODELS.build({"type": "DeepLabV3Plus", "args": {"backbone": "timm:vit_tiny_patch16_224",
                                                        "output_stride": 16}}, "arch", num_classes=3)
