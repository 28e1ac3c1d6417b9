"""The vocabulary of the pytorch-segmentation template's configs, to recognise one.

``train.py`` uses it to suggest ``python -m tools.migrate``; the migrator to convert.
"""
from __future__ import annotations

#: Data set names of the template -> ours (COCO depends on its ``partition``).
TEMPLATE_DATASETS = {"VOC": "PascalVOC", "CityScapes": "Cityscapes", "ADE20K": "ADE20K", "COCO": "COCOStuff164k"}

#: Loader flags of the template's data sets, which our transforms replace.
TEMPLATE_LOADER_FLAGS = ("base_size", "crop_size", "augment", "scale", "flip", "rotate", "blur", "val")


def looks_like_template(config: dict) -> bool:
    """Whether ``config`` has at least two marks of a template config (its loader flags, data set
    names, ``CrossEntropyLoss2d`` or a ``Mean_IoU`` monitor)."""
    marks = 0
    for key in ("train_loader", "val_loader"):
        loader = config.get(key)
        if isinstance(loader, dict):
            args = loader.get("args")
            marks += isinstance(args, dict) and any(flag in args for flag in TEMPLATE_LOADER_FLAGS)
            marks += loader.get("type") in TEMPLATE_DATASETS and loader.get("type") not in TEMPLATE_DATASETS.values()
    marks += config.get("loss") == "CrossEntropyLoss2d"
    trainer = config.get("trainer")
    marks += isinstance(trainer, dict) and "Mean_IoU" in str(trainer.get("monitor", ""))
    return marks >= 2
