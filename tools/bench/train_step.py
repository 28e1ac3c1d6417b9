"""Training throughput of the framework's trainer loop against a bare PyTorch loop.

    python -m tools.bench.train_step [--model UNet] [--batch-size 16] [--size 64] [--iters 30]
                                     [--repeats 5] [--warmup 5] [--threads N] [--default-malloc] [--check]

Both loops train the same architecture from the same initial weights, with the
optimizer, per-iteration lr schedule and loss that ``config.json`` configures,
on the same pre-generated SyntheticShapes batches held in memory (``uint8``
images and labels, as the loaders give them), so data loading is not measured;
both loops move them to the device, normalise and convert the labels there.
The trainer is built by ``builder.build_trainer`` as a user's run would be
(TensorBoard and progress-bar settings as in the config); only its
``train_loader`` is swapped for an in-memory one. The loops alternate
``repeats`` times (bare, trainer, bare, ...) and the medians are compared.
``--check`` exits with 1 when trainer / bare < 0.98 or when the two models
end with different weights.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

import torch
from torch import nn

from utils.images import normalize_batch
from base.base_trainer import seed_epoch
from builder import build_trainer
from trainer import Trainer
from builder import build_loader, build_loss, build_model, build_optimizer, build_scheduler
from utils.config import load_config, read_json

MIN_RATIO = 0.98
ARCHS = {
    "UNet": None,  # None: keep config.json's arch section (base_channels 16, depth 3)
    "DeepLabV3Plus": {"type": "DeepLabV3Plus", "args": {"backbone": "resnet18"}},
}

Batch = tuple[torch.Tensor, torch.Tensor]

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Stop glibc from returning freed tensor memory to the OS; False where that is not possible.

    By default every iteration unmaps its multi-MB activations and faults them
    back in the next: ~15k page faults per default UNet step on the 2-core
    test VM, ~20% of its time, and a cost that varies with the host's load,
    which adds noise. Both loops run in this process, so the comparison stays
    fair; only the absolute img/s is higher than with glibc's defaults.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        # 32 MB is glibc's ceiling for the mmap threshold; larger blocks are still mmapped.
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False


class InMemoryLoader:
    """Replays fixed batches with the interface the trainer needs from a loader.

    Like :class:`base.base_dataloader.BaseDataLoader`, ``len`` counts the batches
    left after ``set_epoch(..., skip_batches)``.
    """

    def __init__(self, batches: list[Batch], dataset, batch_size: int) -> None:
        self.batches = batches
        self.dataset = dataset
        self.batch_size = batch_size
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.skip = skip_batches

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches[self.skip:])

    def __len__(self) -> int:
        return max(len(self.batches) - self.skip, 0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.train_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="UNet", choices=sorted(ARCHS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--iters", type=int, default=30, help="timed iterations per repetition")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repetitions of each loop")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations of each loop first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--default-malloc", action="store_true",
                        help="keep glibc's default of returning freed memory to the OS (noisier)")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if trainer/bare < {MIN_RATIO}")
    args = parser.parse_args(argv)
    for name in ("batch_size", "iters", "repeats", "warmup", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def bench_config(args: argparse.Namespace, run_dir: Path) -> dict:
    """config.json with the benchmark's model, sizes and run length; the trainer section is kept."""
    raw = read_json(REPO_ROOT / "config.json")
    if ARCHS[args.model] is not None:
        raw["arch"] = copy.deepcopy(ARCHS[args.model])
    loader = raw["train_loader"]["args"]
    # Exactly `iters` batches: the scheduler's iters_per_epoch is then the epoch the loops run.
    loader.update(num_samples=args.batch_size * args.iters, image_size=args.size, batch_size=args.batch_size)
    raw["val_loader"] = None  # only _train_epoch is measured
    # One warm-up epoch plus the timed ones: the Poly schedule spans the whole benchmark.
    raw["trainer"].update(epochs=1 + args.repeats, save_dir=str(run_dir))
    return load_config(None, base=raw)


def pregenerate(config: dict) -> tuple[list[Batch], object]:
    """One epoch of the configured train loader (augmented, uint8), kept in memory."""
    loader = build_loader(config, "train_loader")
    loader.set_epoch(1)
    return [(images, targets) for images, targets in loader], loader.dataset


def bare_epoch(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
               batches: list[Batch], aux_weight: float, mean: list[float], std: list[float]) -> None:
    """The reference: the plain PyTorch training loop, nothing else."""
    model.train()
    for images, targets in batches:
        images, targets = normalize_batch(images, mean, std), targets.long()
        outputs = model(images)
        loss = loss_fn(outputs["out"], targets)
        if "aux" in outputs and aux_weight:
            loss = loss + aux_weight * loss_fn(outputs["aux"], targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()


def trainer_epoch(trainer: Trainer, epoch: int, loader: InMemoryLoader) -> None:
    """``Trainer._train_epoch`` alone (no validation or checkpoint), from a fresh epoch."""
    trainer.train_loader = loader
    trainer.partial = {}  # what BaseTrainer._run_epoch does before a fresh epoch
    trainer._train_epoch(epoch, 0)


def timed(fn, *fn_args) -> float:
    start = time.perf_counter()
    fn(*fn_args)
    return time.perf_counter() - start


def sinks_description(trainer: Trainer) -> str:
    settings = trainer.settings
    tb = (f"on (log_per_iter {settings['log_per_iter']})" if trainer.tb.writer is not None else "off")
    # tqdm's disable=None (what the trainer passes) turns the bar off when stderr is not a TTY.
    if not trainer.show_progress:
        bar = "off (progress_bar false)"
    elif sys.stderr.isatty():
        bar = "on (drawn: stderr is a TTY)"
    else:
        bar = "on in config, not drawn (stderr is not a TTY, tqdm disable=None)"
    return f"TensorBoard {tb}; progress bar {bar}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    malloc = "glibc defaults" if args.default_malloc else (
        "freed memory kept (mallopt)" if keep_freed_memory() else "defaults (mallopt unavailable)")
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        run_dir = Path(tmp) / "run"
        run_dir.mkdir()
        config = bench_config(args, Path(tmp))
        batches, dataset = pregenerate(config)
        trainer = build_trainer(config, device, run_dir)

        model = build_model(config).to(device)
        model.load_state_dict(copy.deepcopy(trainer.model.state_dict()))
        loss_fn = build_loss(config, dataset).to(device)
        optimizer = build_optimizer(config, model)
        scheduler = build_scheduler(config, optimizer, len(batches))
        full = InMemoryLoader(batches, dataset, args.batch_size)
        warm = InMemoryLoader(batches[:args.warmup], dataset, args.batch_size)
        aux_weight = config["aux_loss_weight"]
        bare_args = (aux_weight, trainer.mean, trainer.std)

        print(f"{args.model} {sum(p.numel() for p in model.parameters()):,} params | batch {args.batch_size} | "
              f"{args.size}x{args.size} | {args.iters} iters x {args.repeats} repeats "
              f"(+{args.warmup} warm-up) | torch {torch.__version__} | threads {torch.get_num_threads()} | "
              f"malloc: {malloc}")
        print(f"optimizer {config['optimizer']['type']} {config['optimizer']['args']} | "
              f"lr_scheduler {config['lr_scheduler']['type']} (per iteration) | loss {config['loss']['type']}")
        print(f"trainer sinks: {sinks_description(trainer)}")

        seed = config["seed"]
        seed_epoch(seed, 1)
        bare_epoch(model, loss_fn, optimizer, scheduler, warm.batches, *bare_args)
        seed_epoch(seed, 1)
        trainer_epoch(trainer, 1, warm)
        images_per_rep = args.iters * args.batch_size
        bare_rates, trainer_rates = [], []
        for rep in range(args.repeats):
            epoch = rep + 2
            seed_epoch(seed, epoch)
            bare_rates.append(images_per_rep / timed(bare_epoch, model, loss_fn, optimizer, scheduler,
                                                     batches, *bare_args))
            seed_epoch(seed, epoch)
            trainer_rates.append(images_per_rep / timed(trainer_epoch, trainer, epoch, full))
            print(f"  repeat {rep + 1}: bare {bare_rates[-1]:7.1f} img/s   trainer {trainer_rates[-1]:7.1f} img/s")
        trainer.close()  # flushes and closes the TensorBoard writer

        # Same weights, data and steps: the two models must have followed the same path.
        drift = max((a - b).abs().max().item() for a, b in
                    zip(model.state_dict().values(), trainer.model.state_dict().values()) if a.is_floating_point())
        print(f"max |weight difference| after training: {drift:.2e}")

    bare, ours = statistics.median(bare_rates), statistics.median(trainer_rates)
    ratio = ours / bare
    print()
    print(f"{'':8}{'img/s (median)':>16}")
    print(f"{'bare':8}{bare:16.1f}")
    print(f"{'trainer':8}{ours:16.1f}")
    print(f"{'ratio':8}{ratio:16.3f}   (trainer / bare, required >= {MIN_RATIO})")
    if args.check and ratio < MIN_RATIO:
        print(f"FAIL: ratio {ratio:.3f} < {MIN_RATIO}", file=sys.stderr)
        return 1
    if args.check and drift > 0:
        print(f"FAIL: the two loops ended with different weights ({drift:.2e}): they did not do the same work",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
