"""Convert a config of the pytorch-segmentation template into this framework's.

    python -m tools.migrate OLD.json -o NEW.json

The template's loader flags (``base_size``, ``crop_size``, ``augment``,
``scale``, ``flip``, ``rotate``, ``blur``, ``val``) become the equivalent list
of joint transforms, its names (data sets, models, losses, metrics) become
ours, and its defaults that differ from ours are written out. Every change is
printed, and so is anything that could not be mapped (left as it was, for the
user to fix); the result is then validated like any config.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

from utils.errors import ConfigError, run_command
from utils.files import write_json
from utils.template import TEMPLATE_DATASETS, TEMPLATE_LOADER_FLAGS, looks_like_template  # noqa: F401

MODEL_NAMES = {"DeepLab": "DeepLabV3Plus", "DeepLab_DUC_HDC": "DUCHDC", "FCN8": "FCN8s", "UperNet": "UPerNet",
               "UNetResnet": "UNet"}
MODEL_ARGS = {"use_aux": "aux_head"}
LOSS_NAMES = {"CrossEntropyLoss2d": "CrossEntropyLoss", "DiceLoss": "SoftDiceLoss", "FocalLoss": "FocalLoss",
              "CE_DiceLoss": "DiceCrossEntropyLoss", "LovaszSoftmax": "LovaszSoftmaxLoss"}
METRIC_NAMES = {"Mean_IoU": "mIoU", "Pixel_Accuracy": "pixel_acc", "val_loss": "val_loss"}
SPLIT_NAMES = {"ADE20K": {"training": "train", "validation": "val"},
               "COCO": {"train2017": "train", "val2017": "val"}}
#: The template's scale range of ``base_size`` (``scale: true``) and its rotation and blur.
SCALE_RANGE, ROTATE_DEGREES, BLUR_MAX_SIGMA = (0.5, 2.0), 10.0, 1.0


class Migration:
    """One conversion: the new config, the changes made and what could not be mapped."""

    def __init__(self, old: dict) -> None:
        self.config = copy.deepcopy(old)
        self.changes: list[str] = []
        self.unmapped: list[str] = []

    def change(self, path: str, old: Any, new: Any, why: str = "") -> None:
        self.changes.append(f"{path}: {_show(old)} -> {_show(new)}" + (f" ({why})" if why else ""))

    def run(self) -> dict:
        from utils.config import import_components
        from utils.registry import MODELS

        import_components()
        self._arch(MODELS)
        for key in ("train_loader", "val_loader"):
            if isinstance(self.config.get(key), dict):
                self._loader(key)
        self._loss()
        self._trainer()
        return self.config

    def _arch(self, models) -> None:
        arch = self.config.get("arch")
        if not isinstance(arch, dict) or "type" not in arch:
            return
        old_type = arch["type"]
        new_type = MODEL_NAMES.get(old_type, old_type)
        if new_type != old_type:
            arch["type"] = new_type
            self.change("arch.type", old_type, new_type)
        if new_type not in models:
            self.unmapped.append(f"arch.type: no model '{old_type}' here; available: {', '.join(models.names())}")
            return
        args = arch.setdefault("args", {})
        for old_name, new_name in MODEL_ARGS.items():
            if old_name in args:
                args[new_name] = args.pop(old_name)
                self.change(f"arch.args.{old_name}", old_name, new_name, "renamed")
        accepted = models.parameters(new_type)
        if old_type == "UNetResnet" and "backbone" not in args:
            args["backbone"] = "resnet50"
            self.change("arch.args.backbone", None, "resnet50", "the template's UNetResnet encoder")
        if "pretrained" in accepted and "pretrained" not in args:
            args["pretrained"] = True  # the template's models loaded ImageNet weights unless told otherwise
            self.change("arch.args.pretrained", None, True, "the template's default; ours is false")
        for name in list(args):
            if name not in accepted:
                self.unmapped.append(f"arch.args.{name}: {new_type} has no such argument (left as it was)")

    def _loader(self, key: str) -> None:
        spec = self.config[key]
        old_type = spec.get("type")
        args = spec.setdefault("args", {})
        if old_type == "COCO":
            partition = args.pop("partition", "CocoStuff164k")
            new_type = "COCOStuff10k" if partition == "CocoStuff10k" else "COCOStuff164k"
            self.change(f"{key}.args.partition", partition, None, f"a data set of its own: {new_type}")
        else:
            new_type = TEMPLATE_DATASETS.get(old_type, old_type)
        if new_type != old_type:
            spec["type"] = new_type
            self.change(f"{key}.type", old_type, new_type)
        if old_type not in TEMPLATE_DATASETS:
            self.unmapped.append(f"{key}.type: '{old_type}' is not a data set of the template (left as it was)")
        split = args.get("split")
        new_split = SPLIT_NAMES.get(old_type, {}).get(split, split)
        if new_split != split:
            args["split"] = new_split
            self.change(f"{key}.args.split", split, new_split)
        if old_type == "VOC" and "data_dir" in args:
            new_dir = str(Path(args["data_dir"]) / "VOCdevkit" / "VOC2012")
            self.change(f"{key}.args.data_dir", args["data_dir"], new_dir, "ours points at the VOC2012 folder")
            args["data_dir"] = new_dir
        flags = {flag: args.pop(flag) for flag in TEMPLATE_LOADER_FLAGS if flag in args}
        if flags:
            transforms = self._val_transforms(key, flags) if flags.get("val") else self._train_transforms(
                key, flags, old_type)
            args["transforms"] = transforms
            names = [t["type"] for t in transforms] or "none"
            self.changes.append(f"{key}.args: {', '.join(f'{k}={v!r}' for k, v in flags.items())} -> "
                                f"transforms {names}")
        if key == "val_loader":
            self._val_batch(key, new_type, args)

    def _val_batch(self, key: str, dataset: str, args: dict) -> None:
        """Validation batches of several images need one size; else batch_size 1.

        The template cropped its validation images to one size; ours are scored whole, so a batch
        can only hold several when the data set's images have one size (``fixed_image_size``) and
        the transforms keep it, or the transforms give one size (see ``builder.gives_fixed_size``).
        """
        from builder import gives_fixed_size
        from utils.config import LOADER_KEYS
        from utils.registry import DATASETS, TRANSFORMS

        batch_size = args.get("batch_size", LOADER_KEYS["batch_size"].default)
        if not isinstance(batch_size, int) or batch_size <= 1:
            return
        one_size = dataset in DATASETS and DATASETS.get(dataset).fixed_image_size is not None
        try:
            transforms = [TRANSFORMS.build(t, f"{key}.args.transforms[{i}]", ignore_index=255)
                          for i, t in enumerate(args.get("transforms", []))]
        except (ConfigError, TypeError, ValueError):  # a transform left unmapped: its sizes are not known
            transforms = None
        if transforms is not None and gives_fixed_size(transforms, one_size):
            return
        args["batch_size"] = 1
        self.change(f"{key}.args.batch_size", batch_size, 1,
                    f"validation images are scored whole and {dataset}'s may differ in size: a batch of "
                    "several could not be stacked")

    def _train_transforms(self, key: str, flags: dict, dataset: str) -> list[dict]:
        """The template's ``_augmentation``: resize (scaled), rotate, crop, flip, blur, in that order."""
        if not flags.get("augment"):
            return []
        transforms = []
        if flags.get("base_size"):
            # The template sets the longer side to base_size; Resize sets the shorter one.
            short = flags["base_size"] // 2 if dataset == "CityScapes" else flags["base_size"]
            transforms.append({"type": "Resize", "args": {"size": short}})
            why = ("Cityscapes images are 2:1, so the shorter side is base_size / 2" if dataset == "CityScapes"
                   else "the template resized the longer side to base_size, Resize sets the shorter side: "
                        "lower it for images far from square")
            self.changes.append(f"{key}: base_size {flags['base_size']} -> Resize {short} ({why})")
            if flags.get("scale"):
                transforms.append({"type": "RandomScale",
                                   "args": {"min_scale": SCALE_RANGE[0], "max_scale": SCALE_RANGE[1]}})
        if flags.get("rotate"):
            transforms.append({"type": "RandomRotate", "args": {"degrees": ROTATE_DEGREES}})
        if flags.get("crop_size"):
            transforms.append({"type": "RandomCrop", "args": {"size": flags["crop_size"]}})
            self.changes.append(f"{key}: the crop pads labels with ignore_index (the template padded them "
                                "with 0, a real class)")
        if flags.get("flip"):
            transforms.append({"type": "RandomHorizontalFlip", "args": {"p": 0.5}})
        if flags.get("blur"):
            transforms.append({"type": "GaussianBlur", "args": {"p": 1.0, "max_sigma": BLUR_MAX_SIGMA}})
        return transforms

    def _val_transforms(self, key: str, flags: dict) -> list[dict]:
        """The template's ``_val_augmentation``: the shorter side to crop_size, then a centre crop."""
        if not flags.get("crop_size"):
            return []
        self.changes.append(f"{key}: no centre crop after the resize: every pixel of the resized image is "
                            "evaluated")
        return [{"type": "Resize", "args": {"size": flags["crop_size"]}}]

    def _loss(self) -> None:
        loss = self.config.get("loss")
        name = loss.get("type") if isinstance(loss, dict) else loss
        if name is None:
            return
        if name not in LOSS_NAMES:
            self.unmapped.append(f"loss: '{name}' is not a loss of the template (left as it was)")
            return
        if LOSS_NAMES[name] != name:
            new = LOSS_NAMES[name] if isinstance(loss, str) else {**loss, "type": LOSS_NAMES[name]}
            self.config["loss"] = new
            self.change("loss", name, LOSS_NAMES[name])

    def _trainer(self) -> None:
        trainer = self.config.get("trainer")
        if not isinstance(trainer, dict) or not isinstance(trainer.get("monitor"), str):
            return
        parts = trainer["monitor"].split()
        if len(parts) == 2 and parts[1] in METRIC_NAMES:
            new = f"{parts[0]} {METRIC_NAMES[parts[1]]}"
            if new != trainer["monitor"]:
                self.change("trainer.monitor", trainer["monitor"], new)
                trainer["monitor"] = new
        elif trainer["monitor"] != "off":
            self.unmapped.append(f"trainer.monitor: cannot read {trainer['monitor']!r} (left as it was)")


def _show(value: Any) -> str:
    return "(none)" if value is None else repr(value)


def migrate(old: dict) -> tuple[dict, list[str], list[str]]:
    """Returns the converted config, the changes made and what could not be mapped."""
    migration = Migration(old)
    return migration.run(), migration.changes, migration.unmapped


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.migrate",
                                     description="Convert a pytorch-segmentation template config.")
    parser.add_argument("old", help="the template's config.json")
    parser.add_argument("-o", "--output", required=True, help="where to write the converted config")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (1 when something could not be mapped, 2 on bad input)."""
    return run_command(run, parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Convert ``args.old`` into ``args.output`` and report; returns the exit code."""
    from utils.config import read_json, validate_config

    new, changes, unmapped = migrate(read_json(args.old))
    write_json(new, Path(args.output))
    print(f"Converted {args.old} -> {args.output}; {len(changes)} change(s):")
    for line in changes:
        print(f"  {line}")
    for line in unmapped:
        print(f"  NOT MAPPED {line}")
    try:
        validate_config(new)
    except ConfigError as exc:
        print(f"{args.output} does not validate yet:\n" + "\n".join(f"  {line}" for line in str(exc).splitlines()))
        return 1
    print(f"{args.output} is a valid config: python train.py -c {args.output}")
    return 1 if unmapped else 0


if __name__ == "__main__":
    sys.exit(main())
