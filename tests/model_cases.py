"""The models that the shared tests of ``tests/test_models.py`` build: one entry per model and
encoder family it supports.

Adding a model to the zoo adds one or more ``ModelCase`` entries here and no test code.
``args`` are the model's config ``args`` (``num_classes`` is injected); keep them small
so the shared tests stay fast on a CPU. The encoder families are torchvision's ResNets
(``resnet18``), its MobileNets (``mobilenet_v2``), VGG (``vgg16_bn``) and timm
(``timm:mobilenetv3_small_050``, a 0.3M-parameter network).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelCase:
    """One model configuration run through every shared test.

    Attributes:
        model: the registered model name (``arch.type``).
        args: its ``arch.args``.
        lr: Adam learning rate of the overfitting test.
    """

    model: str
    args: dict = field(default_factory=dict)
    lr: float = 3e-3

    @property
    def id(self) -> str:
        return f"{self.model}-{self.args.get('backbone', 'own encoder')}"


TIMM = "timm:mobilenetv3_small_050"
ENCODERS = ["resnet18", "mobilenet_v2", TIMM]
# Dilated models run their default output stride (8) on the ResNet, 16 on the others, to keep the tests fast.
DILATED = [{"backbone": "resnet18"}, {"backbone": "mobilenet_v2", "output_stride": 16},
           {"backbone": TIMM, "output_stride": 16}]



def _lr(encoder: dict) -> float:
    """The tiny timm MobileNet learns one batch in the test's steps only at a higher rate."""
    return 1e-2 if encoder["backbone"] == TIMM else 3e-3


CASES: list[ModelCase] = [
    *[ModelCase("FCN", {**encoder, "aux_head": True}, lr=_lr(encoder)) for encoder in DILATED],
    ModelCase("FCN8s", {"backbone": "vgg16_bn", "fc_channels": 64}),
    ModelCase("FCN8s", {"backbone": "resnet18", "fc_channels": 64}),
    *[ModelCase("DeepLabV3", {**encoder, "aux_head": True}, lr=_lr(encoder)) for encoder in DILATED],
    *[ModelCase("DeepLabV3Plus", {"backbone": b}) for b in ENCODERS],
    *[ModelCase("PSPNet", encoder, lr=_lr(encoder)) for encoder in DILATED],
    *[ModelCase("UPerNet", {"backbone": b, "channels": 64}, lr=_lr({"backbone": b})) for b in ENCODERS],
    # Positions must be learnt from zero padding alone (no pretrained features): a higher rate.
    ModelCase("UNet", {"base_channels": 16, "depth": 3}, lr=2e-2),
    ModelCase("UNet", {"base_channels": 16, "depth": 4, "upsampling": "transpose"}, lr=2e-2),
    *[ModelCase("UNet", {"backbone": b, "decoder_channels": [64, 32, 16, 16, 8]}, lr=lr)
      for b, lr in [("resnet18", 1e-2), ("mobilenet_v2", 1e-2), (TIMM, 1e-2), ("vgg16_bn", 1e-2)]],
    *[ModelCase("FPN", {"backbone": b, "pyramid_channels": 64, "segmentation_channels": 32}) for b in ENCODERS],
    *[ModelCase("GCN", {"backbone": b, "kernel_size": 7}) for b in ENCODERS],
    ModelCase("DUCHDC", {"backbone": "resnet18"}),
    # Model zoo part II.
    ModelCase("ENet", {}),
    ModelCase("HRNetV2", {"width": 18}),
    ModelCase("HRNetOCR", {"width": 18, "mid_channels": 64, "key_channels": 32}),
    ModelCase("MSOCR", {"width": 18, "mid_channels": 64, "key_channels": 32, "attention_channels": 16}),
    ModelCase("SegNet", {}),
    ModelCase("UPerNet", {"backbone": "hrnet_w18", "channels": 64}),  # HRNetV2 as another decoder's encoder
]
