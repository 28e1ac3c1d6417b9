"""DeepLabV3 (Chen et al. 2017): ASPP on a dilated encoder, with torchvision's head."""
from __future__ import annotations

from torch import nn
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from models.blocks import aspp_rates
from models.encoder_head import EncoderHeadModel
from utils.registry import MODELS


@MODELS.register
class DeepLabV3(EncoderHeadModel):
    """Encoder -> torchvision's ``DeepLabHead`` (ASPP, 3x3 conv, classifier) -> bilinear upsampling.

    The ASPP rates follow the output stride (12, 24, 36 at 8, see
    :func:`models.blocks.aspp_rates`). With ``backbone="resnet50"``,
    ``output_stride=8`` and ``aux_head=true`` this is torchvision's
    ``deeplabv3_resnet50`` parameter for parameter (see :func:`models.convert.from_torchvision`).

    Args:
        backbone, output_stride, pretrained, weights_path, in_channels, aux_head, freeze_bn, freeze_backbone:
            the encoder and head arguments, see ``EncoderHeadModel`` in models/encoder_head.py.
    """

    def make_head(self, encoder: nn.Module) -> DeepLabHead:
        return DeepLabHead(encoder.out_channels[-1], self.num_classes, aspp_rates(encoder.strides[-1]))
