"""The bases of the models built on an encoder of :mod:`models.backbones`.

:class:`EncoderModel` builds the encoder from the encoder arguments every such model
takes, and describes them once; :class:`EncoderHeadModel` is the shape shared by FCN,
DeepLabV3 and PSPNet: a head on the encoder's last feature and an optional auxiliary
head on the feature before it (the stride-16 stage of a dilated ResNet).
"""
from __future__ import annotations

import torch
from torch import nn

from base.base_model import BaseModel
from models.backbones import EncoderName, build_encoder
from models.blocks import aux_head as make_aux_head


class EncoderModel(BaseModel):
    """Base class: a decoder on the encoder ``self.backbone``, built from the encoder arguments.

    The encoder arguments, shared by the models built on an encoder (each model's
    docstring points here for them and describes only its own):

    Args:
        num_classes: output channels (injected by the framework).
        backbone: the encoder: a registered one (``resnet50``, ``mobilenet_v2``, ``vgg16_bn``,
            ``hrnet_w48``...) or ``"timm:<model>"``, see :func:`models.backbones.build_encoder`.
        output_stride, pretrained, weights_path, in_channels: the encoder's, see
            :func:`models.backbones.build_encoder`.
        freeze_bn: keep every BatchNorm in eval mode while training (for small batches).
        freeze_backbone: fix the encoder's weights (and its batch-norm statistics). For both see
            :meth:`base.base_model.BaseModel.apply_freezing`, which a model's constructor calls last.

    A subclass (not the config) may pass ``keep_classifier=True`` to get the pretrained fully
    connected layers its head reuses as ``self.backbone.classifier_state`` (see
    :func:`models.backbones.build_encoder`); it deletes them once taken.
    """

    def __init__(self, num_classes: int, backbone: EncoderName, output_stride: int, pretrained: bool,
                 weights_path: str | None, in_channels: int, *, keep_classifier: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = build_encoder(backbone, output_stride=output_stride, pretrained=pretrained,
                                      weights_path=weights_path, in_channels=in_channels,
                                      keep_classifier=keep_classifier)


class EncoderHeadModel(EncoderModel):
    """Base class: encoder -> :meth:`make_head` on the last feature -> bilinear upsampling.

    A subclass implements :meth:`make_head`; one with these arguments (FCN,
    DeepLabV3) needs no constructor of its own.

    Args:
        backbone, output_stride, pretrained, weights_path, in_channels, freeze_bn, freeze_backbone:
            the encoder arguments, see :class:`EncoderModel`.
        aux_head: add an FCN head on the second-to-last feature (stride 16 stage), output ``aux`` in training.

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}`` (and ``"aux"`` in training).
    """

    def __init__(self, num_classes: int, backbone: EncoderName = "resnet50", output_stride: int = 8,
                 pretrained: bool = False, weights_path: str | None = None, in_channels: int = 3,
                 aux_head: bool = False, freeze_bn: bool = False, freeze_backbone: bool = False) -> None:
        super().__init__(num_classes, backbone, output_stride, pretrained, weights_path, in_channels)
        self.head = self.make_head(self.backbone)
        self.aux = make_aux_head(self.backbone.out_channels[-2], num_classes) if aux_head else None
        self.apply_freezing(freeze_bn, freeze_backbone)

    def make_head(self, encoder: nn.Module) -> nn.Module:
        """The main head on the encoder's last feature (read ``out_channels``, ``strides`` and
        ``self.num_classes``); it maps that feature to the logits."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        out = {"out": self.resize_to(self.head(feats[-1]), x.shape[-2:])}
        if self.aux is not None and self.training:
            out["aux"] = self.resize_to(self.aux(feats[-2]), x.shape[-2:])
        return out
