"""Building the configured objects from a validated config.

Each function takes the *resolved* config (see :func:`utils.config.load_config`)
and injects what the framework knows (number of classes, ignore index, seed,
the model's parameters...), so nothing is repeated in the config.
"""
from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from base.base_dataloader import BaseDataLoader
from base.base_dataset import BaseDataSet, ClassInfo
from models.norm import convert_norm
from utils import distributed
from utils.config import LOADER_KEYS, norm_spec
from utils.errors import ConfigError
from utils.registry import DATASETS, LOSSES, MODELS, NORMS, OPTIMIZERS, SCHEDULERS, TRANSFORMS


def dataset_class(config: dict) -> type[BaseDataSet]:
    """The data set class of the run: it knows the classes, palette and normalisation."""
    return DATASETS.get(config["train_loader"]["type"], "train_loader.type")


def dataset_info(config: dict) -> ClassInfo:
    """The classes, palette and statistics of the run's data set as configured.

    Benchmarks have them as class attributes; ``Folder`` reads them from its
    config args (or the ``classes.json`` beside the data).
    """
    return dataset_class(config).info(config["train_loader"]["args"])


def dataset_meta(config: dict, normalization: tuple[Sequence[float], Sequence[float]] | None = None) -> dict:
    """What inference needs without data on disk; saved in every checkpoint.

    ``normalization``: the input ``(mean, std)`` the model is trained with
    (see :func:`input_normalization`); default: the data set's own.
    """
    info = dataset_info(config)
    mean, std = normalization if normalization is not None else (info.mean, info.std)
    return {"arch": config["arch"]["type"], "dataset": config["train_loader"]["type"],
            "num_classes": info.num_classes, "class_names": list(info.class_names),
            "palette": [list(c) for c in info.palette], "mean": list(mean), "std": list(std),
            "ignore_index": config["ignore_index"]}


def input_normalization(config: dict, model: nn.Module) -> tuple[tuple, tuple, str]:
    """The input ``(mean, std)`` of a new run and where it comes from.

    A pretrained encoder expects the statistics it was trained with (ImageNet's
    for torchvision's weights and most of timm's); a network trained from
    scratch gets the data set's own.
    """
    pretrained = model.pretrained_normalization() if hasattr(model, "pretrained_normalization") else None
    if pretrained is not None:
        return tuple(pretrained[0]), tuple(pretrained[1]), "the pretrained encoder's"
    info = dataset_info(config)
    return tuple(info.mean), tuple(info.std), f"the data set's ({config['train_loader']['type']})"


def gives_fixed_size(transforms: Sequence) -> bool:
    """Whether these transforms always output one size (a crop or a resize to [h, w] comes last of those
    that set the size); the data set's own sizes are not assumed. Transforms say so with ``fixed_size``."""
    fixed = False
    for transform in transforms:
        fixed = getattr(transform, "fixed_size", fixed)
    return fixed


def build_loader(config: dict, key: str, device: torch.device | None = None) -> BaseDataLoader:
    """The data loader of ``config[key]`` (``train_loader`` or ``val_loader``) feeding ``device``."""
    spec = config[key]
    args = dict(spec["args"])
    loader_args = {name: args.pop(name) for name in LOADER_KEYS}
    ignore_index = config["ignore_index"]
    transforms = [TRANSFORMS.build(t, f"{key}.args.transforms[{i}]", ignore_index=ignore_index)
                  for i, t in enumerate(loader_args.pop("transforms"))]
    dataset = DATASETS.build({"type": spec["type"], "args": args}, key, ignore_index=ignore_index,
                             seed=config["seed"], transforms=transforms)
    if loader_args["pin_memory"] is None:
        loader_args["pin_memory"] = device is not None and device.type == "cuda"
    subset = loader_args.pop("subset")
    if subset is not None:
        dataset.restrict(subset)
    # Training shards must be even under torchrun; validation shards must not repeat images.
    return BaseDataLoader(dataset, seed=config["seed"], even_shards=key == "train_loader", **loader_args)


def build_model(config: dict, pretrained: bool = True) -> nn.Module:
    """The configured model; ``pretrained=False`` skips loading ImageNet weights.

    Loading a checkpoint (inference, resume) overwrites every weight, so it
    should not need the ImageNet file on the machine.
    """
    spec = config["arch"]
    if not pretrained and spec["args"].get("pretrained"):
        spec = {**spec, "args": {**spec["args"], "pretrained": False, "weights_path": None}}
    args = {k: v for k, v in spec["args"].items() if k != "norm"}  # every model's; applied below
    model = MODELS.build({**spec, "args": args}, "arch", num_classes=dataset_info(config).num_classes)
    norm = NORMS.build(norm_spec(config), "norm")
    # After the pretrained weights are in: batch norm keeps their statistics, other norms their scales.
    model.norm_summary = convert_norm(model, norm)
    return model


def build_loss(config: dict, train_dataset: BaseDataSet, key: str = "loss") -> nn.Module | None:
    """The loss of ``config[key]`` (``loss`` or ``aux_loss``; None when that is null).

    It receives whichever of the framework's facts its constructor declares.
    """
    if config[key] is None:
        return None
    return LOSSES.build(config[key], key, ignore_index=config["ignore_index"],
                        num_classes=train_dataset.num_classes(), train_dataset=train_dataset,
                        cache_dir=str(Path(config["cache_dir"])))


def build_optimizer(config: dict, model: nn.Module) -> torch.optim.Optimizer:
    spec = config["optimizer"]
    factor = spec["backbone_lr_factor"] if spec["differential_lr"] else None
    groups = model.param_groups(spec["args"]["lr"], factor)
    return OPTIMIZERS.build({"type": spec["type"], "args": spec["args"]}, "optimizer", params=groups)


def build_scheduler(config: dict, optimizer: torch.optim.Optimizer, iters_per_epoch: int):
    return SCHEDULERS.build(config["lr_scheduler"], "lr_scheduler", optimizer=optimizer,
                            num_epochs=config["trainer"]["epochs"], iters_per_epoch=iters_per_epoch)


def select_device(name: str | None) -> torch.device:
    """``cuda`` when available unless ``name`` says otherwise; under torchrun, the local GPU."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ConfigError(f"--device {name}: expected cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if distributed.launched_by_torchrun():
            if name != "cuda":
                raise ConfigError(f"--device {name}: under torchrun each process takes the GPU of its "
                                  "LOCAL_RANK; use --device cuda")
            name = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return torch.device(name)


def make_dir(path: Path, option: str) -> None:
    """Create a folder (and its parents); a path that cannot be one is a user error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot create the folder ({exc.strerror})") from exc
