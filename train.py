"""Train a segmentation model from a JSON config.

    python train.py -c config.json [--resume CHECKPOINT | --init-from CHECKPOINT]
                    [--set KEY=VALUE ...] [--run-dir DIR] [--device cpu|cuda]

Under ``torchrun --nproc_per_node=N train.py ...`` each process trains on its
shard of the data (DistributedDataParallel: NCCL on CUDA, Gloo on the CPU) and
rank 0 writes the run folder.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import sys
from datetime import datetime
from pathlib import Path

import torch

from base.base_trainer import TrainingInterrupted
from builder import (build_components, build_trainer, dataset_info, dataset_meta, gives_fixed_size,
                     input_normalization, trainer_settings)
from models.losses.class_weights import describe_class_weights
from utils import distributed, inherit, trackers
from utils.checkpoint import check_compatible, describe_init, load_checkpoint
from utils.config import load_config, read_json
from utils.distributed import select_device
from utils.errors import CheckpointError, ConfigError, UserError, run_command, user_message
from utils.files import make_dir, write_json
from utils.template import looks_like_template


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a semantic segmentation model.")
    parser.add_argument("-c", "--config", help="JSON config (default: the one saved in --resume)")
    parser.add_argument("-r", "--resume", help="checkpoint to resume from (its run folder is reused)")
    parser.add_argument("--init-from", metavar="CHECKPOINT",
                        help="start a new run from this checkpoint's weights where names and shapes match "
                             "(fine-tuning; sets the config's init_from)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set trainer.epochs=3 (repeatable)")
    parser.add_argument("--run-dir", help="run folder (default: save_dir/name/<timestamp>/)")
    parser.add_argument("-d", "--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--print-config", action="store_true",
                       help="print the resolved config (bases merged, --set applied, defaults filled) and exit")
    shown.add_argument("--explain", action="store_true",
                       help="print each value of the resolved config with the file (or --set) it came from, "
                            "and exit")
    args = parser.parse_args(argv)
    if args.config is None and args.resume is None:
        parser.error("give a config with -c CONFIG (or a checkpoint to resume with --resume)")
    if args.resume is not None and args.init_from is not None:
        parser.error("--init-from starts a new run and --resume continues one: give only one of them")
    return args


def resolve_config(args: argparse.Namespace, checkpoint: dict | None) -> dict:
    """The ``-c`` config, else the one saved in the resumed checkpoint; ``--set`` and ``--init-from`` applied."""
    if args.config is not None:
        try:
            config = load_config(args.config, args.overrides)
        except ConfigError as exc:
            hint = template_hint(args.config)
            raise ConfigError(f"{hint}\n{exc}" if hint else str(exc)) from None
        if args.init_from is not None:  # a command-line path: from the current directory
            config["init_from"] = str(Path(args.init_from).absolute())
        return config
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{args.resume}: the checkpoint holds no config; pass one with -c")
    return load_config(None, args.overrides, base=saved)


def show_config(args: argparse.Namespace) -> int:
    """``--print-config`` and ``--explain``: the resolved config, nothing built or written."""
    checkpoint = load_checkpoint(args.resume) if args.config is None else None
    config = resolve_config(args, checkpoint)
    if args.print_config:
        print(json.dumps(config, indent=2))
        return 0
    if args.config is not None:
        sources = inherit.resolve(args.config, read_json)[1]
    else:
        sources = inherit.record_all(checkpoint["config"], f"the config saved in {args.resume}")
    for assignment in args.overrides:
        inherit.override(sources, assignment, "--set")
    if args.init_from is not None:
        inherit.override(sources, "init_from=", "--init-from")
    print("\n".join(inherit.explain(config, sources)))
    return 0


def template_hint(path: str) -> str | None:
    """When an invalid config is one of the pytorch-segmentation template, how to convert it."""
    try:
        old = read_json(path)
    except ConfigError:
        return None
    if not looks_like_template(old):
        return None
    return (f"{path} looks like a config of the pytorch-segmentation template; convert it with: "
            f"python -m tools.migrate {shlex.quote(path)} -o NEW.json")


def make_run_dir(config: dict, args: argparse.Namespace, run_dir: Path | None = None) -> Path:
    """Create ``run_dir`` (default: :func:`choose_run_dir`'s) on the main process; returns it."""
    run_dir = run_dir if run_dir is not None else choose_run_dir(config, args)
    if distributed.is_main_process():
        make_dir(run_dir, "--run-dir" if args.run_dir else "trainer.save_dir")
    return run_dir


def choose_run_dir(config: dict, args: argparse.Namespace) -> Path:
    """``--run-dir``, else the resumed checkpoint's folder, else ``save_dir/name/<timestamp>`` (not created)."""
    if args.run_dir is not None:
        run_dir = Path(args.run_dir)
    elif args.resume is not None:
        run_dir = Path(args.resume).resolve().parent
    else:
        base = Path(config["trainer"]["save_dir"]) / config["name"] / datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir, suffix = base, 1
        while run_dir.exists():  # two runs started in the same second
            run_dir, suffix = base.with_name(f"{base.name}-{suffix}"), suffix + 1
    return run_dir


#: What resuming reads besides the weights; ``best_model.pth`` (weights for inference) has none of it.
TRAINING_STATE = ("optimizer", "lr_scheduler", "epoch", "iteration", "epoch_done", "rng", "history", "partial")


def check_resumable(checkpoint: dict, path: str) -> None:
    """Refuse a checkpoint without training state before anything is built or written."""
    missing = [key for key in TRAINING_STATE if key not in checkpoint]
    if not missing:
        return
    beside = Path(path).resolve().parent / "checkpoint.pth"
    hint = f"; resume from {beside}" if beside.is_file() and beside != Path(path).resolve() else ""
    raise CheckpointError(f"{path}: checkpoint lacks training state ('{missing[0]}'); it can be used for "
                          f"inference or --init-from but not to resume{hint}")


@contextlib.contextmanager
def undone_on_failure(folders: list[Path]):
    """Remove what the block creates in ``folders`` (files and folders, a new folder whole) if it raises:
    a run that cannot start leaves nothing behind, and a refused resume leaves its old run as it was.

    The block may set ``opened["trainer"]``, whose files are closed first.
    """
    main = distributed.is_main_process()
    before = {}
    for folder in folders if main else ():
        while not folder.exists() and not folder.parent.exists():  # new parents go too
            folder = folder.parent
        before[folder] = set(folder.rglob("*")) if folder.exists() else None
    opened: dict = {}
    try:
        yield opened
    except BaseException:
        if main:
            _close(opened.get("trainer"))
            for folder, existing in before.items():
                if existing is None:
                    shutil.rmtree(folder, ignore_errors=True)
                    continue
                for path in sorted(set(folder.rglob("*")) - existing, key=lambda p: len(p.parts), reverse=True):
                    if path.is_dir() and not path.is_symlink():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
        raise


def _close(trainer) -> None:
    """Close a trainer's TensorBoard writer, loaders and log file."""
    if trainer is None:
        return
    trainer.close()
    for handler in list(trainer.logger.handlers):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            trainer.logger.removeHandler(handler)


def log_failure(logger: logging.Logger, exc: BaseException) -> None:
    """Write the error that ends a run into its ``train.log`` (the console gets it from :func:`run_command`):
    the ``error:`` line of a user error, the traceback of any other."""
    user = isinstance(exc, UserError)
    message = f"error: {user_message(exc)}" if user else f"error: {type(exc).__name__}: {exc}"
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None,
                               None if user else (type(exc), exc, exc.__traceback__))
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def finished_message(checkpoint: dict, config: dict, path: str) -> str | None:
    """What to say when resuming a run that already ended, unless its epochs were raised."""
    finished = checkpoint.get("finished")
    saved_epochs = (checkpoint.get("config") or {}).get("trainer", {}).get("epochs", checkpoint.get("epoch"))
    if not finished or config["trainer"]["epochs"] > saved_epochs:
        return None
    return (f"{path}: the run already finished ({finished} at epoch {checkpoint['epoch']} of {saved_epochs}); "
            f"nothing to resume. To train further, raise the epochs: --set trainer.epochs=N (N > {saved_epochs})")


def check_processes(config: dict, args: argparse.Namespace) -> None:
    """``n_gpu > 1`` needs one process per GPU, which torchrun starts: name the command."""
    if config["n_gpu"] > 1 and not distributed.launched_by_torchrun():
        raise ConfigError(f"n_gpu is {config['n_gpu']} but this is a single process: run "
                          f"torchrun --nproc_per_node={config['n_gpu']} {_script()} {' '.join(_cli_args(args))} "
                          "(or set n_gpu to 1)")


def _script() -> str:
    """How this script was named on the command line (``train.py`` when imported)."""
    return sys.argv[0] if sys.argv and Path(sys.argv[0]).name == "train.py" else "train.py"


def _cli_args(args: argparse.Namespace) -> list[str]:
    """The options of this run, quoted for a shell, to repeat them in a suggested command."""
    options = [("-c", args.config), ("--resume", args.resume), ("--init-from", args.init_from),
               ("--run-dir", args.run_dir), ("--device", args.device)]
    words = [f"{flag} {shlex.quote(str(value))}" for flag, value in options if value is not None]
    return words + [f"--set {shlex.quote(item)}" for item in args.overrides]


def run(args: argparse.Namespace) -> dict:
    checkpoint = load_checkpoint(args.resume) if args.resume is not None else None
    config = resolve_config(args, checkpoint)
    if checkpoint is not None:
        check_compatible(checkpoint, args.resume, config["arch"]["type"], dataset_info(config).num_classes)
        check_resumable(checkpoint, args.resume)
        message = finished_message(checkpoint, config, args.resume)
        if message is not None:  # nothing is built or written
            return {"run_dir": str(Path(args.resume).resolve().parent), "finished": message}
    check_processes(config, args)
    trackers.require(config["trainer"]["trackers"])  # before anything is built
    device = select_device(args.device)
    distributed.init_process_group(device)
    components = build_components(config, device, resuming=checkpoint is not None)
    model = getattr(components["model"], "module", components["model"])
    saved_meta = (checkpoint or {}).get("meta") or {}
    if "mean" in saved_meta:  # a resumed run keeps the normalisation it was trained with
        mean, std, source = saved_meta["mean"], saved_meta["std"], "the resumed checkpoint's"
    elif components["init"] is not None and "mean" in components["init"]["meta"]:  # so do the loaded weights
        init_meta = components["init"]["meta"]
        mean, std, source = init_meta["mean"], init_meta["std"], "the init_from checkpoint's"
    else:
        mean, std, source = input_normalization(config, model)
    if device.type == "cuda":
        # cuDNN times its kernels once per input size: worth it when the size never changes.
        torch.backends.cudnn.benchmark = gives_fixed_size(components["train_loader"].dataset.transforms)
    run_dir = choose_run_dir(config, args)
    folders = [run_dir]
    tensorboard_dir = trainer_settings(config, device, run_dir).tensorboard_dir
    if tensorboard_dir is not None and not tensorboard_dir.is_relative_to(run_dir):  # trainer.log_dir
        folders.append(tensorboard_dir)
    with undone_on_failure(folders) as opened:
        make_run_dir(config, args, run_dir)
        trainer = opened["trainer"] = build_trainer(config, device, run_dir, components,
                                                    dataset_meta(config, (mean, std)),
                                                    tracker_runs=(checkpoint or {}).get("tracker_runs"))
        if checkpoint is not None:
            trainer.resume(args.resume, checkpoint)
        if distributed.is_main_process():  # after the resume: a refused one leaves the old run's config
            write_json(config, run_dir / "config.json")
    try:
        return start_training(trainer, config, components, model, device, (mean, std, source))
    except TrainingInterrupted:
        raise
    except Exception as exc:  # the console has it from run_command; the run's log gets it too
        log_failure(trainer.logger, exc)
        raise


def start_training(trainer, config: dict, components: dict, model: torch.nn.Module, device: torch.device,
                   normalization: tuple) -> dict:
    """Log what the run trains with, then train."""
    mean, std, source = normalization
    if components["init"] is not None:
        trainer.logger.info(describe_init(config["init_from"], components["init"]))
    trainer.logger.info(f"Training {config['arch']['type']} on {config['train_loader']['type']} "
                        f"({len(trainer.train_loader.dataset)} images) on {device}")
    info = dataset_info(config)
    trainer.logger.info(f"Classes ({info.num_classes}): {', '.join(info.class_names)}"
                        + (f" ({info.source})" if info.source else ""))
    for key in ("loss", "aux_loss"):
        lines, warnings = describe_class_weights(components[key], info.class_names, key)
        for line in lines:
            trainer.logger.info(line)
        for warning in warnings:
            trainer.logger.warning(warning)
    if hasattr(model, "forward_scales"):  # a model that combines scales by itself (MS-OCR)
        trainer.logger.info(f"Validation runs {config['arch']['type']} at scales {list(model.scales)} "
                            "(arch.args.scales)")
    for note in getattr(getattr(model, "backbone", None), "weights_notes", None) or ():
        trainer.logger.info(f"Encoder weights: {note}")
    if getattr(model, "norm_summary", None):
        trainer.logger.info(f"Normalisation layers: {model.norm_summary}")
    # Printed last before training starts; "Run folder:" follows once the stop handlers are installed.
    trainer.logger.info(f"Input normalisation: mean {_rounded(mean)}, std {_rounded(std)} ({source})")
    return trainer.train()


def _rounded(values) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values) + ")"


def resume_command(checkpoint: Path, args: argparse.Namespace) -> str:
    """The command that resumes this run, as it was started (torchrun included)."""
    script = _script()
    device = f" --device {args.device}" if args.device else ""
    if not distributed.launched_by_torchrun():
        return f"python {script} --resume {checkpoint}{device}"
    launcher = f"torchrun --nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '1')}"
    nodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if nodes > 1:
        launcher += f" --nnodes={nodes} (and the same rendezvous options as before)"
    return f"{launcher} {script} --resume {checkpoint}{device}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = parse_args(argv)
    try:
        return run_command(train_and_report, args, prefix=_rank_prefix)
    finally:  # after the error lines, which name the rank
        if distributed.is_distributed():
            torch.distributed.destroy_process_group()


def _rank_prefix() -> str:
    """``[rank N] `` before the error lines of a distributed run (every process prints its own)."""
    return f"[rank {distributed.get_rank()}] " if distributed.is_distributed() else ""


def train_and_report(args: argparse.Namespace) -> int:
    """Train (or resume) and print the outcome; returns the exit code (130 when interrupted)."""
    if args.print_config or args.explain:
        return show_config(args)
    try:
        summary = run(args)
    except TrainingInterrupted as exc:
        if distributed.is_main_process():
            print(f"{exc}\nResume with: {resume_command(exc.checkpoint, args)}", file=sys.stderr)
        return 130
    if "finished" in summary:
        print(summary["finished"])
        return 0
    if distributed.is_main_process():
        best = summary.get("best_metrics") or summary.get("last_metrics") or {}
        if "mIoU" in best:
            print(f"Validation mIoU: {best['mIoU']:.4f} (epoch {best['epoch']})")
        print(f"Run saved in {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
