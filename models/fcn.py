"""FCN (Long et al. 2015) as torchvision builds it: an FCN head on a dilated encoder."""
from __future__ import annotations

from torch import nn
from torchvision.models.segmentation.fcn import FCNHead

from models.encoder_head import EncoderHeadModel
from utils.registry import MODELS


@MODELS.register
class FCN(EncoderHeadModel):
    """Encoder at output stride 8 -> 3x3 conv + 1x1 classifier -> bilinear upsampling.

    The head is torchvision's ``FCNHead`` on the last feature, so with
    ``backbone="resnet50"``, ``output_stride=8`` and ``aux_head=true`` this is
    torchvision's ``fcn_resnet50`` parameter for parameter (see
    :func:`models.convert.from_torchvision`). The paper's skip-fusion FCN-8s is ``FCN8s``.

    Args:
        backbone, output_stride, pretrained, weights_path, in_channels, aux_head, freeze_bn, freeze_backbone:
            the encoder and head arguments, see ``EncoderHeadModel`` in models/encoder_head.py.
    """

    def make_head(self, encoder: nn.Module) -> FCNHead:
        return FCNHead(encoder.out_channels[-1], self.num_classes)
