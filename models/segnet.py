"""SegNet (Badrinarayanan et al. 2017): a VGG16-BN encoder and a mirrored decoder that unpools by its indices."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from base.base_model import BaseModel
from models.backbones import build_encoder
from models.blocks import ConvBNReLU, max_unpool2x, pad_to_multiple
from utils.registry import MODELS


@MODELS.register
class SegNet(BaseModel):
    """VGG16-BN's 13 convolutions and 5 max-pools (indices kept), then a decoder that mirrors them.

    Each decoder stage max-unpools with the indices of its encoder stage's pool
    (sparse maps, no learned upsampling) and densifies them with as many 3x3
    ConvBNReLU as that encoder stage has convolutions, the last one reducing to
    the width of the next shallower stage; the final convolution is a 3x3
    classifier, as in the paper (29.4 M parameters with 11 classes).

    Args:
        num_classes: output channels (injected by the framework).
        pretrained: start the encoder from torchvision's ImageNet VGG16-BN weights.
        weights_path: a local weights file to load instead of the torch hub cache.
        in_channels: image channels.
        freeze_bn: keep every BatchNorm in eval mode while training (for small batches).

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}``; other sizes than
        multiples of 32 are zero-padded, then the logits cropped.
    """

    STRIDE = 32

    def __init__(self, num_classes: int, pretrained: bool = False, weights_path: str | None = None,
                 in_channels: int = 3, freeze_bn: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.backbone = build_encoder("vgg16_bn", pretrained=pretrained, weights_path=weights_path,
                                      in_channels=in_channels)
        convs_per_stage, count = [], 0
        for module in self.backbone.features:
            count += isinstance(module, nn.Conv2d)
            if isinstance(module, nn.MaxPool2d):
                convs_per_stage.append(count)
                count = 0
        widths = self.backbone.out_channels
        self.decoder = nn.ModuleList()
        for stage in reversed(range(len(widths))):
            width, target = widths[stage], widths[stage - 1] if stage else widths[0]
            layers = [ConvBNReLU(width, width) for _ in range(convs_per_stage[stage] - 1)]
            layers.append(ConvBNReLU(width, target) if stage else nn.Conv2d(width, num_classes, 3, padding=1))
            self.decoder.append(nn.Sequential(*layers))
        self.apply_freezing(freeze_bn)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        x = pad_to_multiple(x, self.STRIDE)
        indices = []
        for module in self.backbone.features:
            if isinstance(module, nn.MaxPool2d):  # the encoder's own pool, keeping where the maxima were
                x, where = F.max_pool2d(x, module.kernel_size, module.stride, module.padding, return_indices=True)
                indices.append(where)
            else:
                x = module(x)
        for stage, where in zip(self.decoder, reversed(indices)):
            x = stage(max_unpool2x(x, where))
        return {"out": x[..., :height, :width]}
