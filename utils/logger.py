"""Logging sinks of a run: console/file log, metrics.csv, TensorBoard, plots, summary.

Only the main process writes (see ``utils.distributed``); on other ranks these
helpers do nothing.
"""
from __future__ import annotations

import csv
import logging
import math
import sys
from pathlib import Path

import numpy as np

from utils import distributed
from utils.files import atomic_write


def run_logger(run_dir: Path | None, name: str = "segmentation") -> logging.Logger:
    """A logger printing to stdout and appending to ``run_dir/train.log`` (main process only).

    Errors are not logged here: the entry points print them to stderr.

    It does not touch the root logger, so importing or calling this has no global effect.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if distributed.is_main_process() else logging.WARNING)
    logger.propagate = False
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if run_dir is not None and distributed.is_main_process():
        file_handler = logging.FileHandler(Path(run_dir) / "train.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(file_handler)
    return logger


class MetricsCSV:
    """``metrics.csv``: one row per epoch, rewritten whole from the run's history."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write_all(self, rows: list[dict]) -> None:
        """Rewrite the file with ``rows`` (a resumed run passes its full history)."""
        if not distributed.is_main_process() or not rows:
            return
        fields = list(rows[0])
        for row in rows[1:]:
            fields += [k for k in row if k not in fields]
        with atomic_write(self.path) as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _fmt(v) for k, v in row.items()})


def _fmt(value):
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


class TensorBoard:
    """A ``SummaryWriter`` that is silent when disabled or not on the main process."""

    def __init__(self, log_dir: Path | None) -> None:
        self.writer = None
        if log_dir is not None and distributed.is_main_process():
            from torch.utils.tensorboard import SummaryWriter  # heavy import, only when used
            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None and value is not None and not math.isnan(value):
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, image_chw: np.ndarray, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image_chw, step, dataformats="CHW")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_learning_curves(history: list[dict], path: Path) -> None:
    """``learning_curves.png``: losses, and the validation metrics, against the epoch."""
    if not distributed.is_main_process() or not history:
        return
    from utils.plots import pyplot

    plt = pyplot()

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    _plot_series(ax_loss, history, {"train_loss": "train loss", "val_loss": "validation loss"}, "loss")
    _plot_series(ax_metric, history, {k: k for k in ("mIoU", "pixel_acc", "mean_acc", "fwIoU")}, "score")
    ax_metric.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_series(ax, history: list[dict], labels: dict[str, str], ylabel: str) -> None:
    """One line per key, through the epochs that have a value (validation may skip epochs)."""
    for key, label in labels.items():
        points = [(row["epoch"], _num(row.get(key))) for row in history if not math.isnan(_num(row.get(key)))]
        if points:
            ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax.transAxes)


def _num(value) -> float:
    return float("nan") if value is None or value == "" else float(value)
