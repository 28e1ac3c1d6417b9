"""The one place where a validated config becomes objects.

Each function takes the *resolved* config (see :func:`utils.config.load_config`)
and injects what the framework knows (number of classes, ignore index, seed,
the model's parameters...), so nothing is repeated in the config:
data sets and loaders, the model (with its norm layers and pretrained weights),
losses, optimizer and schedule, the trainer with its :class:`TrainerSettings`,
and a trained model from a checkpoint (:func:`load_trained`). Nothing below
this floor reads a config section; commands call these functions.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from timm.layers import convert_sync_batchnorm
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from base.base_dataloader import BaseDataLoader
from base.base_dataset import BaseDataSet, ClassInfo
from base.base_trainer import TrainerSettings
from models.norm import check_training_batches, convert_norm
from predictor import MODEL_FORMATS, Normalized, Predictor, exported_format, inference_settings, open_exported
from trainer import Trainer, amp_mode
from utils import distributed
from utils.checkpoint import load_checkpoint, load_matching_weights, load_model_weights
from utils.config import LOADER_KEYS, PROJECT_ROOT, load_config, norm_spec, read_config
from utils.errors import CheckpointError, ConfigError, DataError
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
            "ignore_index": config["ignore_index"],
            "label_args": dataset_class(config).label_args(config["train_loader"]["args"])}


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


def gives_fixed_size(transforms: Sequence, images_of_one_size: bool = False) -> bool:
    """Whether these transforms always output one size (a crop or a resize to [h, w] comes last of those
    that set the size). Transforms say so with ``fixed_size``.

    ``images_of_one_size``: the data set's images all have one size (its ``fixed_image_size``); they
    then keep one size through the transforms that set none, and through those whose size follows
    from the input's alone (``keeps_one_size``: ``Resize`` of the shorter side). By default the data
    set's own sizes are not assumed.
    """
    return _sizes_after(transforms, images_of_one_size)[0] == "one"


def _sizes_after(transforms: Sequence, images_of_one_size: bool) -> tuple[str, str | None]:
    """What sizes come out of ``transforms``: ``one``, ``varies`` (with the transform that makes them
    vary by chance) or ``unknown`` (the data set's own sizes, not declared)."""
    state, culprit = ("one" if images_of_one_size else "unknown"), None
    for transform in transforms:
        sets = getattr(transform, "fixed_size", None)
        if sets:
            state, culprit = "one", None
        elif sets is not None and not getattr(transform, "keeps_one_size", False):
            state, culprit = "varies", type(transform).__name__
    return state, culprit


def check_batches_of_one_size(key: str, dataset: BaseDataSet, batch_size: int) -> None:
    """Refuse batches of several images that cannot be stacked, before anything is trained.

    A batch needs images of one size. That is known when the transforms give one size, or when the
    data set says its images have one (``fixed_image_size``) and the transforms keep it; otherwise the
    sizes of the image files are read from their headers (no decoding), and the first two that differ
    are named. A data set whose samples are not image files is trusted.

    Raises:
        ConfigError: naming ``<key>.args.batch_size`` and the fix.
    """
    if batch_size <= 1:
        return
    state, culprit = _sizes_after(dataset.transforms, dataset.fixed_image_size is not None)
    fix = f"set {key}.args.batch_size to 1 (each image is then scored at its own size)"
    if state == "varies":
        raise ConfigError(f"{key}.args.batch_size: {batch_size} images a batch, but {key}.args.transforms give "
                          f"images of sizes that vary by chance ({culprit}), which no later crop or resize to "
                          f"[h, w] brings to one; {fix}")
    differ = _two_image_sizes(dataset) if state == "unknown" else None
    if differ is not None:
        (first, first_size), (other, other_size) = differ
        raise ConfigError(f"{key}.args.batch_size: {batch_size} images a batch, but the images differ in size "
                          f"({first_size[0]}x{first_size[1]} {first}, {other_size[0]}x{other_size[1]} {other}; "
                          f"height x width) and {key}.args.transforms do not bring them to one; {fix}")


def _two_image_sizes(dataset: BaseDataSet) -> tuple[tuple[str, tuple[int, int]], tuple[str, tuple[int, int]]] | None:
    """The first two images of ``dataset`` whose sizes differ, as ``(path, (height, width))``; None when
    every image has one size, or the samples are not image files that PIL can read the size of."""
    first = None
    for sample in dataset.samples:
        path = sample[0] if isinstance(sample, (tuple, list)) and sample else None
        if not isinstance(path, (str, Path)):
            return None
        try:
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
        except (OSError, ValueError, Image.DecompressionBombError):
            return None  # an unreadable image fails with its own message when it is loaded
        if first is None:
            first = (str(path), (height, width))
        elif first[1] != (height, width):
            return first, (str(path), (height, width))
    return None


def build_loader(config: dict, key: str, device: torch.device | None = None) -> BaseDataLoader:
    """The data loader of ``config[key]`` (``train_loader`` or ``val_loader``) feeding ``device``."""
    dataset = build_dataset(config, key)
    loader_args = {name: config[key]["args"][name] for name in LOADER_KEYS if name != "transforms"}
    if loader_args["pin_memory"] is None:
        loader_args["pin_memory"] = device is not None and device.type == "cuda"
    subset = loader_args.pop("subset")
    if subset is not None:
        dataset.restrict(subset)
    if key == "val_loader":  # a failure here would come after the first epochs of training
        check_batches_of_one_size(key, dataset, loader_args["batch_size"])
    # Training shards must be even under torchrun; validation shards must not repeat images.
    return BaseDataLoader(dataset, seed=config["seed"], even_shards=key == "train_loader", **loader_args)


def build_dataset(config: dict, key: str, transforms: bool = True) -> BaseDataSet:
    """The data set of ``config[key]`` (``train_loader`` or ``val_loader``), without the loader options.

    ``transforms=False`` leaves out its transforms: the raw files, as the doctor
    checks them. The loader's ``subset`` is not applied (see :func:`build_loader`).
    """
    spec = config[key]
    args = {name: value for name, value in spec["args"].items() if name not in LOADER_KEYS}
    check_data_dir(key, args)
    ignore_index = config["ignore_index"]
    built = [TRANSFORMS.build(t, f"{key}.args.transforms[{i}]", ignore_index=ignore_index)
             for i, t in enumerate(spec["args"]["transforms"])] if transforms else []
    return DATASETS.build({"type": spec["type"], "args": args}, key, ignore_index=ignore_index,
                          seed=config["seed"], transforms=built)


def check_data_dir(key: str, args: dict) -> None:
    """A missing ``data_dir`` is an error naming its config key and its absolute path."""
    data_dir = args.get("data_dir")
    if not isinstance(data_dir, str) or Path(data_dir).is_dir():
        return
    path = Path(data_dir).absolute()
    where = "is not a folder" if path.exists() else "does not exist"
    hint = ""
    if path.is_relative_to(PROJECT_ROOT):
        hint = (f" (a relative path in a config is read from the project root {PROJECT_ROOT}, "
                "not from the current directory)")
    raise DataError(f"{key}.args.data_dir: {path} {where}{hint}")


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
                        cache_dir=config["cache_dir"])


def build_optimizer(config: dict, model: nn.Module) -> torch.optim.Optimizer:
    spec = config["optimizer"]
    factor = spec["backbone_lr_factor"] if spec["differential_lr"] else None
    groups = model.param_groups(spec["args"]["lr"], factor)
    return OPTIMIZERS.build({"type": spec["type"], "args": spec["args"]}, "optimizer", params=groups)


def build_scheduler(config: dict, optimizer: torch.optim.Optimizer, iters_per_epoch: int):
    return SCHEDULERS.build(config["lr_scheduler"], "lr_scheduler", optimizer=optimizer,
                            num_epochs=config["trainer"]["epochs"], iters_per_epoch=iters_per_epoch)


def build_components(config: dict, device: torch.device, resuming: bool = False) -> dict:
    """Build every configured object; bad data or arguments fail here, before the run folder exists.

    When ``resuming``, ImageNet weights are not loaded (the checkpoint replaces them) and
    ``init_from`` is ignored. ``init`` in the result reports what ``init_from`` loaded.
    """
    train_loader = build_loader(config, "train_loader", device)
    val_loader = build_loader(config, "val_loader", device) if config["val_loader"] is not None else None
    if len(train_loader) == 0:
        raise ConfigError(f"train_loader: {len(train_loader.dataset)} samples make no full batch of "
                          f"batch_size {train_loader.batch_size} (drop_last is true); lower batch_size")

    torch.manual_seed(config["seed"])  # weight initialisation
    model = build_model(config, pretrained=not resuming)
    sync_bn = synchronized_batch_norm(config)
    check_norm_batches(model, train_loader, sync_bn and device.type == "cuda")
    model = model.to(device)
    init = None
    if config["init_from"] is not None and not resuming:
        init = load_matching_weights(model, load_checkpoint(config["init_from"]), config["init_from"])
    if config["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(config, model)
    ema = None
    if config["trainer"]["ema"] is not None:
        # Averages buffers too (batch-norm statistics), so the average is a model of its own.
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config["trainer"]["ema"]["decay"]),
                            use_buffers=True)
    if config["compile"]:
        model.compile()  # in place: the module and its state_dict keys stay the same
    model = wrap_distributed(model, device, sync_bn)
    # Class weights count every training label, also when subset shortens the epochs.
    labels = train_loader.dataset
    if config["train_loader"]["args"]["subset"] is not None:
        labels = build_dataset(config, "train_loader", transforms=False)
    aux_loss = build_loss(config, labels, "aux_loss")
    steps_per_epoch = math.ceil(len(train_loader) / config["trainer"]["accumulate_steps"])
    return {"model": model, "train_loader": train_loader, "val_loader": val_loader, "optimizer": optimizer,
            "loss": build_loss(config, labels).to(device),
            "aux_loss": aux_loss.to(device) if aux_loss is not None else None,
            "lr_scheduler": build_scheduler(config, optimizer, steps_per_epoch), "ema": ema, "init": init}


def synchronized_batch_norm(config: dict) -> bool:
    """Whether batch norm is to be synchronised across processes (``use_synch_bn`` or ``norm: SyncBatchNorm``)."""
    return config["use_synch_bn"] or norm_spec(config)["type"] == "SyncBatchNorm"


def check_norm_batches(model: torch.nn.Module, loader, synchronized: bool) -> None:
    """The dry forward pass of :func:`models.norm.check_training_batches` for the smallest batch
    that ``loader`` gives (its last one, unless ``drop_last``), at the size of its first image."""
    image = loader.dataset[0][0]  # (H, W, C) uint8
    height, width, channels = image.shape if image.ndim == 3 else (*image.shape, 1)
    per_process, size = len(loader.sampler), loader.batch_size
    processes = distributed.get_world_size()
    if loader.drop_last or per_process % size == 0:
        batch, text = size, f"batch_size {size}" + (" (per process)" if processes > 1 else "")
    else:
        batch = per_process % size
        shard = f"{per_process} images per process" if processes > 1 else f"{per_process} images"
        text = (f"the last batch of each epoch ({batch} of {shard} at batch_size {size}, with drop_last "
                "false; set drop_last to true)")
    check_training_batches(model, (channels, height, width), batch, text, processes if synchronized else 1)


def wrap_distributed(model: torch.nn.Module, device: torch.device, sync_bn: bool) -> torch.nn.Module:
    """Under torchrun, DistributedDataParallel (with SyncBatchNorm on CUDA when asked); else the model."""
    if not distributed.is_distributed():
        return model
    if sync_bn and device.type == "cuda":
        # The converted layers take over the same parameter objects: the optimizer still holds them.
        # timm's conversion also handles its BatchNormAct2d (batch norm + activation in one layer).
        model = convert_sync_batchnorm(model)
    elif sync_bn:
        # torch's SyncBatchNorm raises on CPU tensors ("expected input tensor to be on GPU or XPU").
        warnings.warn("use_synch_bn: SyncBatchNorm needs CUDA; each CPU process keeps its own "
                      "batch statistics", stacklevel=1)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)


def trainer_settings(config: dict, device: torch.device, run_dir: Path,
                     tracker_runs: dict | None = None) -> TrainerSettings:
    """The loop's settings from the validated config, for a run writing to ``run_dir`` on ``device``
    (``tracker_runs``: the tracked runs a resumed run continues, from its checkpoint)."""
    section = config["trainer"]
    tb_dir = None
    if section["tensorboard"]:
        tb_dir = (Path(section["log_dir"]) / config["name"] / run_dir.name
                  if section["log_dir"] else run_dir / "tensorboard")
    names = {f.name for f in dataclasses.fields(TrainerSettings)}
    return TrainerSettings(**{k: v for k, v in section.items() if k in names},
                           seed=config["seed"], amp=amp_mode(config["amp"], device),
                           channels_last=config["channels_last"], aux_loss_weight=config["aux_loss_weight"],
                           ignore_index=config["ignore_index"], tensorboard_dir=tb_dir,
                           subset=config["train_loader"]["args"].get("subset"), record=config,
                           tracker_runs=dict(tracker_runs or {}), metrics=config.get("metrics"))


def build_trainer(config: dict, device: torch.device, run_dir: Path, components: dict | None = None,
                  meta: dict | None = None, tracker_runs: dict | None = None) -> Trainer:
    """The trainer of ``config``, writing to ``run_dir`` (which must exist on rank 0).

    ``meta`` (classes, palette, input normalisation) defaults to that of a new run;
    ``tracker_runs`` (a resumed checkpoint's) names the tracked runs to continue.
    """
    components = dict(components if components is not None else build_components(config, device))
    components.pop("init")
    if meta is None:
        mean, std, _ = input_normalization(config, getattr(components["model"], "module", components["model"]))
        meta = dataset_meta(config, (mean, std))
    return Trainer(**components, device=device, run_dir=run_dir, meta=meta,
                   settings=trainer_settings(config, device, run_dir, tracker_runs))


def read_run_config(path: str | None, state: dict, checkpoint_path: str) -> tuple[dict, dict | None]:
    """The resolved config (from ``path``, else the checkpoint's) and its ``inference`` section, if any.

    The section is taken out before validation because the whole-config
    validator does not know it; :func:`inference_settings` validates it.
    """
    if path is not None:
        raw = read_config(path)  # bases merged
    elif isinstance(state.get("config"), dict):
        raw = dict(state["config"])
    else:
        raise ConfigError(f"{checkpoint_path}: the checkpoint holds no config; pass one with -c")
    section = raw.pop("inference", None)
    try:
        config = load_config(None, base=raw)
    except ConfigError as exc:
        source = f"{path}: " if path is not None else ""
        raise ConfigError("\n".join(source + line for line in str(exc).splitlines())) from None
    return config, section


def load_trained(config_path: str | None, checkpoint_path: str,
                 state: dict | None = None) -> tuple[nn.Module, dict, dict, dict | None]:
    """The model of a checkpoint, in eval mode, with its weights loaded.

    Args:
        config_path: the config to build; ``None`` takes the one saved in the checkpoint.
        checkpoint_path: ``best_model.pth`` or ``checkpoint.pth`` of a run.
        state: the checkpoint already loaded from ``checkpoint_path``, if it is.

    Returns:
        ``(model, meta, config, inference_section)``: ``meta`` holds the classes, palette and
        normalisation (see :func:`builder.dataset_meta`).
    """
    state = load_checkpoint(checkpoint_path) if state is None else state
    config, section = read_run_config(config_path, state, checkpoint_path)
    meta = state.get("meta") or dataset_meta(config)
    model = build_model(config, pretrained=False)  # the checkpoint holds every weight
    load_model_weights(model, state, checkpoint_path, config["arch"]["type"], dataset_info(config).num_classes)
    return model.eval(), meta, config, section


def load_predictor(config_path: str | None, model_path: str, device: torch.device,
                   flags: dict | None = None) -> tuple[Predictor, dict | None]:
    """The predictor of ``-m``: a checkpoint, or a file of ``tools.export`` (ONNX, ``.pt2``, TorchScript).

    The mode comes from the config's ``inference`` section, overridden by ``flags``
    (the same keys). An exported file runs on the CPU whatever ``device`` says.

    Returns:
        ``(predictor, config)``; ``config`` is None for an exported file given without ``config_path``.

    Raises:
        CheckpointError: a file that is none of those, in one line naming the formats.
    """
    file_format = exported_format(model_path)
    if file_format is not None:
        forward = open_exported(model_path, file_format)
        meta, config, section = forward.meta, None, None
        if config_path is not None:
            config, section = read_run_config(config_path, {}, model_path)
        device = torch.device("cpu")
    else:
        try:
            state = load_checkpoint(model_path)
        except CheckpointError as exc:
            if exc.__cause__ is None:  # no such file, or a checkpoint without weights: its own message
                raise
            raise CheckpointError(f"{model_path}: not a readable checkpoint (corrupt or truncated?) nor an exported "
                                  f"model; -m takes {MODEL_FORMATS}") from None
        model, meta, config, section = load_trained(config_path, model_path, state)
        forward = Normalized(model, meta["mean"], meta["std"])
    settings = inference_settings({**(section or {}), **(flags or {})})
    return Predictor(forward, meta, device, settings), config
