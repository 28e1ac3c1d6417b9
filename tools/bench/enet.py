"""Training speed of our ENet against the widely used third-party PyTorch ENet, in one run.

    python -m tools.bench.enet [--variants fp32 bf16 ...] [--steps 10] [--repeats 3] [--warmup 2]
                               [--curve-steps 300 --curve-size 120 160] [--threads N]

Both networks train with Adam (lr 5e-4, weight decay 2e-4, as configs/camvid_enet.json) and
cross-entropy on the same batches (4 images of 360x480, 12 classes) held in memory: SyntheticShapes
scenes, so data loading is not measured. The reference network is imported from
``../shared/bench/reference_enet.py`` by path (it is a yardstick, not part of the project) and
always trains in fp32; each of our variants is a setting a user can pick:

    fp32            the default
    channels_last   ENet(channels_last=true)
    bf16            "amp": true in the config (bfloat16 autocast on the CPU)
    bf16_cl         both
    compile*        the same under torch.compile (slow to start: minutes on 2 cores)

Variants and reference alternate ``repeats`` times (ref, v1, v2, ..., ref, ...) so load from other
processes hits all of them alike; the median images/s of each and its ratio to the reference are
printed. ``--curve-steps N`` then trains our fp32 model and each variant for N steps from the same
weights on the same batches and dropout masks (``--curve-size``, smaller to be quick) and prints
the largest difference of their 20-step mean losses beside the noise floor: the same difference
between two fp32 runs whose dropout masks differ.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dataloader.synthetic import make_sample
from utils.registry import MODELS

REFERENCE = REPO_ROOT.parent / "shared" / "bench" / "reference_enet.py"
NUM_CLASSES = 12
BATCH = 4
# name -> (ENet args, bf16 autocast, torch.compile)
VARIANTS: dict[str, tuple[dict, bool, bool]] = {
    "fp32": ({}, False, False),
    "channels_last": ({"channels_last": True}, False, False),
    "bf16": ({}, True, False),
    "bf16_cl": ({"channels_last": True}, True, False),
    "compile": ({}, False, True),
    "compile_bf16": ({}, True, True),
    "compile_bf16_cl": ({"channels_last": True}, True, True),
}
Batch = tuple[torch.Tensor, torch.Tensor]


def load_reference() -> type[nn.Module]:
    """The reference ENet class, imported from its file outside the project."""
    if not REFERENCE.is_file():
        raise SystemExit(f"error: the reference ENet {REFERENCE} is missing")
    spec = importlib.util.spec_from_file_location("reference_enet", REFERENCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ENet


def make_batches(count: int, height: int, width: int) -> list[Batch]:
    """``count`` normalised batches of SyntheticShapes scenes (square scenes cropped to ``height x width``)."""
    batches = []
    for b in range(count):
        samples = [make_sample(0, "train", b * BATCH + i, size=max(height, width)) for i in range(BATCH)]
        images = np.stack([s[0][:height, :width] for s in samples]).astype(np.float32)
        images = torch.from_numpy(images).permute(0, 3, 1, 2).sub(127.5).div(64.0).contiguous()
        labels = torch.from_numpy(np.stack([s[1][:height, :width] for s in samples])).long()
        batches.append((images, labels))
    return batches


class Run:
    """One network with its optimizer and precision settings; ``step`` trains on one batch."""

    def __init__(self, model: nn.Module, bf16: bool, compiled: bool) -> None:
        self.model = model.train()
        self.forward: Callable = torch.compile(model) if compiled else model
        self.bf16 = bf16
        self.optimizer = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=2e-4)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            out = self.forward(images)
            logits = out["out"] if isinstance(out, dict) else out
        loss = F.cross_entropy(logits.float(), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def images_per_second(self, batches: list[Batch], steps: int) -> float:
        start = time.perf_counter()
        for i in range(steps):
            self.step(*batches[i % len(batches)])
        return steps * BATCH / (time.perf_counter() - start)


def ours(variant: str, seed: int = 0) -> Run:
    args, bf16, compiled = VARIANTS[variant]
    torch.manual_seed(seed)
    model = MODELS.build({"type": "ENet", "args": args}, "arch", num_classes=NUM_CLASSES)
    return Run(model, bf16, compiled)


def time_all(args: argparse.Namespace) -> None:
    batches = make_batches(2, 360, 480)
    torch.manual_seed(0)
    runs = {"reference fp32": Run(load_reference()(NUM_CLASSES), False, False)}
    runs.update({f"ours {v}": ours(v) for v in args.variants})
    for name, run in runs.items():
        start = time.perf_counter()
        run.images_per_second(batches, args.warmup)  # includes compiling
        print(f"warm-up {name}: {time.perf_counter() - start:.1f} s", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            rates[name].append(run.images_per_second(batches, args.steps))
    medians = {name: statistics.median(r) for name, r in rates.items()}
    baseline = medians["reference fp32"]
    print(f"\nbatch {BATCH}, 360x480, {args.steps} steps x {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads; median images/s:")
    for name, median in medians.items():
        spread = ", ".join(f"{r:.2f}" for r in rates[name])
        print(f"  {name:24s} {median:6.2f} img/s  {median / baseline:5.2f}x reference   ({spread})")


def loss_curve(run: Run, batches: list[Batch], steps: int, seed: int) -> np.ndarray:
    torch.manual_seed(seed)  # the dropout masks
    return np.array([run.step(*batches[i % len(batches)]).item() for i in range(steps)])


def smoothed(curve: np.ndarray, window: int = 20) -> np.ndarray:
    return np.convolve(curve, np.ones(window) / window, mode="valid")


def compare_curves(args: argparse.Namespace) -> None:
    height, width = args.curve_size
    batches = make_batches(8, height, width)
    initial = ours("fp32").model.state_dict()

    def curve(variant: str, dropout_seed: int) -> np.ndarray:
        run = ours(variant)
        run.model.load_state_dict(copy.deepcopy(initial))
        return smoothed(loss_curve(run, batches, args.curve_steps, dropout_seed))

    reference = curve("fp32", 1)
    noise = np.abs(curve("fp32", 2) - reference).max()
    print(f"\nloss curves, {args.curve_steps} steps at {height}x{width}, 20-step means; "
          f"fp32 from {reference[0]:.3f} to {reference[-1]:.3f}")
    print(f"  noise floor (fp32, other dropout masks): max |difference| {noise:.4f}")
    for variant in args.variants:
        if variant != "fp32":
            print(f"  {variant:22s} max |difference| {np.abs(curve(variant, 1) - reference).max():.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.enet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["fp32", "channels_last", "bf16", "bf16_cl"],
                        choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=10, help="timed steps per repetition; 0 skips timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--curve-steps", type=int, default=0, help="compare loss curves over this many steps")
    parser.add_argument("--curve-size", type=int, nargs=2, default=(120, 160), metavar=("H", "W"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    for name in ("repeats", "warmup", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.steps < 0 or args.curve_steps < 0:
        parser.error("--steps and --curve-steps must be >= 0")
    if args.curve_steps and args.curve_steps < 20:
        parser.error("--curve-steps must be at least 20 (the curves are compared as 20-step means)")
    torch.set_num_threads(args.threads)
    if args.steps:
        time_all(args)
    if args.curve_steps:
        compare_curves(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
