"""Building the configured objects from a validated config.

Each function takes the *resolved* config (see :func:`utils.config.load_config`)
and injects what the framework knows (number of classes, ignore index, seed,
the model's parameters...), so nothing is repeated in the config.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from base.base_dataloader import BaseDataLoader
from base.base_dataset import BaseDataSet
from utils.config import LOADER_KEYS
from utils.registry import DATASETS, LOSSES, MODELS, OPTIMIZERS, SCHEDULERS, TRANSFORMS


def dataset_class(config: dict) -> type[BaseDataSet]:
    """The data set class of the run: it knows the classes, palette and normalisation."""
    return DATASETS.get(config["train_loader"]["type"], "train_loader.type")


def dataset_meta(config: dict) -> dict:
    """What inference needs without data on disk; saved in every checkpoint."""
    cls = dataset_class(config)
    return {"arch": config["arch"]["type"], "dataset": config["train_loader"]["type"],
            "num_classes": cls.num_classes(), "class_names": list(cls.class_names),
            "palette": [list(c) for c in cls.palette], "mean": list(cls.mean), "std": list(cls.std),
            "ignore_index": config["ignore_index"]}


def build_loader(config: dict, key: str) -> BaseDataLoader:
    """The data loader of ``config[key]`` (``train_loader`` or ``val_loader``)."""
    spec = config[key]
    args = dict(spec["args"])
    loader_args = {name: args.pop(name) for name in LOADER_KEYS}
    ignore_index = config["ignore_index"]
    transforms = [TRANSFORMS.build(t, f"{key}.args.transforms[{i}]", ignore_index=ignore_index)
                  for i, t in enumerate(loader_args.pop("transforms"))]
    dataset = DATASETS.build({"type": spec["type"], "args": args}, key, ignore_index=ignore_index,
                             seed=config["seed"], transforms=transforms)
    subset = loader_args.pop("subset")
    if subset is not None:
        dataset.restrict(subset)
    return BaseDataLoader(dataset, seed=config["seed"], **loader_args)


def build_model(config: dict) -> nn.Module:
    return MODELS.build(config["arch"], "arch", num_classes=dataset_class(config).num_classes())


def build_loss(config: dict, train_dataset: BaseDataSet) -> nn.Module:
    """The loss; it receives whichever of the framework's facts its constructor declares."""
    spec = config["loss"]
    available = {"ignore_index": config["ignore_index"], "num_classes": train_dataset.num_classes(),
                 "train_dataset": train_dataset, "cache_dir": str(Path(config["cache_dir"]))}
    wanted = LOSSES.parameters(spec["type"])
    return LOSSES.build(spec, "loss", **{k: v for k, v in available.items() if k in wanted})


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
    import os

    from utils.errors import ConfigError

    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if name == "cuda" and "LOCAL_RANK" in os.environ:
            name = f"cuda:{os.environ['LOCAL_RANK']}"
    elif name != "cpu":
        raise ConfigError(f"--device {name}: expected cpu, cuda or cuda:N")
    return torch.device(name)
