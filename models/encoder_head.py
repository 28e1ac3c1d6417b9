"""The shape shared by FCN, DeepLabV3 and PSPNet: a head on the encoder's last feature and an
optional auxiliary head on the feature before it (the stride-16 stage of a dilated ResNet)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from base.base_model import BaseModel
from models.backbones import build_encoder
from models.blocks import aux_head as make_aux_head


class EncoderHeadModel(BaseModel):
    """Base class; subclasses declare their config arguments and pass the head to build.

    Args:
        num_classes: output channels.
        encoder: the keyword arguments of ``build_encoder`` (``name``, ``output_stride``...).
        make_head: builds the main head from the encoder (it reads ``out_channels`` and ``strides``).
        aux_head: add the auxiliary head; its output ``aux`` is returned in training mode only.
        freeze_bn, freeze_backbone: see :class:`base.base_model.BaseModel`.
    """

    def __init__(self, num_classes: int, encoder: dict, make_head: Callable[[nn.Module], nn.Module],
                 aux_head: bool, freeze_bn: bool, freeze_backbone: bool) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = build_encoder(**encoder)
        self.head = make_head(self.backbone)
        self.aux = make_aux_head(self.backbone.out_channels[-2], num_classes) if aux_head else None
        self.bn_frozen = freeze_bn
        if freeze_backbone:
            self.freeze_backbone()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        out = {"out": self.resize_to(self.head(feats[-1]), x.shape[-2:])}
        if self.aux is not None and self.training:
            out["aux"] = self.resize_to(self.aux(feats[-2]), x.shape[-2:])
        return out
