"""How long a SIGTERM takes to stop a CamVid training run with a complete checkpoint.

    python -m tools.bench.stop [--data ../shared/data/camvid] [--rounds 3] [--warmup 10]
                               [--start-method forkserver] [--device cpu] [--timeout 600]

Each round starts ``train.py`` on ``configs/camvid_enet.json`` (ENet, batch 10, 2 data-loading
workers started by ``--start-method``; progress bar and TensorBoard off; run folder, class-weight
cache and save_dir in a temporary folder), waits until training iterations run ("Input
normalisation" is the last line printed before training starts, then ``--warmup`` seconds
more), sends SIGTERM to the run's process group, as Slurm and Kubernetes do, and times it until
the process has exited with a ``checkpoint.pth`` that ``torch.load(weights_only=True)`` reads.
Slurm and Kubernetes kill a job 30 s after its SIGTERM. It prints the CPU and core count, each
round's time to the saved checkpoint and to the exit, the iteration saved (with the time per
iteration since training started, worker start-up included), and the medians.
"""
from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "camvid"
CONFIG = REPO_ROOT / "configs" / "camvid_enet.json"
#: Printed last before training starts (train.py).
READY_LINE = "Run folder:"  # logged once the stop handlers are installed


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (the platform's processor name elsewhere)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def start(args: argparse.Namespace, out: Path) -> tuple[subprocess.Popen, list[str]]:
    """``train.py`` in its own process group (as a batch job is); its output lines collected as they come."""
    data = Path(args.data).resolve()
    overrides = [f"train_loader.args.data_dir={data}", f"val_loader.args.data_dir={data}",
                 "train_loader.args.num_workers=2", f"train_loader.args.start_method={args.start_method}",
                 "val_loader.args.num_workers=2", f"val_loader.args.start_method={args.start_method}",
                 "trainer.progress_bar=false", "trainer.tensorboard=false",
                 f"trainer.save_dir={out / 'saved'}", f"cache_dir={out / 'cache'}"]
    command = [sys.executable, str(REPO_ROOT / "train.py"), "-c", str(CONFIG), "--run-dir", str(out / "run"),
               "--device", args.device] + [a for o in overrides for a in ("--set", o)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                               start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    process.reader = reader  # joined once the process has exited
    return process, lines


def wait_for_training(process: subprocess.Popen, lines: list[str], args: argparse.Namespace) -> float | None:
    """When (``time.time()``) training started; None when the run ended first or never got there."""
    deadline = time.monotonic() + args.timeout
    while not any(READY_LINE in line for line in lines):
        if process.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.05)
    ready = time.time()
    time.sleep(args.warmup)
    return ready if process.poll() is None else None


def one_round(args: argparse.Namespace, out: Path) -> dict | None:
    """Start, signal, time; None when the run did not stop as it should (the reason is printed)."""
    run_dir = out / "run"
    process, lines = start(args, out)
    try:
        ready = wait_for_training(process, lines, args)
        if ready is None:
            print(f"error: train.py did not start training:\n{''.join(lines[-20:])}", file=sys.stderr)
            return None
        sent_wall, sent = time.time(), time.perf_counter()
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=args.timeout)
        exited = time.perf_counter() - sent
    except subprocess.TimeoutExpired:
        print(f"error: train.py still running {args.timeout} s after SIGTERM", file=sys.stderr)
        return None
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    process.reader.join(timeout=10)
    checkpoint = run_dir / "checkpoint.pth"
    if process.returncode != 130 or not checkpoint.is_file():
        print(f"error: train.py exited with {process.returncode} and "
              f"{'a' if checkpoint.is_file() else 'no'} checkpoint:\n{''.join(lines[-20:])}", file=sys.stderr)
        return None
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)  # complete: it loads
    said = next((line.strip() for line in lines if "SIGTERM: stopping" in line), "")
    saved = checkpoint.stat().st_mtime
    # Worker start-up included: an upper bound on the time of one iteration.
    per_iteration = (saved - ready) / state["iteration"] if state["epoch"] == 1 and state["iteration"] else None
    return {"exit_s": exited, "saved_s": saved - sent_wall, "epoch": state["epoch"], "iteration": state["iteration"],
            "epoch_iters": state["epoch_iters"], "per_iteration": per_iteration, "said": said}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.stop", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DATA_DIR), help="the CamVid folder (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=10.0,
                        help="seconds of training before the SIGTERM (default: %(default)s)")
    parser.add_argument("--start-method", default="forkserver", choices=["fork", "spawn", "forkserver"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds allowed to reach training, and to stop after the SIGTERM")
    args = parser.parse_args(argv)
    if not (Path(args.data) / "train").is_dir():
        print(f"error: --data {args.data}: no CamVid folder there (it needs train/, trainannot/...)",
              file=sys.stderr)
        return 2
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; device {args.device}; "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"ENet on CamVid ({CONFIG.name}), 2 {args.start_method} workers, SIGTERM {args.warmup:g} s "
          "into training")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for number in range(1, args.rounds + 1):
            out = Path(tmp) / f"round{number}"
            result = one_round(args, out)
            if result is None:
                return 1
            results.append(result)
            pace = (f" (at most {result['per_iteration']:.1f} s per iteration since training started)"
                    if result["per_iteration"] else "")
            print(f"round {number}: checkpoint saved {result['saved_s']:.2f} s and process exited "
                  f"{result['exit_s']:.2f} s after SIGTERM; saved epoch {result['epoch']}, iteration "
                  f"{result['iteration']} of {result['epoch_iters']}{pace}; load average {os.getloadavg()[0]:.1f}")
    print(f"printed on the signal: {results[0]['said']!r}")
    print(f"median over {len(results)} rounds: saved {statistics.median(r['saved_s'] for r in results):.2f} s, "
          f"exited {statistics.median(r['exit_s'] for r in results):.2f} s after SIGTERM")
    return 0


if __name__ == "__main__":
    sys.exit(main())
