"""Training images/s of bfloat16 autocast and of torch.compile against float32, in one run.

    python -m tools.bench.amp [--model UNet] [--batch-size 16] [--size 64] [--iters 20] [--repeats 3]
                              [--variants fp32 bf16 compile compile+bf16] [--camvid EPOCHS]

Every variant is the framework's own trainer (``builder.build_trainer``) with
``amp`` and ``compile`` set as a user would set them, trained from the same
initial weights on the same pre-generated, in-memory batches (see
``tools/bench/train_step.py``), so data loading is not measured. The variants
alternate ``repeats`` times after one untimed warm-up epoch each (which holds
torch.compile's compilation) and their medians are divided by float32's, both
in images per wall-clock second and per CPU-second of this process (the latter
is steadier on a machine shared with other jobs).

``--camvid EPOCHS`` then trains each variant for EPOCHS short epochs on
``../shared/data/camvid`` (a small UNet on 176x240 crops of a fixed subset)
and prints its validation mIoU, to show the faster variants learn as well.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

import torch

import builder
from tools.bench.train_step import ARCHS, InMemoryLoader, bench_config, keep_freed_memory, pregenerate, trainer_epoch
from utils.config import load_config, read_config

#: variant -> (amp, compile)
VARIANTS = {"fp32": ("off", False), "bf16": ("bf16", False), "compile": ("off", True),
            "compile+bf16": ("bf16", True)}
CAMVID_DIR = REPO_ROOT.parent / "shared" / "data" / "camvid"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.amp", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="UNet", choices=sorted(ARCHS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per repetition")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repetitions of each variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations of each variant first")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--camvid", type=int, default=0, metavar="EPOCHS",
                        help="also train each variant EPOCHS epochs on CamVid and report its mIoU")
    parser.add_argument("--camvid-subset", type=int, default=96, help="CamVid training images per epoch")
    args = parser.parse_args(argv)
    if "fp32" not in args.variants:
        parser.error("--variants must include fp32, the baseline")
    return args


def throughput(args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    """Median training images/s of each variant on the same batches and initial weights."""
    device = torch.device("cpu")
    base = bench_config(args, tmp)
    base["trainer"].update(tensorboard=False, progress_bar=False, monitor="off")
    batches, dataset = pregenerate(base)
    trainers, initial = {}, None
    for name in args.variants:
        amp, compile_model = VARIANTS[name]
        config = copy.deepcopy(base)
        config.update(amp=amp, compile=compile_model)
        run_dir = tmp / name
        run_dir.mkdir()
        trainer = builder.build_trainer(config, device, run_dir)
        if initial is None:
            initial = copy.deepcopy(trainer.unwrapped_model.state_dict())
        trainer.unwrapped_model.load_state_dict(initial)
        trainers[name] = trainer
    full = InMemoryLoader(batches, dataset, args.batch_size)
    warm = InMemoryLoader(batches[:args.warmup], dataset, args.batch_size)
    for name, trainer in trainers.items():
        started = time.perf_counter()
        trainer_epoch(trainer, 1, warm)
        print(f"  warm-up {name}: {time.perf_counter() - started:.1f} s (compilation included)")
    images = args.iters * args.batch_size
    rates: dict[str, list[float]] = {name: [] for name in trainers}
    cpu_rates: dict[str, list[float]] = {name: [] for name in trainers}
    for rep in range(args.repeats):
        for name, trainer in trainers.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            trainer_epoch(trainer, rep + 2, full)
            rates[name].append(images / (time.perf_counter() - started))
            cpu_rates[name].append(images / (time.process_time() - cpu_started))
        print(f"  repeat {rep + 1}: " + "   ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()) + " img/s")
    for trainer in trainers.values():
        trainer.close()
    return ({name: statistics.median(values) for name, values in rates.items()},
            {name: statistics.median(values) for name, values in cpu_rates.items()})


def camvid_miou(name: str, epochs: int, subset: int, tmp: Path) -> float:
    """Validation mIoU of a short CamVid run of one variant (same seed, data and model for all)."""
    raw = read_config(REPO_ROOT / "configs" / "camvid_unet.json")  # bases merged
    for key in ("train_loader", "val_loader"):
        raw[key]["args"].update(data_dir=str(CAMVID_DIR), num_workers=0)
    raw["arch"]["args"].update(base_channels=16)
    raw["train_loader"]["args"].update(subset=subset, transforms=[
        {"type": "RandomCrop", "args": {"size": [176, 240]}}, {"type": "RandomHorizontalFlip", "args": {"p": 0.5}}])
    raw["val_loader"]["args"]["transforms"] = [{"type": "Resize", "args": {"size": [180, 240]}}]
    raw["amp"], raw["compile"] = VARIANTS[name]
    raw["trainer"].update(epochs=epochs, val_per_epochs=epochs, save_dir=str(tmp / "camvid"), tensorboard=False,
                          progress_bar=False)
    config = load_config(None, base=raw)
    run_dir = tmp / f"camvid_{name}"
    run_dir.mkdir()
    summary = builder.build_trainer(config, torch.device("cpu"), run_dir).train()
    return summary["last_metrics"]["mIoU"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    keep_freed_memory()
    torch.set_num_threads(args.threads)
    bf16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False
    print(f"{args.model} | batch {args.batch_size} | {args.size}x{args.size} | {args.iters} iters x "
          f"{args.repeats} repeats | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"CPU AVX-512 BF16: {'yes' if bf16 else 'no'}")
    with tempfile.TemporaryDirectory(prefix="bench_amp_") as tmp:
        rates, cpu_rates = throughput(args, Path(tmp))
        # On a shared machine the wall clock also counts other jobs; CPU time counts only this one's work.
        print(f"\n{'variant':14}{'img/s':>10}{'/ fp32':>8}{'img per CPU-s':>16}{'/ fp32':>8}   (medians)")
        for name, rate in rates.items():
            print(f"{name:14}{rate:10.1f}{rate / rates['fp32']:8.2f}{cpu_rates[name]:16.2f}"
                  f"{cpu_rates[name] / cpu_rates['fp32']:8.2f}")
        if args.camvid:
            if not (CAMVID_DIR / "train.txt").is_file():
                print(f"\n--camvid: no CamVid at {CAMVID_DIR}", file=sys.stderr)
                return 1
            print(f"\nCamVid, UNet (base 16), {args.camvid} epoch(s) of {args.camvid_subset} 176x240 crops, "
                  "validation at 180x240:")
            for name in args.variants:
                started = time.perf_counter()
                miou = camvid_miou(name, args.camvid, args.camvid_subset, Path(tmp))
                print(f"  {name:14} val mIoU {miou:.4f}   ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
