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
        num_classes: output channels (injected by the framework).
        backbone, output_stride, pretrained, weights_path, in_channels: the encoder,
            see ``build_encoder`` in models/backbones.py.
        bins: output sizes of the pyramid's pooling branches.
        aux_head: add an FCN head on the second-to-last feature (stride 16 stage), output ``aux`` in training.
        freeze_bn: keep every BatchNorm in eval mode while training (for small batches).
        freeze_backbone: fix the encoder's weights (and its batch-norm statistics).

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}`` (and ``"aux"`` in training).
    """

    def __init__(self, num_classes: int, backbone: EncoderName = "resnet50", output_stride: int = 8,
                 pretrained: bool = False, weights_path: str | None = None, in_channels: int = 3,
                 bins: tuple[int, ...] = (1, 2, 3, 6), aux_head: bool = True, freeze_bn: bool = False,
                 freeze_backbone: bool = False) -> None:
        encoder = {"name": backbone, "output_stride": output_stride, "pretrained": pretrained,
                   "weights_path": weights_path, "in_channels": in_channels}

        def head(built) -> nn.Sequential:
            ppm = PPM(built.out_channels[-1], built.out_channels[-1] // len(bins), bins)
            return nn.Sequential(ppm, ConvBNReLU(ppm.out_channels, 512), nn.Dropout(0.1),
                                 nn.Conv2d(512, num_classes, kernel_size=1))

        super().__init__(num_classes, encoder, head, aux_head, freeze_bn, freeze_backbone)
