"""Data pipeline speed on CamVid: samples/s in one process, and whether loading slows training down.

    python -m tools.bench.data [--data-dir ../shared/data/camvid] [--samples 150] [--batch-size 4]
                               [--iters 6] [--repeats 3] [--workers 2] [--skip-steps] [--check]

1. **Pipeline**: the CamVid training pipeline (decode, random scale, crop, flip,
   rotation, blur, photometric distortion, then the normalisation the trainer
   applies) over ``--samples`` samples in this process, no workers: samples/s.
2. **Training step**: a small model (``config.json``'s UNet) trained on real
   CamVid batches from a loader with ``--workers`` workers, against the same
   steps on batches already in memory (the same tensors, collected first), in
   the same run, alternating ``--repeats`` times; the medians are compared.
   Before each real-data repetition the batches the workers queued during the
   in-memory one are taken untimed, so the timing starts in the steady state of
   training. The workers share the cores with the model: that is the cost measured.

``--check`` exits with 1 if the pipeline gives fewer than 100 samples per second
of CPU time (wall-clock rates depend on what else the machine runs; both are
printed, with the load average) or the real-data step takes more than 1.15
times the in-memory step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

import cv2
import torch
from torch import nn

from base.base_dataloader import BaseDataLoader
from utils.images import normalize_batch
from dataloader.camvid import CamVid
from dataloader.transforms import (GaussianBlur, PhotoMetricDistortion, RandomCrop,
                                   RandomHorizontalFlip, RandomRotate, RandomScale)
from builder import build_model
from utils.config import load_config

MIN_SAMPLES_PER_S = 100.0
MAX_STEP_RATIO = 1.15
IGNORE = 255
PREFETCH_FACTOR = 2  # batches each worker loads ahead (the DataLoader's default)


def pipeline(crop: list[int]) -> list:
    return [RandomScale(0.75, 1.5), RandomCrop(crop, ignore_index=IGNORE), RandomHorizontalFlip(0.5),
            RandomRotate(10.0, ignore_index=IGNORE), GaussianBlur(0.5, 1.5), PhotoMetricDistortion()]


def samples_per_second(dataset: CamVid, count: int) -> tuple[float, float]:
    """Load ``count`` samples of epoch 1 and normalise each as the trainer would.

    Single-threaded, as in a loader worker (OpenCV's and PyTorch's thread pools
    would only compete with the other workers there).

    Returns:
        ``(per wall-clock second, per second of this process's CPU time)``; the
        second is what one idle core gives, whatever else the machine runs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cv2.setNumThreads(0)
    for index in range(min(5, len(dataset))):  # warm-up: page cache, OpenCV's first calls
        dataset[(0, index)]
    start, start_cpu = time.perf_counter(), time.process_time()
    for i in range(count):
        image, _ = dataset[(1, i % len(dataset))]
        normalize_batch(image[None], dataset.mean, dataset.std)
    rates = count / (time.perf_counter() - start), count / (time.process_time() - start_cpu)
    torch.set_num_threads(threads)
    return rates


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches, iters: int, mean, std) -> float:
    """Seconds per step over ``iters`` batches from ``batches`` (an iterator)."""
    loss_fn = nn.CrossEntropyLoss(ignore_index=IGNORE)
    start = time.perf_counter()
    for _ in range(iters):
        images, labels = next(batches)
        logits = model(normalize_batch(images, mean, std))
        logits = logits["out"] if isinstance(logits, dict) else logits
        loss = loss_fn(logits, labels.long())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / iters


def step_ratio(args: argparse.Namespace) -> tuple[float, float]:
    """Median seconds per step: real loader with workers, and in memory."""
    config = load_config(REPO_ROOT / "config.json")
    # config.json's UNet with CamVid's classes.
    model = build_model({**config, "train_loader": {**config["train_loader"], "type": "CamVid"}}, pretrained=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    dataset = CamVid(args.data_dir, "train", pipeline(args.crop), IGNORE, seed=0)
    loader = BaseDataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                            drop_last=True, seed=0)
    epoch = iter(_epochs(loader))
    memory = [next(epoch) for _ in range(args.iters)]  # the batches of the in-memory runs
    train_steps(model, optimizer, iter(memory), min(3, args.iters), dataset.mean, dataset.std)  # warm-up
    real, in_memory = [], []
    for _ in range(args.repeats):
        in_memory.append(train_steps(model, optimizer, iter(memory), args.iters, dataset.mean, dataset.std))
        for _ in range(args.workers * PREFETCH_FACTOR):  # what the workers queued meanwhile: steady state next
            next(epoch)
        real.append(train_steps(model, optimizer, epoch, args.iters, dataset.mean, dataset.std))
    loader.shutdown()
    return statistics.median(real), statistics.median(in_memory)


def _epochs(loader: BaseDataLoader):
    """Batches of epoch 1, 2, ... without end (the workers persist across epochs)."""
    epoch = 0
    while True:
        epoch += 1
        loader.set_epoch(epoch)
        yield from loader


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--samples", type=int, default=150, help="samples timed in the pipeline part")
    parser.add_argument("--crop", type=int, nargs=2, default=[352, 480], help="crop height width")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--iters", type=int, default=6, help="timed training steps per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--skip-steps", action="store_true", help="only measure the pipeline")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 below {MIN_SAMPLES_PER_S:.0f} samples/s or above {MAX_STEP_RATIO}x")
    args = parser.parse_args(argv)
    for name in ("samples", "batch_size", "iters", "repeats", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not Path(args.data_dir).is_dir():
        parser.error(f"--data-dir {args.data_dir}: no CamVid folder there")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} (other processes share them)")
    dataset = CamVid(args.data_dir, "train", pipeline(args.crop), IGNORE, seed=0)
    rate, cpu_rate = samples_per_second(dataset, args.samples)
    print(f"pipeline: {rate:.0f} samples/s in one process, {cpu_rate:.0f} per second of CPU time "
          f"({args.crop[0]}x{args.crop[1]} crops; target >= {MIN_SAMPLES_PER_S:.0f})")
    ok = cpu_rate >= MIN_SAMPLES_PER_S
    if not args.skip_steps:
        real, in_memory = step_ratio(args)
        print(f"training step, batch {args.batch_size}: {1000 * real:.0f} ms with {args.workers} workers on "
              f"real data, {1000 * in_memory:.0f} ms in memory: {real / in_memory:.2f}x "
              f"(target <= {MAX_STEP_RATIO})")
        ok = ok and real / in_memory <= MAX_STEP_RATIO
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
