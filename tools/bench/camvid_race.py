"""Race our ENet CamVid recipe against the peer ENet script for the same wall-clock budget on the CPU.

    python -m tools.bench.camvid_race [--minutes 20] [--every 2] [--data ../shared/data/camvid]
                                      [--eval-split val] [--out DIR] [--config configs/camvid_enet_fast.json]
                                      [--peer-epochs 100] [--our-set KEY=VALUE ...]

Both trainings run AT THE SAME TIME, each pinned to its own core (``sched_setaffinity``) with one
thread (``OMP_NUM_THREADS=1 MKL_NUM_THREADS=1``) and data loading in the training process
(our config with ``num_workers: 0``, the peer with ``--workers 0``). Every ``--every`` minutes the
race copies each side's latest weights (ours: the run folder's ``checkpoint.pth``, saved every
epoch; the peer: its own checkpoint file ``SAVE/ENet``, which it writes only when its validation,
every 10 epochs and after its last epoch (``--peer-epochs``), improves) and reads each side's CPU time (``/proc/PID/stat`` of its process tree).
When the budget ends both are stopped and every copy is scored in this process, the same way
(:func:`score`): images of ``--eval-split`` resized to the resolution the side trained at, logits
upsampled bilinearly to the label's full 360x480, IoU over the 11 classes with void ignored, one
confusion matrix over the split.

It prints both commands, the hardware, a table (minute, CPU-minutes and mIoU of each side), and
writes ``race.json`` and ``race.png`` (mIoU against CPU-minutes) into ``--out``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tools.bench.stop import cpu_model
from utils.metrics import ConfusionMatrix, segmentation_metrics

REPO_ROOT = Path(__file__).resolve().parents[2]

DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "camvid"
PEER_DIR = REPO_ROOT.parent / "shared" / "bench" / "peer_enet_camvid"
CONFIG = REPO_ROOT / "configs" / "camvid_enet_fast.json"
NUM_CLASSES = 11  # CamVid labels 0-10; 11 is void
IGNORE = 255
CLASS_NAMES = ("Sky", "Building", "Pole", "Road", "Pavement", "Tree", "SignSymbol", "Fence", "Car",
               "Pedestrian", "Bicyclist")
#: What the peer's data folder needs: its own name -> the name in the SegNet CamVid folder.
PEER_LINKS = {"train": "train", "trainannot": "trainannot", "val": "val", "valannot": "valannot",
              "test": "val", "testannot": "valannot", "train.txt": "train.txt", "val.txt": "val.txt"}
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------- data folder of the peer

def build_peer_data(data: str | Path, dest: str | Path) -> Path:
    """A folder of symlinks into ``data`` with the layout the peer needs (``test`` -> ``val``).

    Nothing is copied; entries missing in ``data`` (``train.txt``, ``val.txt``) are left out.

    Raises:
        FileNotFoundError: ``data`` lacks one of ``train``, ``trainannot``, ``val``, ``valannot``.
    """
    data, dest = Path(data).resolve(), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name, source in PEER_LINKS.items():
        target = data / source
        if not target.exists():
            if name.endswith(".txt"):
                continue
            raise FileNotFoundError(f"{target}: not found (the CamVid folder needs {source}/)")
        link = dest / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target, target_is_directory=target.is_dir())
    return dest


# ---------------------------------------------------------------- CPU time from /proc

def _stat_fields(pid: int) -> list[str]:
    """Fields of ``/proc/PID/stat`` after the command name (which may hold spaces and parentheses)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2:].split()


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from each process's parent field)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat_fields(int(entry.name))[1]) == pid:
                    kids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return kids


def is_running(pid: int) -> bool:
    """The process exists and is not a zombie (an exited child not yet waited for keeps its times)."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, ValueError, IndexError):
        return False


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants, live and waited for.

    The process's own ``utime + stime`` plus ``cutime + cstime`` (children it has waited for),
    and the same for every live descendant. An exited process not yet waited for (a zombie) still
    has its times; 0.0 for a process that is gone (the race waits for its racers only at the end).
    """
    tick = os.sysconf("SC_CLK_TCK")
    total, todo, seen = 0, [pid], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            fields = _stat_fields(current)
        except (OSError, ValueError):
            continue
        # after the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
        total += sum(int(fields[i]) for i in (11, 12, 13, 14))
        todo.extend(_children(current))
    return total / tick


# ---------------------------------------------------------------- scoring, one function for both

def split_pairs(data: str | Path, split: str) -> list[tuple[Path, Path]]:
    """``(image, label)`` of a SegNet-layout split: ``split/*.png`` with ``splitannot/`` of the same name."""
    data = Path(data)
    pairs = [(image, data / f"{split}annot" / image.name) for image in sorted((data / split).glob("*.png"))]
    if not pairs:
        raise FileNotFoundError(f"{data / split}: no .png images")
    missing = [str(label) for _, label in pairs if not label.is_file()]
    if missing:
        raise FileNotFoundError(f"labels missing, e.g. {missing[0]}")
    return pairs


def read_pair(image: Path, label: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, 3, H, W)`` float 0-255 RGB image and ``(1, H, W)`` int64 label with void (>= 11) as 255."""
    from PIL import Image
    pixels = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32)
    classes = np.asarray(Image.open(label), dtype=np.int64)
    if classes.ndim == 3:
        classes = classes[..., 0]
    classes = np.where(classes < NUM_CLASSES, classes, IGNORE)
    return (torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous(),
            torch.from_numpy(classes).unsqueeze(0))


def predict_full(forward: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor,
                 size: tuple[int, int], label_size: tuple[int, int]) -> torch.Tensor:
    """Class indices at ``label_size``: the image resized to ``size`` (bilinear, antialiased), the
    logits upsampled bilinearly to ``label_size``, the argmax over the first 11 channels."""
    small = F.interpolate(image, size=size, mode="bilinear", align_corners=False, antialias=True)
    logits = forward(small)[:, :NUM_CLASSES]
    logits = F.interpolate(logits.float(), size=label_size, mode="bilinear", align_corners=False)
    return logits.argmax(1)


@torch.no_grad()
def score(forward: Callable[[torch.Tensor], torch.Tensor], pairs: Sequence[tuple[Path, Path]],
          size: tuple[int, int]) -> dict:
    """mIoU of ``forward`` (0-255 RGB ``(1, 3, h, w)`` -> logits) over ``pairs``, one confusion matrix.

    Returns ``{"mIoU", "pixel_acc", "class_iou"}``; the 11 CamVid classes, void ignored.
    """
    confusion = ConfusionMatrix(NUM_CLASSES, ignore_index=IGNORE)
    for image_path, label_path in pairs:
        image, label = read_pair(image_path, label_path)
        confusion.update(predict_full(forward, image, size, tuple(label.shape[-2:])), label)
    metrics = segmentation_metrics(confusion.matrix, list(CLASS_NAMES))
    return {"mIoU": metrics["mIoU"], "pixel_acc": metrics["pixel_acc"], "class_iou": metrics["class_iou"]}


def our_forward(checkpoint: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """Our model of a checkpoint copy, fed 0-255 pixels (normalised as in training)."""
    import builder
    from predictor import Normalized
    model, meta, _, _ = builder.load_trained(None, str(checkpoint))
    return Normalized(model, meta["mean"], meta["std"]).eval()


def load_peer_class(peer_dir: Path = PEER_DIR) -> type:
    """The peer's ``ENet`` class, imported by path from its ``models/enet.py``."""
    spec = importlib.util.spec_from_file_location("peer_enet_model", Path(peer_dir) / "models" / "enet.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ENet


def peer_forward(checkpoint: Path, peer_dir: Path = PEER_DIR) -> Callable[[torch.Tensor], torch.Tensor]:
    """The peer's ENet (12 outputs, the last one void) of a copy of its checkpoint, fed 0-255 pixels
    (it trains on ``ToTensor`` 0-1 images, unnormalised)."""
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - its miou may be a numpy scalar; a file the race itself made
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    weights = state["state_dict"]
    num_classes = next(v for k, v in weights.items() if k.startswith("transposed_conv")).shape[1]
    model = load_peer_class(peer_dir)(num_classes)
    model.load_state_dict(weights)
    model.eval()
    return lambda x: model(x / 255.0)


# ---------------------------------------------------------------- the race

def copy_checkpoint(source: Path, dest: Path, check: Callable[[Path], object], tries: int = 5) -> bool:
    """Copy ``source`` to ``dest`` and read it back with ``check``; retry on a partial file. False: none."""
    for attempt in range(tries):
        if not source.is_file():
            return False
        try:
            shutil.copyfile(source, dest)
            check(dest)
            return True
        except Exception:  # noqa: BLE001 - written while we copied: try again
            time.sleep(0.5 * (attempt + 1))
    dest.unlink(missing_ok=True)
    return False


def _epoch_of(path: Path, our_side: bool) -> int | None:
    state = torch.load(path, map_location="cpu", weights_only=our_side) if our_side else \
        torch.load(path, map_location="cpu", weights_only=False)
    return int(state["epoch"])


def pinned(command: list[str], core: int) -> list[str]:
    """``command`` under ``taskset -c core`` (where taskset is installed; :func:`start` pins it anyway)."""
    taskset = shutil.which("taskset")
    return [taskset, "-c", str(core), *command] if taskset else command


def start(command: list[str], core: int, cwd: Path | str, env: dict, log) -> subprocess.Popen:
    """``command`` in its own process group, pinned to ``core`` (its later children inherit the mask)."""
    process = subprocess.Popen(pinned(command, core), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        os.sched_setaffinity(process.pid, {core})
    except ProcessLookupError:
        pass  # already gone; its log says why
    return process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.lower().split("x"))
    return height, width


def commands(args: argparse.Namespace, out: Path, peer_data: Path) -> tuple[list[str], list[str]]:
    data = Path(args.data).resolve()
    ours = [sys.executable, str(REPO_ROOT / "train.py"), "-c", str(Path(args.config).resolve()),
            "--run-dir", str(out / "ours_run"), "--device", "cpu"]
    for override in [f"train_loader.args.data_dir={data}", "train_loader.args.num_workers=0",
                     "trainer.save_period=1", "trainer.progress_bar=false", "trainer.tensorboard=false",
                     f"trainer.save_dir={out / 'saved'}", f"cache_dir={out / 'cache'}", *args.our_set]:
        ours += ["--set", override]
    height, width = args.peer_size
    peer = [sys.executable, "main.py", "--dataset", "camvid", "--dataset-dir", str(peer_data),
            "--height", str(height), "--width", str(width), "--epochs", str(args.peer_epochs),
            "--device", "cpu", "--workers", "0", "--save-dir", str(out / "peer_save"), "--name", "ENet"]
    return ours, peer


def race(args: argparse.Namespace, out: Path) -> list[dict]:
    """Run both for the budget; the snapshots taken (files copied, CPU seconds), not yet scored."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        raise RuntimeError(f"the race needs two cores, this process may use {cores}")
    peer_data = build_peer_data(args.data, out / "peer_data")
    (out / "peer_save").mkdir(parents=True, exist_ok=True)
    snapshots_dir = out / "snapshots"
    snapshots_dir.mkdir(exist_ok=True)
    ours_cmd, peer_cmd = commands(args, out, peer_data)
    env = {**os.environ, **THREAD_ENV}
    print(f"ours (cwd {REPO_ROOT}): {shlex.join(pinned(ours_cmd, cores[0]))}")
    print(f"peer (cwd {args.peer_dir}): {shlex.join(pinned(peer_cmd, cores[1]))}")
    print(f"env of both: {' '.join(f'{k}={v}' for k, v in THREAD_ENV.items())}", flush=True)
    with open(out / "ours.log", "w") as ours_log, open(out / "peer.log", "w") as peer_log:
        ours = start(ours_cmd, cores[0], REPO_ROOT, env, ours_log)
        peer = start(peer_cmd, cores[1], args.peer_dir, env, peer_log)
        began = time.monotonic()
        snapshots: list[dict] = []
        try:
            points = [args.every * k for k in range(1, int(args.minutes / args.every + 1e-9) + 1)]
            if not points or points[-1] < args.minutes - 1e-9:
                points.append(args.minutes)
            for minute in points:
                time.sleep(max(0.0, began + minute * 60 - time.monotonic()))
                snap = {"minute": minute, "wall_s": time.monotonic() - began,
                        "ours_cpu_s": tree_cpu_seconds(ours.pid), "peer_cpu_s": tree_cpu_seconds(peer.pid),
                        "ours_alive": is_running(ours.pid), "peer_alive": is_running(peer.pid)}
                for side, source, our_side in (("ours", out / "ours_run" / "checkpoint.pth", True),
                                               ("peer", out / "peer_save" / "ENet", False)):
                    dest = snapshots_dir / f"{side}_min{minute:g}.pth"
                    got = copy_checkpoint(source, dest, lambda p, o=our_side: _epoch_of(p, o))
                    snap[f"{side}_file"] = str(dest) if got else None
                    snap[f"{side}_epoch"] = _epoch_of(dest, our_side) if got else None
                snapshots.append(snap)
                print(f"  minute {minute:g}: ours {snap['ours_cpu_s'] / 60:.2f} CPU-min, epoch "
                      f"{snap['ours_epoch']}; peer {snap['peer_cpu_s'] / 60:.2f} CPU-min, checkpoint epoch "
                      f"{snap['peer_epoch']}", flush=True)
        finally:
            stop(ours)
            stop(peer)
    for side, process in (("ours", ours), ("peer", peer)):
        if process.returncode not in (0, 130, -signal.SIGTERM):
            tail = (out / f"{side}.log").read_text().splitlines()[-15:]
            print(f"warning: {side} exited with {process.returncode}:\n" + "\n".join(tail), file=sys.stderr)
    return snapshots


def plot(results: list[dict], path: Path) -> None:
    from utils.plots import pyplot
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(6, 4))
    for side, label in (("ours", "ours (camvid_enet_fast)"), ("peer", "peer (PyTorch-ENet main.py)")):
        points = [(r[f"{side}_cpu_s"] / 60, r[f"{side}_mIoU"]) for r in results if r[f"{side}_mIoU"] is not None]
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
    axes.set_xlabel("CPU-minutes (process tree, user + system)")
    axes.set_ylabel("mIoU (11 classes, val)")
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend()
    else:
        axes.text(0.5, 0.5, "no checkpoint saved yet", ha="center", transform=axes.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench.camvid_race", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=20.0, help="wall-clock budget (default: %(default)s)")
    parser.add_argument("--every", type=float, default=2.0, help="minutes between snapshots (default: %(default)s)")
    parser.add_argument("--data", default=str(DATA_DIR), help="the CamVid folder (default: %(default)s)")
    parser.add_argument("--eval-split", default="val", help="split scored (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--config", default=str(CONFIG), help="our config (default: %(default)s)")
    parser.add_argument("--our-set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra --set for our train.py (repeatable)")
    parser.add_argument("--our-size", type=parse_size, default=(180, 240),
                        help="HxW our recipe trains at (its 0.5-scale crops; default: 180x240)")
    parser.add_argument("--peer-size", type=parse_size, default=(180, 240),
                        help="HxW the peer trains at (--height, --width; default: 180x240)")
    parser.add_argument("--peer-epochs", type=int, default=100, help="the peer's --epochs (default: %(default)s)")
    parser.add_argument("--peer-dir", default=str(PEER_DIR), help="the peer's folder (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (Path(args.data) / "train").is_dir():
        print(f"error: --data {args.data}: no CamVid folder there (it needs train/, trainannot/...)", file=sys.stderr)
        return 2
    if not (Path(args.peer_dir) / "main.py").is_file():
        print(f"error: --peer-dir {args.peer_dir}: no main.py there", file=sys.stderr)
        return 2
    pairs = split_pairs(args.data, args.eval_split)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="camvid_race_"))
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores (this process may use {len(os.sched_getaffinity(0))}); "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}")
    print(f"budget {args.minutes:g} min wall clock, snapshots every {args.every:g} min; scored on "
          f"{args.eval_split} ({len(pairs)} images); output in {out}", flush=True)
    snapshots = race(args, out)
    print(f"racers stopped; load average {os.getloadavg()[0]:.1f}; scoring {len(snapshots)} snapshots per side",
          flush=True)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    results = []
    for snap in snapshots:
        row = dict(snap)
        for side, make, size in (("ours", our_forward, args.our_size),
                                 ("peer", lambda p: peer_forward(p, Path(args.peer_dir)), args.peer_size)):
            row[f"{side}_mIoU"], row[f"{side}_class_iou"] = None, None
            if snap[f"{side}_file"]:
                scores = score(make(Path(snap[f"{side}_file"])), pairs, size)
                row[f"{side}_mIoU"], row[f"{side}_class_iou"] = scores["mIoU"], scores["class_iou"]
        results.append(row)
    print()
    print("| minute | CPU-min ours | ours mIoU | ours epoch | CPU-min peer | peer mIoU | peer ckpt epoch |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['minute']:g} | {r['ours_cpu_s'] / 60:.2f} | {fmt(r['ours_mIoU'], '.3f')} | "
              f"{fmt(r['ours_epoch'], 'd')} | {r['peer_cpu_s'] / 60:.2f} | {fmt(r['peer_mIoU'], '.3f')} | "
              f"{fmt(r['peer_epoch'], 'd')} |")
    print("(ours epoch: epochs finished in checkpoint.pth; peer ckpt epoch: the epoch of its last saved "
          "checkpoint, written only when its validation (every 10 epochs and at its last epoch) improves; "
          "'-': no checkpoint yet)")
    ours_cmd, peer_cmd = commands(args, out, out / "peer_data")
    (out / "race.json").write_text(json.dumps({
        "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__, "minutes": args.minutes,
        "every": args.every, "eval_split": args.eval_split, "eval_images": len(pairs),
        "our_size": list(args.our_size), "peer_size": list(args.peer_size),
        "commands": {"ours": ours_cmd, "ours_cwd": str(REPO_ROOT), "peer": peer_cmd, "peer_cwd": str(args.peer_dir)},
        "snapshots": results}, indent=2))
    plot(results, out / "race.png")
    print(f"wrote {out / 'race.json'} and {out / 'race.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
