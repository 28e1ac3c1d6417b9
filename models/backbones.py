"""Encoders shared by every model: one interface over torchvision's networks and timm's.

An encoder is an ``nn.Module`` whose ``forward(x)`` returns a list of feature maps,
highest resolution first, with two tuples read from the network when it is built
(never typed in), one entry per feature:

- ``out_channels``: the channels of each feature;
- ``strides``: how much smaller than the input each feature is (with dilation the
  strides stop growing: a ResNet at output stride 8 gives ``(2, 4, 8, 8, 8)``);

and ``pretrained_normalization``: the input ``(mean, std)`` its weights expect, or None.
Decoders read these instead of hard-coding channel counts. Build one with
:func:`build_encoder`; a model's ``backbone`` argument is typed :data:`EncoderName`,
so a misspelled name is reported when the config is validated.

The torchvision encoders are registered in ``BACKBONES`` (``resnet50``, ``mobilenet_v2``...);
any timm model is reachable as ``"timm:<name>"`` (``"timm:convnext_tiny"``).
"""
from __future__ import annotations

import os
import urllib.error
from collections.abc import Callable, Sequence
from typing import Annotated

import torch
from torch import nn
from torchvision import models as tvm

from utils.errors import CheckpointError, ConfigError
from utils.registry import BACKBONES, Check, did_you_mean

OUTPUT_STRIDES = (8, 16, 32)
#: The RGB statistics (0-1 range) of ImageNet, which torchvision's weights were trained with.
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TIMM_PREFIX = "timm:"
# Side of the blank image run through a new encoder to read its channels and strides.
_PROBE_SIZE = 64


class Encoder(nn.Module):
    """Base of the torchvision encoders: the interface described in the module docstring."""

    out_channels: tuple[int, ...]
    strides: tuple[int, ...]
    pretrained_normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    def _read_shapes(self, in_channels: int) -> None:
        """Set ``out_channels`` and ``strides`` from one forward pass of a blank image.

        Eval mode and no_grad, so batch-norm statistics are not touched.
        """
        training = self.training
        self.eval()
        with torch.no_grad():
            feats = self(torch.zeros(1, in_channels, _PROBE_SIZE, _PROBE_SIZE))
        self.train(training)
        self.out_channels = tuple(f.shape[1] for f in feats)
        self.strides = tuple(_PROBE_SIZE // f.shape[-1] for f in feats)


def set_dilation(block: nn.Module, rate: int) -> None:
    """Give every spatial (k > 1) convolution of ``block`` dilation ``rate``, keeping the size."""
    for conv in block.modules():
        if isinstance(conv, nn.Conv2d) and conv.kernel_size[0] > 1:
            conv.dilation = (rate, rate)
            conv.padding = tuple(rate * (k - 1) // 2 for k in conv.kernel_size)


def dilate_stage(blocks: Sequence[nn.Module], previous: int, dilation: int) -> None:
    """Trade a stage's stride 2 for dilation, in place, keeping its weights.

    Follows torchvision's ``replace_stride_with_dilation``: the stride-2 convolutions
    (in the first block) get stride 1, the first block keeps the ``previous`` rate and
    every later block gets ``dilation``. Unlike torchvision's, it works for any block
    (BasicBlock, inverted residuals), so every encoder family dilates the same way.
    """
    for index, block in enumerate(blocks):
        for conv in block.modules():
            if isinstance(conv, nn.Conv2d) and conv.stride == (2, 2):
                conv.stride = (1, 1)
        set_dilation(block, previous if index == 0 else dilation)


def dilation_plan(stage_strides: Sequence[int], output_stride: int) -> list[tuple[int, int, int]]:
    """``(stage index, previous rate, rate)`` for every stage whose stride exceeds ``output_stride``.

    ``stage_strides`` are the strides the stages reach without dilation; each stage
    past ``output_stride`` doubles the rate instead of halving the resolution.
    """
    plan, rate = [], 1
    for index, stride in enumerate(stage_strides):
        if stride > output_stride:
            plan.append((index, rate, rate * 2))
            rate *= 2
    return plan


def _adapt_first_conv(net: nn.Module, in_channels: int) -> None:
    """Replace the first convolution by one taking ``in_channels`` inputs.

    Its RGB filters are spread over the new channels so a pretrained network
    keeps its response scale: one channel gets their sum (a grey image then looks
    like the same grey RGB image), more channels get them repeated in turn and
    scaled by ``3 / in_channels`` (the rule timm uses).
    """
    parent, name, conv = next((parent, name, child) for parent in net.modules()
                              for name, child in parent.named_children() if isinstance(child, nn.Conv2d))
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None)
    with torch.no_grad():
        rgb = conv.weight
        if in_channels == 1:
            new.weight.copy_(rgb.sum(dim=1, keepdim=True))
        else:
            new.weight.copy_(rgb[:, [c % rgb.shape[1] for c in range(in_channels)]] * rgb.shape[1] / in_channels)
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    setattr(parent, name, new)


def weights_file(name: str, url: str, weights_path: str | None) -> str:
    """The local file of a torchvision network's ImageNet weights.

    ``weights_path`` when given; otherwise the torch hub cache
    (``$TORCH_HOME/hub/checkpoints``), downloading into it when the file is not
    there yet, as torchvision does. Without a network the ConfigError names the
    file, its URL and where to put it.
    """
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise ConfigError(f"pretrained: weights_path {weights_path} does not exist")
        return weights_path
    file_name = os.path.basename(url)
    cache_path = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
    if not os.path.isfile(cache_path):
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        try:
            torch.hub.download_url_to_file(url, cache_path, progress=False)
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(f"pretrained: the {name} ImageNet weights are not in the torch hub cache and "
                              f"cannot be downloaded ({exc}). Get '{file_name}' ({url}) and put it at "
                              f"{cache_path}, or set weights_path in the model's args to where it is.") from exc
    return cache_path


def load_state(net: nn.Module, path: str, unused: tuple[str, ...] = ()) -> None:
    """Load a state_dict file into ``net``; a CheckpointError naming the file if it fails.

    Keys starting with one of the ``unused`` prefixes (a classifier the encoder
    has no use for) are dropped; every other key must fit.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # A corrupt file can fail in many ways (UnpicklingError, EOFError, KeyError, RuntimeError).
    except Exception as exc:
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"weights file {path} does not hold a state_dict (got {type(state).__name__})")
    try:
        net.load_state_dict({k: v for k, v in state.items() if not k.startswith(unused)} if unused else state)
    except RuntimeError as exc:
        raise CheckpointError(f"weights file {path} does not fit this network: {exc}") from exc


class ResNetEncoder(Encoder):
    """A torchvision ResNet/ResNeXt without its classifier: stem, layer1 ... layer4.

    Module names are torchvision's, so its state dicts map one to one.

    Shape:
        ``(N, C, H, W)`` -> five maps at strides ``(2, 4, 8, 16, 32)`` (OS 32),
        ``(2, 4, 8, 16, 16)`` (OS 16) or ``(2, 4, 8, 8, 8)`` (OS 8).
    """

    def __init__(self, net: tvm.ResNet, output_stride: int, in_channels: int) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        for index, previous, rate in dilation_plan((4, 8, 16, 32), output_stride):
            dilate_stage(list(getattr(self, f"layer{index + 1}")), previous, rate)
        self._read_shapes(in_channels)

    def stages(self) -> list[nn.Sequential]:
        """layer1 ... layer4, the stages made of residual blocks."""
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        feats = [stem, self.layer1(self.maxpool(stem))]
        for layer in (self.layer2, self.layer3, self.layer4):
            feats.append(layer(feats[-1]))
        return feats


class FeaturesEncoder(Encoder):
    """A torchvision network whose ``features`` is a plain sequence (MobileNets, VGG).

    The stages are found from the network: a module that halves the resolution
    starts a new stage. MobileNets end a stage with the last block before the next
    downsampling (``tap="before"``, as their inverted residuals downsample first);
    VGG's stages end with their max-pool (``tap="after"``: pool1 ... pool5).

    Shape:
        ``(N, C, H, W)`` -> five maps at strides ``(2, 4, 8, 16, 32)`` at OS 32.
    """

    def __init__(self, features: nn.Sequential, output_stride: int, in_channels: int, tap: str) -> None:
        super().__init__()
        self.features = features
        starts = self._downsamplers(in_channels)
        stage_ends = starts[1:] + [len(features)]
        for index, previous, rate in dilation_plan([2 ** (i + 1) for i in range(len(starts))], output_stride):
            dilate_stage(list(features[starts[index]:stage_ends[index]]), previous, rate)
        self.taps = starts if tap == "after" else [end - 1 for end in stage_ends]
        self._read_shapes(in_channels)

    def _downsamplers(self, in_channels: int) -> list[int]:
        """Indices of the modules of ``features`` that halve the resolution."""
        self.eval()
        x, starts = torch.zeros(1, in_channels, _PROBE_SIZE, _PROBE_SIZE), []
        with torch.no_grad():
            for index, module in enumerate(self.features):
                size = x.shape[-1]
                x = module(x)
                if x.shape[-1] < size:
                    starts.append(index)
        self.train()
        return starts

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for index, module in enumerate(self.features):
            x = module(x)
            if index in self.taps:
                feats.append(x)
        return feats


def create_timm_features(encoder: nn.Module, name: str, pretrained: bool, weights_path: str | None,
                         in_channels: int, **args) -> nn.Module:
    """``timm.create_model(name, features_only=True, ...)`` with the framework's errors, for every timm encoder.

    Pretrained weights come from timm's cache (downloaded into it when online) or from the local
    file ``weights_path``. Sets ``out_channels``, ``strides`` and ``pretrained_normalization`` on
    ``encoder`` from the network's ``feature_info`` and ``pretrained_cfg``; returns the network.
    """
    import timm  # imported on demand: it takes seconds and most runs do not need it

    args = {"features_only": True, "in_chans": in_channels, **args}
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise ConfigError(f"pretrained: weights_path {weights_path} does not exist")
        args["pretrained_cfg_overlay"] = {"file": weights_path}
    try:
        net = timm.create_model(name, pretrained=pretrained, **args)
    except Exception as exc:  # timm and huggingface_hub raise many types for a missing or bad file
        if weights_path is not None:
            raise CheckpointError(f"cannot load weights file {weights_path} into timm model "
                                  f"'{name}': {exc}") from exc
        from huggingface_hub.constants import HF_HUB_CACHE
        raise ConfigError(f"pretrained: the weights of timm model '{name}' are not in timm's cache "
                          f"({HF_HUB_CACHE}) and cannot be downloaded ({type(exc).__name__}: {exc}). "
                          f"Download them on a machine with a network (timm.create_model('{name}', "
                          f"pretrained=True) fills that cache) and copy the cache over, or set "
                          f"weights_path in the model's args to a local weights file.") from exc
    encoder.out_channels = tuple(net.feature_info.channels())
    encoder.strides = tuple(net.feature_info.reduction())
    cfg = net.pretrained_cfg
    encoder.pretrained_normalization = ((tuple(cfg["mean"]), tuple(cfg["std"]))
                                        if pretrained and in_channels == 3 else None)
    return net


class TimmEncoder(nn.Module):
    """Any timm model through ``features_only=True``; channels and strides from its ``feature_info``.

    Pretrained weights come from timm's own cache (the Hugging Face hub cache),
    downloaded into it when online; ``weights_path`` loads a local file instead.
    ``in_channels`` and ``output_stride`` are passed to timm, which adapts the
    first convolution and dilates where the architecture allows it.
    """

    def __init__(self, name: str, output_stride: int, pretrained: bool, weights_path: str | None,
                 in_channels: int) -> None:
        super().__init__()
        import timm  # imported on demand: it takes seconds and most runs do not need it

        dilation = {"output_stride": output_stride} if output_stride != 32 else {}
        try:  # a bad combination (output stride, channels) is found on the meta device, for free
            with torch.device("meta"):
                timm.create_model(name, pretrained=False, features_only=True, in_chans=in_channels, **dilation)
        except (ValueError, TypeError, AssertionError, RuntimeError, NotImplementedError) as exc:
            raise ConfigError(f"timm model '{name}' cannot be built with output_stride {output_stride} "
                              f"and in_channels {in_channels}: {exc}") from exc
        self.net = create_timm_features(self, name, pretrained, weights_path, in_channels, **dilation)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.net(x))


def _vgg16_bn_features(weights: None = None) -> nn.Module:
    """torchvision's VGG16-BN without its classifier: 120M parameters an encoder would drop.

    Its ``features`` are torchvision's (same layers, names and initialisation).
    """
    net = nn.Module()
    net.features = tvm.vgg.make_layers(tvm.vgg.cfgs["D"], batch_norm=True)
    for conv in net.features.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
    return net


def _torchvision(make: Callable[..., nn.Module], imagenet: tvm.WeightsEnum, wrap: Callable,
                 output_strides: tuple[int, ...], name: str | None = None,
                 unused: tuple[str, ...] = ()) -> Callable[..., Encoder]:
    """A builder of one torchvision encoder: network, ImageNet weights, channel adaptation, wrapper."""
    def build(output_stride: int = 32, pretrained: bool = False, weights_path: str | None = None,
              in_channels: int = 3) -> Encoder:
        if output_stride not in output_strides:
            raise ConfigError(f"output_stride {output_stride} is not available for {name}: choose "
                              f"{' or '.join(map(str, output_strides))}")
        net = make(weights=None)
        if pretrained:
            load_state(net, weights_file(name, imagenet.url, weights_path), unused)
        if in_channels != 3:
            _adapt_first_conv(net, in_channels)
        encoder = wrap(net, output_stride, in_channels)
        # ImageNet's RGB statistics say nothing about other channels: the data set's are used then.
        encoder.pretrained_normalization = IMAGENET_MEAN_STD if pretrained and in_channels == 3 else None
        return encoder

    name = name or make.__name__
    build.__name__ = name
    build.__doc__ = f"torchvision's {name} as an encoder; see :func:`build_encoder`."
    return build


def _mobilenet(net: nn.Module, output_stride: int, in_channels: int) -> FeaturesEncoder:
    return FeaturesEncoder(net.features, output_stride, in_channels, tap="before")


def _vgg(net: nn.Module, output_stride: int, in_channels: int) -> FeaturesEncoder:
    return FeaturesEncoder(net.features, output_stride, in_channels, tap="after")


for _make, _weights, _wrap, _strides in [
    (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.resnet152, tvm.ResNet152_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.resnext50_32x4d, tvm.ResNeXt50_32X4D_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.resnext101_32x8d, tvm.ResNeXt101_32X8D_Weights.IMAGENET1K_V1, ResNetEncoder, OUTPUT_STRIDES),
    (tvm.mobilenet_v2, tvm.MobileNet_V2_Weights.IMAGENET1K_V1, _mobilenet, OUTPUT_STRIDES),
    (tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V1, _mobilenet, OUTPUT_STRIDES),
]:
    BACKBONES.register(_torchvision(_make, _weights, _wrap, _strides), name=_make.__name__)
# VGG has no residual stages to dilate without changing what its weights compute: stride 32 only.
BACKBONES.register(_torchvision(_vgg16_bn_features, tvm.VGG16_BN_Weights.IMAGENET1K_V1, _vgg, (32,),
                                name="vgg16_bn", unused=("classifier.",)), name="vgg16_bn")


def check_encoder_name(name: str, path: str) -> None:
    """Config validation of a ``backbone`` argument: a registered name or ``timm:<model>``."""
    if name.startswith(TIMM_PREFIX):
        import timm

        model = name[len(TIMM_PREFIX):]
        choices = timm.list_models()
        if model.split(".")[0] not in choices:  # a pretrained tag may follow: convnext_tiny.fb_in1k
            raise ConfigError(f"{path}: unknown timm model '{model}'.{did_you_mean(model, choices)} "
                              "timm.list_models() lists them")
        return
    if name not in BACKBONES:
        raise ConfigError(f"{path}: unknown backbone '{name}'.{did_you_mean(name, BACKBONES.names())} "
                          f"Available: {', '.join(BACKBONES.names())}, or '{TIMM_PREFIX}<name>' for any "
                          "timm model")


#: The type of a model's ``backbone`` argument, checked when the config is validated.
EncoderName = Annotated[str, Check(check_encoder_name)]
#: The same for models whose ``backbone`` may be null (an encoder of their own).
OptionalEncoderName = Annotated[str | None,
                                Check(lambda name, path: name is None or check_encoder_name(name, path))]


def build_encoder(name: EncoderName, *, output_stride: int = 32, pretrained: bool = False,
                  weights_path: str | None = None, in_channels: int = 3) -> nn.Module:
    """Build an encoder.

    Args:
        name: a registered torchvision encoder (``resnet50``, ``mobilenet_v3_large``,
            ``vgg16_bn``...) or ``"timm:<model>"``.
        output_stride: 8, 16 or 32 where the network allows it (by dilation); others
            are a ConfigError naming the choices.
        pretrained: load ImageNet weights: torchvision's from the torch hub cache
            (``$TORCH_HOME/hub/checkpoints``), timm's from its Hugging Face cache;
            downloaded into that cache when missing and the machine is online.
        weights_path: a local weights file to load instead of the cache
            (a torchvision classification state dict, or a timm checkpoint).
        in_channels: image channels; the first convolution is adapted when not 3.

    Returns:
        The encoder (see the module docstring for its interface).
    """
    check_encoder_name(name, "backbone")
    if weights_path is not None and not pretrained:
        raise ConfigError("weights_path is set but pretrained is false; set pretrained to true to load "
                          "it, or remove weights_path")
    if in_channels < 1:
        raise ConfigError(f"in_channels must be at least 1, got {in_channels}")
    if name.startswith(TIMM_PREFIX):
        return TimmEncoder(name[len(TIMM_PREFIX):], output_stride, pretrained, weights_path, in_channels)
    return BACKBONES.get(name, "backbone")(output_stride=output_stride, pretrained=pretrained,
                                           weights_path=weights_path, in_channels=in_channels)


def feature_at_stride(encoder: nn.Module, stride: int, or_coarser: bool = False) -> int:
    """Index of the ``encoder`` feature that a decoder takes at ``stride`` (4: the 1/4-resolution one).

    By default the last feature at exactly ``stride`` (the deepest, where a dilated
    encoder has several): the skip a decoder fuses at that resolution (DeepLabV3+'s
    stride-4 one, FCN-8s's stride-8 and 16 ones); a ConfigError if there is none.
    With ``or_coarser`` the first feature at ``stride`` or coarser: where a pyramid
    that starts at that resolution starts (FPN, UPerNet and GCN from stride 4, so a
    stem's stride-2 map is left out), its first feature when all are coarser.
    """
    strides = tuple(encoder.strides)
    if or_coarser and strides[-1] >= stride:
        return next(index for index, s in enumerate(strides) if s >= stride)
    if stride not in strides:
        raise ConfigError(f"the decoder needs a stride-{stride} feature, but this backbone's features have "
                          f"strides {strides}; use a backbone (or output_stride) that has one")
    return len(strides) - 1 - strides[::-1].index(stride)
