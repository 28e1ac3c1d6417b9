"""FCN-8s (Long et al. 2015): VGG16 scores fused with pool4's and pool3's, learned upsampling."""
from __future__ import annotations

import logging

import torch
from torch import nn

from models.backbones import EncoderName, feature_at_stride
from models.blocks import BilinearUpsample, pad_to_multiple
from models.encoder_head import EncoderModel
from utils.registry import MODELS

_log = logging.getLogger(__name__)


@MODELS.register
class FCN8s(EncoderModel):
    """Encoder (stride 32) -> fc6 (7x7) and fc7 (1x1) as convolutions -> scores, upsampled 2x and
    summed with the stride-16 feature's scores, again 2x with the stride-8 feature's, then 8x.

    Where it departs from the paper: the encoder is VGG16 with BatchNorm
    (``vgg16_bn``, or any stride-32 encoder), and instead of padding the input by
    100 pixels and cropping every skip, the input is zero-padded to a multiple of
    32 so each upsampling is exact (transposed convolutions started as bilinear
    interpolation, one per class); the scores are cropped back. The skip score
    layers start at zero, as in the paper, so training starts from the
    stride-32 prediction.

    fc6 and fc7 are VGG16's first two fully connected layers made convolutions, as in
    the paper: with ``pretrained`` on ``vgg16_bn`` and ``fc_channels`` 4096 they start
    from its ImageNet ``classifier.0`` (4096 x 25088 reshaped to 4096 x 512 x 7 x 7) and
    ``classifier.3`` (4096 x 4096 x 1 x 1); otherwise (another encoder or width, or a
    weights file without them) at random, and the encoder's ``weights_notes`` say so.

    Args:
        backbone, pretrained, weights_path, in_channels, freeze_bn, freeze_backbone: the encoder
            arguments (at output stride 32), see ``EncoderModel`` in models/encoder_head.py.
        fc_channels: channels of fc6 and fc7 (4096 in the paper).

    Shape:
        ``(N, in_channels, H, W)`` -> ``{"out": (N, num_classes, H, W)}``.
    """

    def __init__(self, num_classes: int, backbone: EncoderName = "vgg16_bn", pretrained: bool = False,
                 weights_path: str | None = None, in_channels: int = 3, fc_channels: int = 4096,
                 freeze_bn: bool = False, freeze_backbone: bool = False) -> None:
        super().__init__(num_classes, backbone, 32, pretrained, weights_path, in_channels, keep_classifier=True)
        channels = self.backbone.out_channels
        self.skips = (feature_at_stride(self.backbone, 16), feature_at_stride(self.backbone, 8))
        self.head = nn.Sequential(
            nn.Conv2d(channels[-1], fc_channels, kernel_size=7, padding=3), nn.ReLU(inplace=True), nn.Dropout2d(),
            nn.Conv2d(fc_channels, fc_channels, kernel_size=1), nn.ReLU(inplace=True), nn.Dropout2d(),
            nn.Conv2d(fc_channels, num_classes, kernel_size=1))
        self.skip_scores = nn.ModuleList(nn.Conv2d(channels[i], num_classes, kernel_size=1) for i in self.skips)
        for score in self.skip_scores:
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)
        self.up2 = nn.ModuleList(BilinearUpsample(num_classes, 2) for _ in self.skips)
        self.up8 = BilinearUpsample(num_classes, 8)
        self._start_from_classifier()
        self.apply_freezing(freeze_bn, freeze_backbone)

    def _start_from_classifier(self) -> None:
        """Copy VGG's ``classifier.0`` and ``classifier.3`` into fc6 and fc7, reshaped (the paper's
        "convolutionalization"); the encoder kept them for this and lets them go here."""
        state = self.backbone.__dict__.pop("classifier_state", None)
        source = self.backbone.__dict__.pop("classifier_source", None)
        if state is None:  # not a pretrained VGG: nothing to start from
            return
        fc6, fc7 = self.head[0], self.head[3]
        wanted = {"classifier.0.weight": fc6.weight, "classifier.0.bias": fc6.bias,
                  "classifier.3.weight": fc7.weight, "classifier.3.bias": fc7.bias}
        if any(key not in state or state[key].numel() != param.numel() or state[key].shape[0] != param.shape[0]
               for key, param in wanted.items()):
            shapes = {k: tuple(v.shape) for k, v in state.items()} or "none"
            note = (f"FCN8s: fc6 and fc7 start at random: they are {tuple(fc6.weight.shape)} and "
                    f"{tuple(fc7.weight.shape)}, and {source} has as VGG16's classifier.0 and classifier.3: {shapes}")
        else:
            with torch.no_grad():
                for key, param in wanted.items():
                    param.copy_(state[key].view_as(param))
            note = (f"FCN8s: fc6 and fc7 start from VGG16's fully connected classifier.0 and classifier.3 of "
                    f"{source}, reshaped to {tuple(fc6.weight.shape)} and {tuple(fc7.weight.shape)}")
        self.backbone.weights_notes.append(note)
        _log.info(note)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        height, width = x.shape[-2:]
        feats = self.backbone(pad_to_multiple(x, 32))
        y = self.head(feats[-1])
        for index, score, up in zip(self.skips, self.skip_scores, self.up2):
            y = up(y) + score(feats[index])
        return {"out": self.up8(y)[..., :height, :width]}
