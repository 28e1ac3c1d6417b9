"""The normalisation layers on real data: a short CamVid training run per norm, against BatchNorm.

    python -m tools.bench.norms [--data-dir ../shared/data/camvid] [--epochs 6] [--backbone mobilenet_v2]
                                [--crop 192 256] [--batch-size 8] [--norms BatchNorm GroupNorm InstanceNorm EvoNormS0]
                                [--device cpu]

Each norm trains ``configs/camvid_deeplabv3.json``'s DeepLabV3 (on ``--backbone``, output stride 16,
no pretrained weights, no auxiliary head) for ``--epochs`` epochs from the same seed, changing
only ``norm``, and is validated on CamVid's val split once at the end. It prints the validation
mIoU and the training time per epoch of each, with the time ratio against BatchNorm measured in
the same run. A short run says whether a norm trains and what it costs, not which one wins after
convergence.
"""
from __future__ import annotations

import argparse
import subprocess
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

import torch


def run(norm: str, args: argparse.Namespace, out: Path) -> dict | None:
    """Train and validate with ``norm`` (``train.py`` in its own process); None when training failed
    (``train.py`` printed why)."""
    run_dir = out / norm
    overrides = [f"norm={norm}", f"train_loader.args.data_dir={args.data_dir}",
                 f"val_loader.args.data_dir={args.data_dir}", f"arch.args.backbone={args.backbone}",
                 "arch.args.output_stride=16", "arch.args.aux_head=false", "use_synch_bn=false",
                 f"train_loader.args.batch_size={args.batch_size}",
                 f"train_loader.args.transforms[1].args.size=[{args.crop[0]},{args.crop[1]}]",
                 "optimizer.differential_lr=false", f"trainer.epochs={args.epochs}",
                 f"trainer.val_per_epochs={args.epochs}", f"trainer.save_period={args.epochs}",
                 "trainer.tensorboard=false", "trainer.progress_bar=false", "trainer.log_per_iter=1000",
                 f"cache_dir={out / 'cache'}"]
    argv = ["-c", str(REPO_ROOT / "configs" / "camvid_deeplabv3.json"), "--run-dir", str(run_dir),
            "--device", args.device] + [a for o in overrides for a in ("--set", o)]
    started = time.perf_counter()
    if subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *argv], cwd=REPO_ROOT).returncode != 0:
        return None
    wall = time.perf_counter() - started
    history = torch.load(run_dir / "checkpoint.pth", weights_only=True)["history"]
    train_epochs = [row["time"] for row in history[:-1]] or [history[-1]["time"]]  # the last one validates
    return {"mIoU": history[-1]["mIoU"], "epoch_s": sorted(train_epochs)[len(train_epochs) // 2], "wall": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.norms", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(REPO_ROOT.parent / "shared" / "data" / "camvid"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--backbone", default="mobilenet_v2")
    parser.add_argument("--crop", type=int, nargs=2, default=[192, 256])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--norms", nargs="+", default=["BatchNorm", "GroupNorm", "InstanceNorm", "EvoNormS0"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.norms[0] != "BatchNorm":
        args.norms.insert(0, "BatchNorm")  # the baseline of the ratios
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for norm in args.norms:
            results[norm] = run(norm, args, Path(tmp))
            if results[norm] is None:
                print(f"error: {norm}: training failed", file=sys.stderr)
                return 1
    base = results["BatchNorm"]
    print(f"\nDeepLabV3 {args.backbone}, CamVid, {args.epochs} epochs at {args.crop[0]}x{args.crop[1]}, "
          f"batch {args.batch_size}, {args.device}, load average {os.getloadavg()[0]:.1f}")
    print(f"{'norm':<14}{'val mIoU':>10}{'s/epoch':>10}{'time vs BatchNorm':>20}")
    for norm, result in results.items():
        print(f"{norm:<14}{result['mIoU']:>10.3f}{result['epoch_s']:>10.1f}"
              f"{result['epoch_s'] / base['epoch_s']:>20.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
