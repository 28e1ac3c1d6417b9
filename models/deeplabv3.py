"""DeepLabV3 (Chen et al. 2017): ASPP on a dilated encoder, with torchvision's head."""
from __future__ import annotations

from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from models.backbones import EncoderName
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
        encoder = {"name": backbone, "output_stride": output_stride, "pretrained": pretrained,
                   "weights_path": weights_path, "in_channels": in_channels}
        def head(built) -> DeepLabHead:  # ASPP rates follow the encoder's output stride
            return DeepLabHead(built.out_channels[-1], num_classes, aspp_rates(built.strides[-1]))

        super().__init__(num_classes, encoder, head, aux_head, freeze_bn, freeze_backbone)
