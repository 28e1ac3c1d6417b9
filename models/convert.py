"""Converters from other projects' checkpoints to this zoo's parameter names."""
from __future__ import annotations

from collections.abc import Mapping

import torch

# torchvision's segmentation models name their heads ``classifier`` and ``aux_classifier``;
# their backbones keep the ResNet's own names, as ours do.
_TORCHVISION_PREFIXES = {"backbone.": "backbone.", "classifier.": "head.", "aux_classifier.": "aux."}


def from_torchvision(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a torchvision ``fcn_resnet*`` / ``deeplabv3_resnet*`` state dict onto our ``FCN`` / ``DeepLabV3``.

    Build ours with the same backbone, ``output_stride=8`` and ``num_classes``
    (and ``aux_head=true`` when the checkpoint has ``aux_classifier`` weights),
    then load the result; torchvision's COCO-trained checkpoints (21 classes)
    load this way::

        model = MODELS.build({"type": "DeepLabV3", "args": {"aux_head": True}}, "arch", num_classes=21)
        state = torch.load("deeplabv3_resnet50_coco-cd0a2569.pth", map_location="cpu", weights_only=True)
        model.load_state_dict(from_torchvision(state))

    Args:
        state_dict: torchvision's segmentation model state dict.

    Returns:
        The same tensors under our names.

    Raises:
        KeyError: a key of none of torchvision's segmentation parts (``backbone``,
            ``classifier``, ``aux_classifier``): the checkpoint is of another model.
    """
    converted = {}
    for key, value in state_dict.items():
        prefix = next((p for p in _TORCHVISION_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"{key!r} is not a key of a torchvision segmentation model "
                           f"(expected one starting with {', '.join(_TORCHVISION_PREFIXES)})")
        converted[_TORCHVISION_PREFIXES[prefix] + key[len(prefix):]] = value
    return converted
