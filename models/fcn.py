"""FCN (Long et al. 2015) as torchvision builds it: an FCN head on a dilated encoder."""
from __future__ import annotations

import torch
from torchvision.models.segmentation.fcn import FCNHead

from base.base_model import BaseModel
from models.backbones import EncoderName, build_encoder
from models.blocks import aux_head as make_aux_head
from utils.registry import MODELS


@MODELS.register
class FCN(BaseModel):
    """Encoder at output stride 8 -> 3x3 conv + 1x1 classifier -> bilinear upsampling.

    The head is torchvision's ``FCNHead`` on the last feature, so with
    ``backbone="resnet50"``, ``output_stride=8`` and ``aux_head=true`` this is
    torchvision's ``fcn_resnet50`` parameter for parameter (see
    :func:`models.convert.from_torchvision`). The paper's skip-fusion FCN-8s is ``FCN8s``.

    Args:
        num_classes: output channels (injected by the framework).
        backbone, output_stride, pretrained, weights_path, in_channels: the encoder,
            see ``build_encoder`` in models/backbones.py.
        aux_head: add an FCN head on the second-to-last feature (stride 16 stage), output ``aux`` in training.
        freeze_bn: keep every BatchNorm in eval mode while training (for small batches).
        freeze_backbone: fix the encoder's weights (and its batch-norm statistics).

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}`` (and ``"aux"`` in training).
    """

    def __init__(self, num_classes: int, backbone: EncoderName = "resnet50", output_stride: int = 8,
                 pretrained: bool = False, weights_path: str | None = None, in_channels: int = 3,
                 aux_head: bool = False, freeze_bn: bool = False, freeze_backbone: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = build_encoder(backbone, output_stride=output_stride, pretrained=pretrained,
                                      weights_path=weights_path, in_channels=in_channels)
        channels = self.backbone.out_channels
        self.head = FCNHead(channels[-1], num_classes)
        self.aux = make_aux_head(channels[-2], num_classes) if aux_head else None
        self.bn_frozen = freeze_bn
        if freeze_backbone:
            self.freeze_backbone()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        out = {"out": self.resize_to(self.head(feats[-1]), x.shape[-2:])}
        if self.aux is not None and self.training:
            out["aux"] = self.resize_to(self.aux(feats[-2]), x.shape[-2:])
        return out
