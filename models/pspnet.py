"""PSPNet (Zhao et al. 2017): a pyramid pooling module on a dilated encoder."""
from __future__ import annotations

from torch import nn

from models.backbones import EncoderName
from models.blocks import PPM, ConvBNReLU
from models.encoder_head import EncoderHeadModel
from utils.registry import MODELS


@MODELS.register
class PSPNet(EncoderHeadModel):
    """Encoder (output stride 8) -> PPM (bins 1, 2, 3, 6) -> 3x3 conv -> classifier -> upsampling.

    As in the paper each pooling branch has a quarter of the last feature's
    channels (512 on ResNet-50), the fused map 512, and the auxiliary head
    (on by default, as the paper trains with it) sits on the stride-16 stage.

    Args:
        bins: output sizes of the pyramid's pooling branches.
        backbone, output_stride, pretrained, weights_path, in_channels, aux_head, freeze_bn, freeze_backbone:
            the encoder and head arguments, see ``EncoderHeadModel`` in models/encoder_head.py.
    """

    def __init__(self, num_classes: int, backbone: EncoderName = "resnet50", output_stride: int = 8,
                 pretrained: bool = False, weights_path: str | None = None, in_channels: int = 3,
                 bins: tuple[int, ...] = (1, 2, 3, 6), aux_head: bool = True, freeze_bn: bool = False,
                 freeze_backbone: bool = False) -> None:
        # Read by make_head, which the base constructor calls (a plain value may be set before nn.Module's).
        self.bins = bins
        super().__init__(num_classes, backbone, output_stride, pretrained, weights_path, in_channels,
                         aux_head, freeze_bn, freeze_backbone)

    def make_head(self, encoder: nn.Module) -> nn.Sequential:
        ppm = PPM(encoder.out_channels[-1], encoder.out_channels[-1] // len(self.bins), self.bins)
        return nn.Sequential(ppm, ConvBNReLU(ppm.out_channels, 512), nn.Dropout(0.1),
                             nn.Conv2d(512, self.num_classes, kernel_size=1))
