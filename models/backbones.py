"""Encoders shared by every model: torchvision ResNets with named stage outputs.

Each depth is registered in ``BACKBONES`` as ``resnet18`` ... ``resnet152``, so a model
config reads ``"backbone": "resnet50"``. Models build them with :func:`build_backbone`
and read ``out_channels``/``strides`` instead of hard-coding channel counts.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import Bottleneck

from utils.errors import CheckpointError, ConfigError
from utils.registry import BACKBONES

OUTPUT_STRIDES = (8, 16, 32)
#: The RGB statistics (0-1 range) of ImageNet, which torchvision's weights were trained with.
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# depth -> (constructor, ImageNet weights whose file name the hub cache uses)
_RESNETS: dict[int, tuple[Callable[..., tvm.ResNet], tvm.WeightsEnum]] = {
    18: (tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1),
    34: (tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1),
    50: (tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V1),
    101: (tvm.resnet101, tvm.ResNet101_Weights.IMAGENET1K_V1),
    152: (tvm.resnet152, tvm.ResNet152_Weights.IMAGENET1K_V1),
}


def dilate_stage(stage: nn.Module, dilation: int) -> None:
    """Trade a stage's stride for dilation, in place, keeping its weights.

    Stride-2 convolutions (the 3x3 and the 1x1 shortcut) get stride 1, and every
    3x3 convolution gets ``dilation`` with padding ``dilation`` so the spatial
    size is kept. Works for BasicBlock and Bottleneck alike (torchvision's own
    ``replace_stride_with_dilation`` refuses BasicBlock). Every block of the
    stage gets the same rate, as in the original DeepLab ResNets.
    """
    for conv in stage.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        if conv.stride == (2, 2):
            conv.stride = (1, 1)
        if conv.kernel_size == (3, 3):
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)


def _weights_file(name: str, url: str, weights_path: str | None) -> str:
    """The local weights file; a ConfigError naming where to put it if it is missing."""
    file_name = os.path.basename(url)
    cache_path = os.path.join(torch.hub.get_dir(), "checkpoints", file_name)
    path = weights_path or cache_path
    if not os.path.isfile(path):
        problem = (f"weights_path {weights_path} does not exist" if weights_path
                   else f"the {name} ImageNet weights are not in the torch hub cache")
        raise ConfigError(f"pretrained: {problem}. Downloads are disabled: get '{file_name}' ({url}) "
                          f"and put it at {cache_path}, or set weights_path in the model's args to "
                          f"where it is.")
    return path


def _load(net: tvm.ResNet, path: str) -> None:
    """Load a torchvision ResNet state_dict; a CheckpointError naming the file if it fails."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # A corrupt file can fail in many ways (UnpicklingError, EOFError, KeyError, RuntimeError).
    except Exception as exc:
        raise CheckpointError(f"cannot read weights file {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"weights file {path} does not hold a state_dict "
                              f"(got {type(state).__name__})")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"weights file {path} does not fit this network: {exc}") from exc


class ResNetBackbone(nn.Module):
    """A torchvision ResNet without its classifier, returning every stage.

    Args:
        depth: 18, 34, 50, 101 or 152.
        output_stride: 8, 16 or 32; below 32, layer4 (and at 8 also layer3)
            use dilation instead of stride.
        pretrained: load ImageNet weights (never downloaded, see :func:`_weights_file`).
        weights_path: a torchvision ResNet state_dict; default is the torch hub cache.

    Shape:
        ``(N, 3, H, W)`` -> dict ``{stage: (N, out_channels[stage], ~H/s, ~W/s)}``
        with ``s = strides[stage]``, stages ``stem`` and ``layer1`` ... ``layer4``.
    """

    def __init__(self, depth: int, output_stride: int = 32, pretrained: bool = False,
                 weights_path: str | None = None) -> None:
        super().__init__()
        if depth not in _RESNETS:
            raise ValueError(f"depth must be one of {tuple(_RESNETS)}, got {depth}")
        if output_stride not in OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride}")
        if weights_path is not None and not pretrained:
            raise ValueError("weights_path is set but pretrained is false; set pretrained to true "
                             "to load it, or remove weights_path")
        make, imagenet = _RESNETS[depth]
        net = make(weights=None)
        if pretrained:
            _load(net, _weights_file(f"resnet{depth}", imagenet.url, weights_path))
        self.pretrained_normalization = IMAGENET_MEAN_STD if pretrained else None
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        # Each stage halves the resolution until output_stride is reached, then dilates instead.
        self.strides = {"stem": 2, "layer1": 4, "layer2": 8,
                        "layer3": min(16, output_stride), "layer4": min(32, output_stride)}
        if output_stride <= 16:
            dilate_stage(self.layer4, 32 // output_stride)
        if output_stride == 8:
            dilate_stage(self.layer3, 2)
        self.out_channels = {"stem": self.conv1.out_channels}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            block = getattr(self, name)[-1]
            last_conv = block.conv3 if isinstance(block, Bottleneck) else block.conv2
            self.out_channels[name] = last_conv.out_channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = {"stem": self.relu(self.bn1(self.conv1(x)))}
        feats["layer1"] = self.layer1(self.maxpool(feats["stem"]))
        feats["layer2"] = self.layer2(feats["layer1"])
        feats["layer3"] = self.layer3(feats["layer2"])
        feats["layer4"] = self.layer4(feats["layer3"])
        return feats


def _register(depth: int) -> None:
    def build(output_stride: int = 32, pretrained: bool = False,
              weights_path: str | None = None) -> ResNetBackbone:
        return ResNetBackbone(depth, output_stride, pretrained, weights_path)

    build.__doc__ = f"ResNet-{depth} backbone; see :class:`ResNetBackbone`."
    BACKBONES.register(build, name=f"resnet{depth}")


for _depth in _RESNETS:
    _register(_depth)


#: The registered backbone names, as a type: a model's ``backbone`` argument is checked
#: against it when the config is validated, before anything is built.
BackboneName = Literal[tuple(BACKBONES.names())]


def build_backbone(name: BackboneName, output_stride: int = 32, pretrained: bool = False,
                   weights_path: str | None = None) -> ResNetBackbone:
    """Build the backbone registered as ``name`` (a ConfigError listing them if unknown)."""
    make = BACKBONES.get(name, "backbone")
    return make(output_stride=output_stride, pretrained=pretrained, weights_path=weights_path)
