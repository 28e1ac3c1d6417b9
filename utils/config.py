"""Reading, overriding and validating the JSON configuration.

The whole configuration is checked before anything heavy is built: unknown keys
get a did-you-mean and their dotted path, wrong types name the path and the
expected type, and every ``{"type", "args"}`` entry is checked against the
registered constructor's signature. :func:`load_config` returns the *resolved*
configuration (defaults filled in), which is what a run saves beside itself.
"""
from __future__ import annotations

import copy
import inspect
import json
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from utils.errors import ConfigError
from utils.inherit import resolve as resolve_bases
from utils.registry import (DATASETS, LOSSES, MODELS, NORMS, OPTIMIZERS, REGISTRIES, SCHEDULERS, TRANSFORMS, Check,
                            describe_type, did_you_mean, normalize_spec, type_matches)

_REQUIRED = object()


@dataclass(frozen=True)
class Key:
    """One plain config key: its type annotation, default and meaning."""
    type: Any
    default: Any = _REQUIRED
    help: str = ""


# Names the framework passes to constructors itself; a config may not set them.
MODEL_INJECTED = ("num_classes",)
DATASET_INJECTED = ("ignore_index", "seed", "transforms")
TRANSFORM_INJECTED = ("ignore_index",)
LOSS_INJECTED = ("ignore_index", "num_classes", "train_dataset", "cache_dir")
OPTIMIZER_INJECTED = ("params",)
SCHEDULER_INJECTED = ("optimizer", "num_epochs", "iters_per_epoch")

# Seeds are combined with epochs and indices into 64-bit generator seeds; 32 bits leave room.
MAX_SEED = 2**32 - 1

METRIC_NAMES = ("mIoU", "pixel_acc", "mean_acc", "fwIoU", "val_loss", "iIoU", "mean_f1", "mean_precision",
                "mean_recall")

TOP_LEVEL = {
    "name": Key(str, "run", "Run name; runs are saved under save_dir/name/<timestamp>/."),
    "n_gpu": Key(int, 1, "GPUs to use. More than 1 needs torchrun: "
                         "torchrun --nproc_per_node=N train.py -c CONFIG."),
    "use_synch_bn": Key(bool, False, "Convert batch norm to SyncBatchNorm when training in several processes "
                                     "on CUDA (torchrun); a single process keeps BatchNorm."),
    "norm": Key(str | dict | None, None, "Normalisation layer of the whole model (encoder and heads), by name "
                                         "or {type, args}: BatchNorm, SyncBatchNorm, GroupNorm, InstanceNorm or "
                                         "EvoNormS0 (see Normalisation layers); null is BatchNorm. "
                                         "arch.args.norm may set it instead."),
    "seed": Key(int, 42, "Seed of weight init, data order and augmentation."),
    "amp": Key(Literal["off", "bf16", "fp16"] | bool, "off",
               "Mixed precision: 'off', 'bf16' (CPU and CUDA) or 'fp16' (CUDA only, with loss scaling); "
               "true means fp16 on CUDA and bf16 on the CPU, false means off."),
    "compile": Key(bool, False, "Compile the model with torch.compile (a slower first iteration, "
                                "then faster ones)."),
    "channels_last": Key(bool, False, "Keep the model's weights and inputs in channels-last memory "
                                      "order (faster convolutions on recent GPUs and CPUs)."),
    "init_from": Key(str | None, None, "Checkpoint to start a new run from: its weights whose names and "
                                       "shapes match are loaded, the rest are initialised afresh "
                                       "(--init-from sets it)."),
    "ignore_index": Key(int, 255, "Label value ignored by losses and metrics; data sets map void to it."),
    "aux_loss_weight": Key(float, 0.4, "Weight of the auxiliary head's loss, for models that have one."),
    "cache_dir": Key(str | None, None, "Where computed class weights are cached; null is "
                                       "<trainer.save_dir>/cache."),
}

OPTIMIZER_KEYS = {
    "differential_lr": Key(bool, False, "Give the pretrained backbone a smaller learning rate."),
    "backbone_lr_factor": Key(float, 0.1, "Backbone lr = lr * this factor when differential_lr is true."),
}

LOADER_KEYS = {
    "batch_size": Key(int, 8, "Images per batch (per process under torchrun)."),
    "shuffle": Key(bool, False, "Shuffle each epoch (seeded by seed and epoch)."),
    "num_workers": Key(int, 0, "Data loading worker processes."),
    "drop_last": Key(bool | None, None, "Drop the last incomplete batch; null means true for training "
                                        "(a one-image batch breaks batch norm) and false for validation."),
    "pin_memory": Key(bool | None, None, "Pin host memory for faster copies to the GPU; null means true "
                                         "when training on CUDA."),
    "start_method": Key(Literal["fork", "spawn", "forkserver"] | None, None,
                        "How worker processes start; null is Python's default for the platform "
                        "(fork on Linux before Python 3.14, spawn on macOS)."),
    "subset": Key(int | None, None, "Use only the first N samples (quick experiments)."),
    "transforms": Key(list, [], "Joint augmentations, a list of {type, args}; normalisation is always applied last."),
}

TRAINER_KEYS = {
    "epochs": Key(int, 100, "Number of epochs."),
    "save_dir": Key(str, "saved/", "Root folder of runs (a relative path is read from the project root)."),
    "save_period": Key(int, 1, "Write checkpoint.pth every N epochs (and always before a validation, at the end "
                               "or on Ctrl-C)."),
    "monitor": Key(str, "max mIoU", "'max METRIC', 'min METRIC' or 'off'; decides best_model.pth and early stop. "
                                   "METRIC: mIoU, pixel_acc, mean_acc, fwIoU, val_loss, iIoU, mean_f1, "
                                   "mean_precision or mean_recall."),
    "early_stop": Key(int, 0, "Stop after N validations without improvement; 0 disables."),
    "tensorboard": Key(bool, True, "Write TensorBoard logs."),
    "log_dir": Key(str | None, None, "TensorBoard folder root (a relative path is read from the project root); "
                                     "default: the run folder's tensorboard/."),
    "log_per_iter": Key(int, 20, "Log training loss and lr to TensorBoard every N iterations (and, without a "
                                "visible progress bar, a progress line to the console and train.log)."),
    "val": Key(bool, True, "Run validation."),
    "val_per_epochs": Key(int, 1, "Validate every N epochs (and after the last)."),
    "progress_bar": Key(bool, True, "Show tqdm progress bars (on a terminal; elsewhere, or when false, a progress "
                                    "line every log_per_iter iterations)."),
    "accumulate_steps": Key(int, 1, "Add the gradients of N batches before each optimizer step (the "
                                    "schedule counts optimizer steps)."),
    "clip_grad_norm": Key(float | None, None, "Scale the gradients down when their global L2 norm exceeds "
                                              "this value; null disables clipping."),
    "ema": Key(dict | None, None, "Exponential moving average of the weights, e.g. {\"decay\": 0.999}: "
                                  "validated beside the model and saved as best_model_ema.pth; null disables."),
    "trackers": Key(list[str], ["tensorboard"], "Where the run's metrics go: any of 'tensorboard', 'mlflow' and "
                                                "'wandb' (the last two are optional packages; see "
                                                "docs/experiments.md); tensorboard false removes 'tensorboard'."),
    "mlflow": Key(dict | None, None, "MLflow options (trainer.mlflow.*) when trackers has 'mlflow'; "
                                     "null: the defaults."),
    "wandb": Key(dict | None, None, "Weights & Biases options (trainer.wandb.*) when trackers has 'wandb'; "
                                    "null: the defaults."),
}

EMA_KEYS = {
    "decay": Key(float, 0.999, "Weight of the old average at each optimizer step (0 < decay < 1)."),
}

#: The trackers ``trainer.trackers`` may name (utils/trackers.py).
TRACKERS = ("tensorboard", "mlflow", "wandb")

MLFLOW_KEYS = {
    "tracking_uri": Key(str | None, None, "Tracking server or database URI (http://..., sqlite:///...), or a "
                                          "local folder (a relative path is read from the project root); "
                                          "null: <trainer.save_dir>/mlruns."),
    "experiment": Key(str | None, None, "Experiment name; null: the config's name."),
}

WANDB_KEYS = {
    "project": Key(str | None, None, "W&B project; null: the config's name."),
    "entity": Key(str | None, None, "W&B user or team; null: your default entity."),
    "mode": Key(Literal["offline", "online", "disabled"] | None, None,
                "null: the WANDB_MODE environment variable if set, else offline (no network; upload later "
                "with wandb sync)."),
}

#: The ``inference`` section (read by ``inference.py``; flags override it).
INFERENCE_KEYS = {
    "mode": Key(Literal["single", "sliding", "multiscale"], "single",
                "single: whole images; sliding: overlapping tiles; multiscale: several scales averaged."),
    "scales": Key(list[float], [0.5, 0.75, 1.0, 1.25, 1.5, 1.75],
                  "Scales of multiscale mode (1.0 is the image's own size)."),
    "flip": Key(bool, False, "Also predict the mirrored image and average (any mode)."),
    "tile": Key(list[int] | None, None, "[height, width] of sliding-window tiles; with multiscale, each "
                                        "scale is predicted by tiles when set."),
    "overlap": Key(float, 1 / 3, "Fraction of a tile shared with its neighbour (0 <= overlap < 1)."),
    "batch_size": Key(int, 1, "Images (or tiles, in sliding mode) per forward pass."),
    "amp": Key(Literal["bf16", "fp16"] | None, None, "Autocast the model to bfloat16 or float16."),
}

#: The ``metrics`` section: which classes the means over classes average (``utils.metrics``).
METRICS_KEYS = {
    "exclude": Key(list[str | int], [], "Classes (names or indices) left out of the means over classes (mIoU, "
                                        "mean accuracy, precision, recall, F1), e.g. [\"background\"]; per-class "
                                        "scores, pixel accuracy and fwIoU keep every class."),
    "classes": Key(list[str | int] | None, None, "Only these classes (names or indices) in the means over "
                                                 "classes; null: every class. Set classes or exclude, not both."),
}


def read_json(path: str | Path) -> dict:
    """Parse a JSON config; a syntax error names the file, line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: config file not found") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start}); a config is a JSON file") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    return data


def apply_override(config: dict, assignment: str) -> None:
    """Apply ``KEY=VALUE`` (dotted key, JSON value) in place, keeping the key's type.

    ``trainer.epochs=3`` sets an int, ``arch.type=UNet`` a string (values that are
    not JSON are taken as strings), ``train_loader.args.transforms[1].args.p=0.3``
    an element of a list. Replacing an existing value by one of another type is
    an error; ints are accepted where floats are.
    """
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected KEY=VALUE, e.g. trainer.epochs=3")
    dotted, raw = assignment.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    bad = _non_finite(value, f"--set {dotted}")
    if bad:
        raise ConfigError(f"{bad[0]}: NaN and Infinity are not allowed; give a finite number")
    steps = _key_steps(dotted)
    node: Any = config
    for depth, step in enumerate(steps[:-1]):
        node = _descend(node, step, steps, depth, dotted, raw)
    last = steps[-1]
    if isinstance(last, int):
        _check_index(node, last, steps, len(steps) - 1, dotted)
        old = node[last]
    else:
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{_path(steps[:-1])}' is not an object in the config")
        old = node.get(last)
    if old is not None and value is not None:  # null is checked by validation
        node_value = _same_type(old, value, dotted, raw)
    else:
        node_value = value
    node[last] = node_value


def _key_steps(dotted: str) -> list[str | int]:
    """``a.b[1].c`` -> ``["a", "b", 1, "c"]``."""
    steps: list[str | int] = []
    for part in dotted.split("."):
        match = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", part)
        if match is None:
            raise ConfigError(f"--set {dotted}: cannot read '{part}'; write keys like trainer.epochs or "
                              "train_loader.args.transforms[1].args.p")
        steps.append(match.group(1))
        steps += [int(i) for i in re.findall(r"\[(\d+)\]", match.group(2))]
    return steps


def _path(steps: list[str | int]) -> str:
    text = ""
    for step in steps:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else step)
    return text


def _check_index(node: Any, index: int, steps: list, depth: int, dotted: str) -> None:
    where = _path(steps[:depth])
    if not isinstance(node, list):
        raise ConfigError(f"--set {dotted}: '{where}' is not a list in the config")
    if index >= len(node):
        raise ConfigError(f"--set {dotted}: '{where}' has {len(node)} element(s); [{index}] is out of range")


def _descend(node: Any, step: str | int, steps: list, depth: int, dotted: str, raw: str) -> Any:
    """The child ``step`` of ``node`` on the way to the key; errors say what is there instead."""
    if isinstance(step, int):
        _check_index(node, step, steps, depth, dotted)
        return node[step]
    where = _path(steps[:depth + 1])
    child = node.get(step) if isinstance(node, dict) else None
    if isinstance(child, str) and steps[depth + 1:depth + 2] == ["args"]:
        # "loss": "CrossEntropyLoss" has no args to set: show the {type, args} form.
        rest = steps[depth + 2:]
        example = f'{{"type": "{child}", "args": {{"{rest[0]}": {raw}}}}}' if len(rest) == 1 else \
            f'{{"type": "{child}", "args": {{...}}}}'
        raise ConfigError(f"--set {dotted}: '{where}' is the name \"{child}\" here, which has no args; "
                          f"give the {{type, args}} form: --set '{where}={example}'")
    wanted = list if isinstance(steps[depth + 1], int) else dict
    if not isinstance(child, wanted):
        hint = did_you_mean(step, node) if isinstance(node, dict) and step not in node else ""
        what = "a list" if wanted is list else "an object"
        raise ConfigError(f"--set {dotted}: '{where}' is not {what} in the config.{hint}")
    return child


def _same_type(old: Any, value: Any, dotted: str, raw: str) -> Any:
    """``value`` if it has ``old``'s type (an int becomes a float where a float was); else a ConfigError.

    A component's two spellings, ``"Name"`` and ``{"type": ..., "args": ...}``, count as one type.
    """
    spec_forms = all(isinstance(v, str) or (isinstance(v, dict) and "type" in v) for v in (old, value))
    same = spec_forms or (isinstance(old, bool) == isinstance(value, bool)
                          and (type(old) is type(value) or (isinstance(old, float) and isinstance(value, int))
                               or (isinstance(old, (list, tuple)) and isinstance(value, (list, tuple)))))
    if not same:
        hint = (f"; to give the string \"{raw}\", quote it: --set '{dotted}=\"{raw}\"'"
                if isinstance(old, str) else "")
        raise ConfigError(f"--set {dotted}: expected {type(old).__name__} like the config's "
                          f"{old!r}, got {value!r}{hint}")
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _non_finite(value: Any, path: str) -> list[str]:
    """The paths of NaN or infinite numbers in a JSON value (JSON allows them; a config must not)."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _non_finite(v, _join(path, str(k)))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _non_finite(v, f"{path}[{i}]")]
    return []


def _check_keys(section: Any, schema: dict[str, Key], path: str, allowed_extra: tuple[str, ...] = ()) -> dict:
    """Validate a plain section against ``schema``; returns its keys with defaults filled in.

    ``allowed_extra`` names keys that are accepted here but validated elsewhere (not returned).
    """
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: expected an object, got {type(section).__name__}")
    known = set(schema) | set(allowed_extra)
    for key in section:
        if key not in known:
            raise ConfigError(f"{_join(path, key)}: unknown key.{did_you_mean(key, known)} "
                              f"Known keys: {', '.join(sorted(known))}")
    resolved = {}
    for key, spec in schema.items():
        if key not in section:
            if spec.default is _REQUIRED:
                raise ConfigError(f"{_join(path, key)}: missing required key")
            resolved[key] = copy.deepcopy(spec.default)
            continue
        if not type_matches(section[key], spec.type):
            raise ConfigError(f"{_join(path, key)}: expected {describe_type(spec.type)}, "
                              f"got {section[key]!r}")
        resolved[key] = section[key]
    return resolved


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def validate_loader(spec: Any, path: str) -> dict:
    """Validate a ``train_loader``/``val_loader`` entry: data set args, loader args, transforms."""
    spec = normalize_spec(spec, path)
    args = dict(spec["args"])
    loader_args = {k: args.pop(k) for k in list(args) if k in LOADER_KEYS}
    loader_args = _check_keys(loader_args, LOADER_KEYS, f"{path}.args")
    if loader_args["batch_size"] < 1:
        raise ConfigError(f"{path}.args.batch_size: must be >= 1, got {loader_args['batch_size']}")
    if loader_args["drop_last"] is None:
        loader_args["drop_last"] = path == "train_loader"
    if loader_args["subset"] is not None and loader_args["subset"] < 1:
        raise ConfigError(f"{path}.args.subset: must be >= 1 (or null for all samples), "
                          f"got {loader_args['subset']}")
    if loader_args["num_workers"] < 0:
        raise ConfigError(f"{path}.args.num_workers: must be >= 0, got {loader_args['num_workers']}")
    loader_args["transforms"] = [
        TRANSFORMS.validate(t, f"{path}.args.transforms[{i}]", injected=TRANSFORM_INJECTED)
        for i, t in enumerate(loader_args["transforms"])]
    extra = {name: _as_parameter(name, key) for name, key in LOADER_KEYS.items()}
    dataset = DATASETS.validate({"type": spec["type"], "args": args}, path,
                                injected=DATASET_INJECTED, extra=extra)
    return {"type": spec["type"], "args": {**dataset["args"], **loader_args}}


def _as_parameter(name: str, key: Key) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=key.default, annotation=key.type)


def _validate_monitor(monitor: str, path: str) -> None:
    if monitor == "off":
        return
    parts = monitor.split()
    if len(parts) != 2 or parts[0] not in ("min", "max"):
        raise ConfigError(f"{path}: expected 'max METRIC', 'min METRIC' or 'off', got {monitor!r}")
    if parts[1] not in METRIC_NAMES:
        raise ConfigError(f"{path}: unknown metric '{parts[1]}'.{did_you_mean(parts[1], METRIC_NAMES)} "
                          f"Available: {', '.join(METRIC_NAMES)}")


def validate_config(config: dict) -> dict:
    """Check the whole configuration and return it resolved (defaults filled in, paths absolute:
    see :func:`resolve_paths`).

    All problems found are reported together, one per line.
    """
    import_components()
    errors: list[str] = [f"{path}: NaN and Infinity are not allowed; give a finite number"
                         for path in _non_finite(config, "")]
    resolved: dict[str, Any] = {}

    def attempt(key: str, check) -> None:
        try:
            resolved[key] = check()
        except ConfigError as exc:
            errors.append(str(exc))

    component_keys = ("arch", "train_loader", "val_loader", "optimizer", "loss", "aux_loss", "lr_scheduler",
                      "trainer", "inference", "metrics")
    try:
        plain = {k: v for k, v in config.items() if k not in component_keys}
        resolved.update(_check_keys(plain, TOP_LEVEL, "", allowed_extra=component_keys))
        if resolved["norm"] is not None:
            _check_norm(resolved["norm"], "norm")
            resolved["norm"] = NORMS.validate(resolved["norm"], "norm")
    except ConfigError as exc:
        errors.append(str(exc))
    for key in ("arch", "train_loader"):
        if key not in config:
            errors.append(f"{key}: missing required key")
    if "arch" in config:
        attempt("arch", lambda: _validate_arch(config["arch"]))
    if "train_loader" in config:
        attempt("train_loader", lambda: validate_loader(config["train_loader"], "train_loader"))
    if config.get("val_loader") is not None:
        attempt("val_loader", lambda: validate_loader(config["val_loader"], "val_loader"))
    else:
        resolved["val_loader"] = None
    attempt("optimizer", lambda: _validate_optimizer(config.get("optimizer", {"type": "SGD"})))
    attempt("loss", lambda: LOSSES.validate(config.get("loss", "CrossEntropyLoss"), "loss", LOSS_INJECTED))
    if config.get("aux_loss") is not None:
        attempt("aux_loss", lambda: LOSSES.validate(config["aux_loss"], "aux_loss", LOSS_INJECTED))
    else:
        resolved["aux_loss"] = None
    attempt("lr_scheduler", lambda: SCHEDULERS.validate(config.get("lr_scheduler", "Poly"), "lr_scheduler",
                                                               SCHEDULER_INJECTED))
    attempt("trainer", lambda: _validate_trainer(config.get("trainer", {})))
    if config.get("inference") is not None:  # range checks: predictor.inference_settings
        attempt("inference", lambda: _check_keys(config["inference"], INFERENCE_KEYS, "inference"))
    if config.get("metrics") is not None:  # class names: _check_derived
        attempt("metrics", lambda: _check_keys(config["metrics"], METRICS_KEYS, "metrics"))
    if not errors:
        resolve_paths(resolved)  # before the checks that read files (Folder's classes.json)
        errors += _check_derived(resolved)
    if errors:
        raise ConfigError("\n".join(errors))
    return resolved


def _check_norm(value: Any, path: str) -> None:
    if value is not None:
        NORMS.build(value, path)  # a light object: its values are checked too


#: ``norm`` is accepted in every model's args; :func:`builder.build_model` applies it.
ARCH_EXTRA = {"norm": inspect.Parameter("norm", inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=typing.Annotated[str | dict | None, Check(_check_norm)])}


def _validate_arch(section: Any) -> dict:
    arch = MODELS.validate(section, "arch", MODEL_INJECTED, extra=ARCH_EXTRA)
    if arch["args"].get("norm") is not None:
        arch["args"]["norm"] = NORMS.validate(arch["args"]["norm"], "arch.args.norm")
    return arch


def norm_spec(config: dict) -> dict:
    """The normalisation of a resolved config's model: ``arch.args.norm``, else ``norm``, else BatchNorm."""
    spec = config["arch"]["args"].get("norm") or config.get("norm") or "BatchNorm"
    return NORMS.validate(spec, "norm")


def _check_derived(resolved: dict) -> list[str]:
    """Checks that need several sections at once."""
    errors = []
    if resolved["arch"]["args"].get("norm") is not None and resolved["norm"] is not None \
            and resolved["arch"]["args"]["norm"] != resolved["norm"]:
        errors.append(f"norm: is also set in arch.args.norm ({resolved['arch']['args']['norm']['type']}); "
                      "set the normalisation in one place")
    norm = norm_spec(resolved)["type"]
    if resolved["arch"]["args"].get("freeze_bn") and norm not in ("BatchNorm", "SyncBatchNorm"):
        errors.append(f"arch.args.freeze_bn: freezes batch-norm statistics, but the norm is {norm}, "
                      "which has none; set freeze_bn to false")
    train_type = resolved["train_loader"]["type"]
    if resolved["val_loader"] is not None and resolved["val_loader"]["type"] != train_type:
        errors.append(f"val_loader.type: must be the same data set as train_loader.type ({train_type}) "
                      "so that the classes agree")
    if not 0 <= resolved["seed"] <= MAX_SEED:
        errors.append(f"seed: must be between 0 and {MAX_SEED}, got {resolved['seed']}")
    in_channels = resolved["arch"]["args"].get("in_channels", 3)
    channels = DATASETS.get(train_type).image_channels
    if in_channels != channels:
        errors.append(f"arch.args.in_channels: the model takes {in_channels}-channel input, but {train_type} "
                      f"gives {channels}-channel images (data sets decode images as 8-bit RGB; other channel "
                      f"counts are not supported yet); set in_channels to {channels}")
    try:  # Folder reads its classes from its args or a classes.json beside the data
        class_names = DATASETS.get(train_type).info(resolved["train_loader"]["args"]).class_names
    except ConfigError as exc:
        return errors + [f"train_loader.args: {exc}"]
    num_classes = len(class_names)
    if 0 <= resolved["ignore_index"] < num_classes:
        errors.append(f"ignore_index: {resolved['ignore_index']} is a class of {train_type} "
                      f"(0-{num_classes - 1}); use a value outside, e.g. 255")
    if resolved.get("metrics") is not None:
        errors += _check_metric_classes(resolved["metrics"], class_names, train_type)
    return errors


def _check_metric_classes(metrics: dict, class_names: tuple[str, ...], dataset: str) -> list[str]:
    """``metrics.classes`` and ``metrics.exclude`` name classes of the data set, and leave one to average."""
    errors = []
    for key in ("classes", "exclude"):
        for ref in metrics[key] or ():
            if isinstance(ref, str) and ref not in class_names:
                errors.append(f"metrics.{key}: '{ref}' is not a class of {dataset}.{did_you_mean(ref, class_names)} "
                              f"Classes: {', '.join(class_names)}")
            elif isinstance(ref, int) and not 0 <= ref < len(class_names):
                errors.append(f"metrics.{key}: {ref} is not a class index of {dataset} (0-{len(class_names) - 1})")
    if errors:
        return errors
    if metrics["classes"] is not None and metrics["exclude"]:
        return ["metrics: set classes (the classes to average) or exclude (the classes to leave out), not both"]
    chosen = set(range(len(class_names))) if metrics["classes"] is None else \
        {class_names.index(r) if isinstance(r, str) else r for r in metrics["classes"]}
    left_out = {class_names.index(r) if isinstance(r, str) else r for r in metrics["exclude"]}
    if not chosen - left_out:
        return [f"metrics: no class of {dataset} is left to average over"]
    return []


def _validate_optimizer(section: Any) -> dict:
    if not isinstance(section, dict):
        raise ConfigError(f"optimizer: expected an object with 'type' and 'args', got {section!r}")
    plain = _check_keys({k: v for k, v in section.items() if k not in ("type", "args")},
                        OPTIMIZER_KEYS, "optimizer")
    spec = OPTIMIZERS.validate({k: section[k] for k in ("type", "args") if k in section},
                               "optimizer", OPTIMIZER_INJECTED)
    return {**spec, **plain}


def _validate_trainer(section: Any) -> dict:
    trainer = _check_keys(section, TRAINER_KEYS, "trainer")
    for key in ("epochs", "save_period", "log_per_iter", "val_per_epochs"):
        if trainer[key] < 1:
            raise ConfigError(f"trainer.{key}: must be >= 1, got {trainer[key]}")
    if trainer["accumulate_steps"] < 1:
        raise ConfigError(f"trainer.accumulate_steps: must be >= 1, got {trainer['accumulate_steps']}")
    if trainer["clip_grad_norm"] is not None and trainer["clip_grad_norm"] <= 0:
        raise ConfigError(f"trainer.clip_grad_norm: must be > 0 (or null to disable), "
                          f"got {trainer['clip_grad_norm']}")
    if trainer["ema"] is not None:
        trainer["ema"] = _check_keys(trainer["ema"], EMA_KEYS, "trainer.ema")
        if not 0 < trainer["ema"]["decay"] < 1:
            raise ConfigError(f"trainer.ema.decay: must be between 0 and 1 (exclusive), "
                              f"got {trainer['ema']['decay']}")
    if trainer["early_stop"] < 0:
        raise ConfigError(f"trainer.early_stop: must be >= 0 (0 disables), got {trainer['early_stop']}")
    _validate_monitor(trainer["monitor"], "trainer.monitor")
    _validate_trackers(trainer)
    return trainer


def _validate_trackers(trainer: dict) -> None:
    """``trainer.trackers`` names known trackers once each; their options sections are checked."""
    for name in trainer["trackers"]:
        if name not in TRACKERS:
            raise ConfigError(f"trainer.trackers: unknown tracker '{name}'.{did_you_mean(name, TRACKERS)} "
                              f"Available: {', '.join(TRACKERS)}")
    if len(set(trainer["trackers"])) != len(trainer["trackers"]):
        raise ConfigError(f"trainer.trackers: a tracker is named twice in {trainer['trackers']}")
    for key, schema in (("mlflow", MLFLOW_KEYS), ("wandb", WANDB_KEYS)):
        if trainer[key] is not None:
            trainer[key] = _check_keys(trainer[key], schema, f"trainer.{key}")


def read_config(path: str | Path) -> dict:
    """The config at ``path`` with its ``base`` files merged under it (see :mod:`utils.inherit`), unvalidated."""
    return resolve_bases(path, read_json)[0]


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> dict:
    """Read ``path`` (or take ``base``), apply ``--set`` overrides, validate; returns the resolved config."""
    config = copy.deepcopy(base) if path is None else read_config(path)
    for assignment in overrides:
        apply_override(config, assignment)
    try:
        return validate_config(config)
    except ConfigError as exc:
        source = f"{path}: " if path is not None else ""
        raise ConfigError("\n".join(source + line for line in str(exc).splitlines())) from None


#: The folder holding ``train.py``: relative paths in a config are read from here, whatever the
#: current directory is.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def resolve_path(value: str) -> str:
    """``value`` as an absolute path: ``~`` expanded, a relative path joined to :data:`PROJECT_ROOT`."""
    path = Path(value).expanduser()
    return os.path.normpath(path if path.is_absolute() else PROJECT_ROOT / path)


def is_path_arg(name: str) -> bool:
    """Whether a component argument holds a path, by its name (``data_dir``, ``weights_path``, ``list_file``)."""
    return name.endswith(("_dir", "_path", "_file"))


def resolve_paths(config: dict) -> dict:
    """Make every path of a resolved config absolute (in place; returned): ``init_from``, ``cache_dir``,
    ``trainer.save_dir`` and ``trainer.log_dir``, and the path arguments of the data sets and the model
    (see :func:`is_path_arg`). A null ``cache_dir`` becomes ``<trainer.save_dir>/cache``.
    """
    trainer = config["trainer"]
    trainer["save_dir"] = resolve_path(trainer["save_dir"])
    if trainer["log_dir"] is not None:
        trainer["log_dir"] = resolve_path(trainer["log_dir"])
    config["cache_dir"] = resolve_path(config["cache_dir"] if config["cache_dir"] is not None
                                       else os.path.join(trainer["save_dir"], "cache"))
    if config["init_from"] is not None:
        config["init_from"] = resolve_path(config["init_from"])
    for key in ("arch", "train_loader", "val_loader"):
        args = (config[key] or {}).get("args", {})
        for name, value in args.items():
            if is_path_arg(name) and isinstance(value, str):
                args[name] = resolve_path(value)
    return config


#: The packages whose modules register components; each imports all of its modules.
def import_components() -> None:
    """Register every model, data set, loss, optimizer and schedule (each registry imports its packages)."""
    for registry in REGISTRIES:
        registry.populate()
