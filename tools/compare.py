"""Compare runs: their config differences, best scores and per-class IoU, and their learning curves.

    python -m tools.compare RUN_OR_SWEEP [RUN_OR_SWEEP ...] [-o comparison.png]

Each argument is a run folder (it holds ``config.json``), a sweep folder (``python -m tools.sweep``:
all of its runs) or a folder of run folders (``saved/CamVid_UNet/``: every run under it). The
table has one row per run: the config values that differ between the runs (all others are equal),
the best value of the monitored metric (``trainer.monitor``) and its epoch, and the IoU of each
class at that epoch. The PNG overlays the runs' learning curves (training loss, validation loss
and the monitored metric, from each run's ``metrics.csv``).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from utils.errors import DataError, run_command
from utils.plots import pyplot
from utils.trackers import flatten

#: Widest value shown in a table cell (longer ones are cut with "...").
CELL = 24


@dataclass
class Run:
    """What a run folder says about its run."""
    folder: Path
    config: dict
    history: list[dict] = field(default_factory=list)  # metrics.csv rows (numbers as floats)
    finished: bool = False  # summary.json written: the run ended (last epoch or early stop)
    metric: str | None = None  # the monitored metric (mIoU), None when monitor is off
    mode: str = "max"
    best: float | None = None
    best_epoch: int | None = None
    best_row: dict = field(default_factory=dict)


def read_run(folder: str | Path) -> Run:
    """The run in ``folder``: its config, metrics and best epoch (from summary.json once finished)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{folder}: not a run folder (no config.json)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{folder / 'config.json'}: cannot read it ({exc})") from None
    run = Run(folder, config, history=read_metrics(folder / "metrics.csv"))
    monitor = str(config.get("trainer", {}).get("monitor", "max mIoU"))
    if monitor != "off":
        run.mode, run.metric = monitor.split()
    summary_path = folder / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    run.finished = summary is not None
    if summary is not None and summary.get("best_metrics"):
        run.best_row = summary["best_metrics"]
    elif run.metric is not None:
        scored = [row for row in run.history if _finite(row.get(run.metric))]
        if scored:
            pick = max if run.mode == "max" else min
            run.best_row = pick(scored, key=lambda row: row[run.metric])
    if run.best_row and run.metric is not None and _finite(run.best_row.get(run.metric)):
        run.best = float(run.best_row[run.metric])
        run.best_epoch = int(run.best_row["epoch"])
    return run


def read_metrics(path: Path) -> list[dict]:
    """``metrics.csv`` as dicts of floats (empty cells are NaN); no file, no rows."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as handle:
        return [{k: _number(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def _number(text: str):
    try:
        return float(text) if text != "" else math.nan
    except ValueError:
        return text


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def find_runs(paths: list[str]) -> list[Path]:
    """The run folders named by ``paths``: run folders, sweep folders, folders of runs."""
    found: list[Path] = []
    for text in paths:
        path = Path(text)
        if not path.is_dir():
            raise DataError(f"{path}: no such folder (give run folders or sweep folders)")
        if (path / "config.json").is_file():
            found.append(path)
            continue
        runs = sorted(p.parent for p in path.rglob("config.json")
                      if (p.parent / "metrics.csv").is_file() or (p.parent / "checkpoint.pth").is_file())
        if not runs:
            raise DataError(f"{path}: holds no run folder (a folder with config.json)")
        found += runs
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return unique


def run_names(folders: list[Path]) -> list[str]:
    """Short unique names: the folder names, with their parents where needed to tell them apart."""
    for depth in range(1, 6):
        names = [os.path.join(*p.parts[-depth:]) for p in folders]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in folders]


def differences(configs: list[dict]) -> list[str]:
    """The flattened config keys whose values are not the same in every config."""
    flat = [flatten(c) for c in configs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    return [k for k in keys if len({f.get(k, "(unset)") for f in flat}) > 1]


def table(runs: list[Run], names: list[str]) -> list[str]:
    """The comparison as aligned text lines."""
    keys = differences([r.config for r in runs]) if len(runs) > 1 else []
    metrics = sorted({r.metric for r in runs if r.metric}) or ["mIoU"]
    classes = list(dict.fromkeys(k for r in runs for k in r.best_row if k.startswith("iou/")))
    header = ["run", *keys, *metrics, "epoch", "finished", *[c.removeprefix("iou/") for c in classes]]
    rows = []
    for run, name in zip(runs, names):
        values = flatten(run.config)
        row = [name, *[_cut(values.get(k, "(unset)")) for k in keys]]
        row += [_score(run.best_row.get(m), 4) for m in metrics]
        row += [str(run.best_epoch) if run.best_epoch else "-", "yes" if run.finished else "no"]
        row += [_score(run.best_row.get(c), 3) for c in classes]
        rows.append(row)
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _cut(text: str) -> str:
    return text if len(text) <= CELL else text[:CELL - 3] + "..."


def _score(value, digits: int) -> str:
    return f"{value:.{digits}f}" if _finite(value) else "-"


def plot(runs: list[Run], names: list[str], path: Path) -> None:
    """The learning curves of all runs overlaid: training loss, validation loss, monitored metric."""
    plt = pyplot()
    metric = next((r.metric for r in runs if r.metric), "mIoU")
    panels = [("train_loss", "training loss"), ("val_loss", "validation loss"), (metric, metric)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, (key, title) in zip(axes, panels):
        for run, name in zip(runs, names):
            points = [(row["epoch"], row[key]) for row in run.history if _finite(row.get(key))]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        more = ax.get_legend_handles_labels()
        handles += [h for h, label in zip(*more) if label not in labels]
        labels += [label for label in more[1] if label not in labels]
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize="small")
    fig.tight_layout(rect=(0, 0.06 + 0.04 * (len(labels) // 4), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Compare runs: config differences, best scores, per-class IoU "
                                                 "and learning curves.")
    parser.add_argument("paths", nargs="+", metavar="RUN_OR_SWEEP",
                        help="run folders, sweep folders or folders of runs")
    parser.add_argument("-o", "--out", default="comparison.png",
                        help="PNG of the overlaid learning curves (default: comparison.png)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    folders = find_runs(args.paths)
    runs = [read_run(folder) for folder in folders]
    names = run_names(folders)
    print("\n".join(table(runs, names)))
    plot(runs, names, Path(args.out))
    print(f"Learning curves: {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
