"""Train a segmentation model from a JSON config.

    python train.py -c config.json [--resume CHECKPOINT | --init-from CHECKPOINT]
                    [--set KEY=VALUE ...] [--run-dir DIR] [--device cpu|cuda]

Under ``torchrun --nproc_per_node=N train.py ...`` each process trains on its
shard of the data (DistributedDataParallel: NCCL on CUDA, Gloo on the CPU) and
rank 0 writes the run folder.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from datetime import datetime
from pathlib import Path

import torch

from base.base_trainer import TrainingInterrupted
from builder import build_components, build_trainer, dataset_info, dataset_meta, gives_fixed_size, input_normalization
from utils import distributed
from utils.checkpoint import check_compatible, describe_init, load_checkpoint
from utils.config import load_config, read_json
from utils.distributed import select_device
from utils.errors import ConfigError, run_command
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
        if args.init_from is not None:
            config["init_from"] = args.init_from
        return config
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{args.resume}: the checkpoint holds no config; pass one with -c")
    return load_config(None, args.overrides, base=saved)


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


def make_run_dir(config: dict, args: argparse.Namespace) -> Path:
    """``--run-dir``, else the resumed checkpoint's folder, else ``save_dir/name/<timestamp>``."""
    if args.run_dir is not None:
        run_dir = Path(args.run_dir)
    elif args.resume is not None:
        run_dir = Path(args.resume).resolve().parent
    else:
        base = Path(config["trainer"]["save_dir"]) / config["name"] / datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir, suffix = base, 1
        while run_dir.exists():  # two runs started in the same second
            run_dir, suffix = base.with_name(f"{base.name}-{suffix}"), suffix + 1
    if distributed.is_main_process():
        make_dir(run_dir, "--run-dir" if args.run_dir else "trainer.save_dir")
    return run_dir


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
        message = finished_message(checkpoint, config, args.resume)
        if message is not None:  # nothing is built or written
            return {"run_dir": str(Path(args.resume).resolve().parent), "finished": message}
    check_processes(config, args)
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
    run_dir = make_run_dir(config, args)
    trainer = build_trainer(config, device, run_dir, components, dataset_meta(config, (mean, std)))
    if distributed.is_main_process():
        write_json(config, run_dir / "config.json")
    if checkpoint is not None:
        trainer.resume(args.resume, checkpoint)
    if components["init"] is not None:
        trainer.logger.info(describe_init(config["init_from"], components["init"]))
    trainer.logger.info(f"Training {config['arch']['type']} on {config['train_loader']['type']} "
                        f"({len(trainer.train_loader.dataset)} images) on {device}")
    if hasattr(model, "forward_scales"):  # a model that combines scales by itself (MS-OCR)
        trainer.logger.info(f"Validation runs {config['arch']['type']} at scales {list(model.scales)} "
                            "(arch.args.scales)")
    if getattr(model, "norm_summary", None):
        trainer.logger.info(f"Normalisation layers: {model.norm_summary}")
    # Printed last before training starts (tests/test_stop.py signals the run on this line).
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
