"""Train a segmentation model from a JSON config.

    python train.py -c config.json [--resume CHECKPOINT] [--set KEY=VALUE ...]
                    [--run-dir DIR] [--device cpu|cuda]

Under ``torchrun --nproc_per_node=N train.py ...`` each process trains on its
shard of the data and rank 0 writes the run folder.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from datetime import datetime
from pathlib import Path

import torch

from base.base_trainer import TrainingInterrupted
from trainer import Trainer
from utils import distributed
from utils.build import (build_loader, build_loss, build_model, build_optimizer, build_scheduler,
                         dataset_class, dataset_meta, make_dir, select_device)
from utils.checkpoint import load_checkpoint
from utils.config import load_config
from utils.errors import ConfigError, UserError, user_message
from utils.files import write_json


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a semantic segmentation model.")
    parser.add_argument("-c", "--config", help="JSON config (default: the one saved in --resume)")
    parser.add_argument("-r", "--resume", help="checkpoint to resume from (its run folder is reused)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set trainer.epochs=3 (repeatable)")
    parser.add_argument("--run-dir", help="run folder (default: save_dir/name/<timestamp>/)")
    parser.add_argument("-d", "--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.config is None and args.resume is None:
        parser.error("give a config with -c CONFIG (or a checkpoint to resume with --resume)")
    return args


def resolve_config(args: argparse.Namespace, checkpoint: dict | None) -> dict:
    """The ``-c`` config, else the one saved in the resumed checkpoint; ``--set`` applied."""
    if args.config is not None:
        return load_config(args.config, args.overrides)
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        raise ConfigError(f"{args.resume}: the checkpoint holds no config; pass one with -c")
    return load_config(None, args.overrides, base=saved)


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


def build_components(config: dict, device: torch.device, resuming: bool = False) -> dict:
    """Build every configured object; bad data or arguments fail here, before the run folder exists.

    When ``resuming``, ImageNet weights are not loaded: the checkpoint replaces them.
    """
    train_loader = build_loader(config, "train_loader")
    val_loader = build_loader(config, "val_loader") if config["val_loader"] is not None else None
    if len(train_loader) == 0:
        raise ConfigError(f"train_loader: {len(train_loader.dataset)} samples make no full batch of "
                          f"batch_size {train_loader.batch_size} (drop_last is true); lower batch_size")

    torch.manual_seed(config["seed"])  # weight initialisation
    model = build_model(config, pretrained=not resuming).to(device)
    if distributed.is_distributed():
        if config["use_synch_bn"] and device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif config["use_synch_bn"]:
            warnings.warn("use_synch_bn: SyncBatchNorm needs CUDA; each CPU process keeps its own "
                          "batch statistics", stacklevel=1)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    elif config["n_gpu"] > 1:
        warnings.warn(f"n_gpu is {config['n_gpu']} but this is a single process; to use several GPUs run "
                      f"torchrun --nproc_per_node={config['n_gpu']} train.py -c CONFIG", stacklevel=1)
    optimizer = build_optimizer(config, getattr(model, "module", model))
    return {"model": model, "train_loader": train_loader, "val_loader": val_loader, "optimizer": optimizer,
            "loss": build_loss(config, train_loader.dataset).to(device),
            "lr_scheduler": build_scheduler(config, optimizer, len(train_loader))}


def build_trainer(config: dict, device: torch.device, run_dir: Path, components: dict | None = None) -> Trainer:
    """The trainer of ``config``, writing to ``run_dir`` (which must exist on rank 0)."""
    components = components if components is not None else build_components(config, device)
    settings = config["trainer"]
    tb_dir = None
    if settings["tensorboard"]:
        tb_dir = (Path(settings["log_dir"]) / config["name"] / run_dir.name
                  if settings["log_dir"] else run_dir / "tensorboard")
    return Trainer(**components, device=device, run_dir=run_dir, settings=settings, config=config,
                   meta=dataset_meta(config), seed=config["seed"], amp=config["amp"],
                   aux_loss_weight=config["aux_loss_weight"], ignore_index=config["ignore_index"],
                   denormalize=dataset_class(config).denormalize, tensorboard_dir=tb_dir)


def run(args: argparse.Namespace) -> dict:
    checkpoint = load_checkpoint(args.resume) if args.resume is not None else None
    config = resolve_config(args, checkpoint)
    device = select_device(args.device)
    distributed.init_process_group(device)
    components = build_components(config, device, resuming=args.resume is not None)
    run_dir = make_run_dir(config, args)
    trainer = build_trainer(config, device, run_dir, components)
    if distributed.is_main_process():
        write_json(config, run_dir / "config.json")
    if args.resume is not None:
        trainer.resume(args.resume, checkpoint)
    trainer.logger.info(f"Training {config['arch']['type']} on {config['train_loader']['type']} "
                        f"({len(trainer.train_loader.dataset)} images) on {device}")
    return trainer.train()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    args = parse_args(argv)
    try:
        summary = run(args)
        report = distributed.is_main_process()  # asked before the process group is gone
    except TrainingInterrupted as exc:
        if distributed.is_main_process():
            print(f"{exc}\nResume with: python train.py --resume {exc.checkpoint}", file=sys.stderr)
        return 130
    except UserError as exc:
        rank = f"[rank {distributed.get_rank()}] " if distributed.is_distributed() else ""
        print(f"{rank}error: {user_message(exc)}", file=sys.stderr)
        return 2
    finally:
        if distributed.is_distributed():
            torch.distributed.destroy_process_group()
    if report:
        best = summary.get("best_metrics") or summary.get("last_metrics") or {}
        if "mIoU" in best:
            print(f"Validation mIoU: {best['mIoU']:.4f} (epoch {best['epoch']})")
        print(f"Run saved in {summary['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
