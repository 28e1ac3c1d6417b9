"""FCN (Long et al. 2015) as torchvision builds it: an FCN head on a dilated encoder."""
from __future__ import annotations

from torchvision.models.segmentation.fcn import FCNHead

from models.backbones import EncoderName
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
        super().__init__(num_classes, encoder, lambda built: FCNHead(built.out_channels[-1], num_classes),
                         aux_head, freeze_bn, freeze_backbone)
