"""The epoch loop shared by every trainer: checkpoints, resume, best model, early stop, Ctrl-C.

A concrete trainer implements :meth:`BaseTrainer._train_epoch` and
:meth:`BaseTrainer._valid_epoch`; this class owns everything around them.

Resume is exact: a checkpoint records the epoch, how many of its iterations are
done and whether its validation ran, plus the model, optimizer, scheduler,
scaler, weight-average (EMA) and RNG states. Data order and augmentation are pure functions of
``(seed, epoch)``, so a run stopped anywhere (Ctrl-C, SIGTERM, a crash after a
checkpoint) and resumed with the same config gives the same weights, bit for
bit on the CPU, as the uninterrupted run. (A schedule's shape depends on
``trainer.epochs``: resuming with another number of epochs follows the new
schedule from the current iteration.)
"""
from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from base.base_dataloader import STOP_SIGNALS
from utils import distributed
from utils.checkpoint import load_checkpoint, load_model_weights, rng_state, save_atomic, set_rng_state
from utils.errors import CheckpointError, ConfigError, TrainingError
from utils.files import write_json
from utils.logger import MetricsCSV, plot_learning_curves, run_logger

#: Prefix of the validation scores of the weights' moving average in a history row (``ema/mIoU``).
EMA_PREFIX = "ema/"

# torchrun forwards the terminal's Ctrl-C to its workers, which then see it twice in
# quick succession; only a press after this many seconds means "quit without saving".
FORCE_QUIT_AFTER = 2.0


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed the global generator for an epoch's model-side randomness (dropout)."""
    torch.manual_seed(seed * 1_000_003 + epoch)


@dataclass(frozen=True)
class TrainerSettings:
    """How the training loop runs: the validated ``trainer`` section and the few top-level keys it needs.

    ``builder.trainer_settings`` makes it from a config; the meaning of each field is that of
    the config key of the same name (see docs/config.md).
    """
    epochs: int = 100
    save_period: int = 1
    monitor: str = "max mIoU"
    early_stop: int = 0
    val: bool = True
    val_per_epochs: int = 1
    log_per_iter: int = 20
    progress_bar: bool = True
    accumulate_steps: int = 1
    clip_grad_norm: float | None = None
    seed: int = 42
    #: ``off``, ``bf16`` or ``fp16`` (already resolved for the device).
    amp: str = "off"
    channels_last: bool = False
    aux_loss_weight: float = 0.4
    ignore_index: int = 255
    #: Where TensorBoard events go; None disables them.
    tensorboard_dir: Path | None = None
    #: ``trainer.trackers``, ``trainer.mlflow`` and ``trainer.wandb``: the sinks of ``utils.trackers``.
    trackers: tuple[str, ...] | list[str] = ("tensorboard",)
    mlflow: Mapping[str, Any] | None = None
    wandb: Mapping[str, Any] | None = None
    #: The tracked runs a resumed run continues (``{"mlflow": run id}``), from its checkpoint.
    tracker_runs: Mapping[str, str] = field(default_factory=dict)
    #: The config's ``metrics`` section (``classes`` or ``exclude``): the classes validation's means
    #: over classes (mIoU, mean_acc, mean_f1...) average; None: every class.
    metrics: Mapping[str, Any] | None = None
    #: ``train_loader.args.subset``: it fixes an epoch's batches, so a mid-epoch resume checks it.
    subset: int | None = None
    #: The resolved config, stored in every checkpoint so that the run can be resumed and its model
    #: rebuilt; the loop never reads it (trackers log it as the run's parameters).
    record: Mapping[str, Any] = field(default_factory=dict)


class TrainingInterrupted(Exception):
    """Raised after Ctrl-C (or SIGTERM) once the checkpoint is safely written."""

    def __init__(self, checkpoint: Path, epoch: int, iteration: int) -> None:
        super().__init__(f"interrupted at epoch {epoch}, iteration {iteration}; "
                         f"checkpoint saved to {checkpoint}")
        self.checkpoint = checkpoint


class StopWaiting(BaseException):
    """Raised by the first stop signal in a wait the loop may leave at once (see ``_leave_wait``).

    A ``BaseException``, as ``KeyboardInterrupt`` is: the data loader's ``except Exception`` lets it through.
    """


class BaseTrainer:
    """Runs ``epochs`` epochs of training and validation and keeps the run folder.

    Args:
        model: the network (possibly wrapped in DistributedDataParallel).
        optimizer, lr_scheduler: built from config; the scheduler steps per iteration.
        train_loader, val_loader: loaders with ``set_epoch`` (``val_loader`` may be None).
        run_dir: the run folder (checkpoints, logs, plots).
        settings: how the loop runs (see :class:`TrainerSettings`).
        meta: facts inference needs without data (arch, num_classes, class names, palette...).
        scaler: a ``torch.amp.GradScaler`` (disabled when not using float16).
        ema: the moving average of the weights, or None. Its scores (``ema/mIoU``...)
            pick its own best model, ``best_model_ema.pth``; early stop follows the model's.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler,
                 train_loader, val_loader, run_dir: Path, settings: TrainerSettings, meta: dict,
                 scaler: torch.amp.GradScaler, ema: AveragedModel | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.train_loader = train_loader
        self.val_loader = val_loader if settings.val else None
        self.run_dir = Path(run_dir)
        self.settings = settings
        self.meta = meta
        self.seed = settings.seed
        self.scaler = scaler
        self.ema = ema
        self.epochs = settings.epochs
        self.logger = run_logger(self.run_dir)
        self.csv = MetricsCSV(self.run_dir / "metrics.csv")

        self.monitor_mode, self.monitor_metric = "off", None
        if settings.monitor != "off":
            self.monitor_mode, self.monitor_metric = settings.monitor.split()
        if self.monitor_mode != "off" and self.val_loader is None:
            self.logger.warning(f"trainer.monitor is '{settings.monitor}' but there is no validation: "
                                "no best_model.pth and no early stop (set monitor to 'off' to silence this)")
        self.best = self.best_ema = self._worst()
        self.best_epoch = self.best_ema_epoch = 0
        self.not_improved = 0
        self.history: list[dict] = []

        # Where to start: changed by resume().
        self.start_epoch = 1
        self.start_iter = 0
        # Running sums of an unfinished epoch (this process's share; see _interrupt).
        self.partial: dict[str, float] = {}
        self.iteration = 0  # iterations done in the current epoch
        self.epoch_iters = 0  # iterations of the current epoch
        self.finished: str | None = None  # "last epoch" or "early stop" once the run is over
        self._stop_requested = False
        # True while the loop waits for something it may leave on a stop request (the next batch,
        # before an iteration starts): the first signal then raises StopWaiting there.
        self._leave_wait = False
        self._stop_time = 0.0

    @property
    def unwrapped_model(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    # --- to implement ------------------------------------------------------------
    def _train_epoch(self, epoch: int, start_iter: int) -> dict[str, float]:
        """Train one epoch from iteration ``start_iter``; return logs such as ``train_loss``.

        Must keep ``self.iteration`` and ``self.partial`` current and return early
        (with whatever it has) once :meth:`_stop_agreed` is true.
        """
        raise NotImplementedError

    def _valid_epoch(self, epoch: int) -> dict[str, Any]:
        """Validate; return ``val_loss`` and the metrics (``mIoU``...)."""
        raise NotImplementedError

    def _log_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        """Send a completed epoch's values to the logging sinks (never a partial epoch's)."""

    def close(self) -> None:
        """Release logging resources and worker processes (called when training ends, however it ends)."""

    # --- the loop ----------------------------------------------------------------
    def train(self) -> dict:
        """Train to the last epoch (or early stop); returns the summary."""
        try:
            with self._catch_stop_signals():
                self.logger.info(f"Run folder: {self.run_dir}")
                for epoch in range(self.start_epoch, self.epochs + 1):
                    if self._run_epoch(epoch):
                        break
            return self._finish()
        finally:
            self.close()

    def _run_epoch(self, epoch: int) -> bool:
        """One epoch; returns True when early stopping ends training."""
        if self.start_iter == 0:
            seed_epoch(self.seed, epoch)
            self.partial = {}
        started = time.perf_counter()
        logs = self._train_epoch(epoch, self.start_iter)
        self.start_iter = 0
        if self._stop_agreed():
            self._interrupt(epoch)
        row: dict[str, Any] = {"epoch": epoch, **logs}
        improved = ema_improved = False
        validate = self.val_loader is not None and (epoch % self.settings.val_per_epochs == 0
                                                    or epoch == self.epochs)
        if validate:
            # The epoch's training is kept before validating: a validation that fails (a bad label file)
            # leaves a checkpoint that --resume continues from this epoch's validation. (Between save
            # epochs the checkpoint stays so: a later resume validates this epoch again.)
            self._save("checkpoint.pth", epoch, self.iteration, epoch_done=False, partial=self._partial_totals())
            metrics = self._valid_epoch(epoch)
            if self._stop_agreed():
                self._interrupt(epoch)
            row.update(metrics)
            improved = self._update_monitor(row)
            ema_improved = self._update_ema_monitor(row)
        row["time"] = round(time.perf_counter() - started, 2)
        self.history.append(row)
        self._log_epoch(epoch, row)
        # One row per validation (per epoch when the run does not validate).
        self.csv.write_all([r for r in self.history if "mIoU" in r] if self.val_loader else self.history)
        self.logger.info(self._format_row(row))

        stop = self.settings.early_stop > 0 and self.not_improved >= self.settings.early_stop
        if stop or epoch == self.epochs:
            self.finished = "early stop" if stop else "last epoch"
        if improved:
            self._save_best("best_model.pth", self.unwrapped_model, epoch, row)
            self.logger.info(f"  saved best_model.pth ({self.monitor_metric} = {self.best:.4f})")
        if ema_improved:
            ema_row = {"epoch": epoch, **{k.removeprefix(EMA_PREFIX): v for k, v in row.items()
                                          if k.startswith(EMA_PREFIX)}}
            self._save_best("best_model_ema.pth", self.ema.module, epoch, ema_row)
            self.logger.info(f"  saved best_model_ema.pth (EMA {self.monitor_metric} = {self.best_ema:.4f})")
        if epoch % self.settings.save_period == 0 or self.finished:
            self._save("checkpoint.pth", epoch, self.iteration, epoch_done=True)
        if stop:
            self.logger.info(f"Early stop: {self.monitor_metric} did not improve for "
                             f"{self.not_improved} validations")
        return stop

    def _update_monitor(self, row: dict) -> bool:
        if self.monitor_mode == "off":
            return False
        value = row.get(self.monitor_metric)
        if value is None:
            raise TrainingError(f"trainer.monitor: metric '{self.monitor_metric}' was not computed")
        better = self._better(value, self.best)
        if better:
            self.best, self.best_epoch, self.not_improved = value, row["epoch"], 0
        else:
            self.not_improved += 1
        return better

    def _update_ema_monitor(self, row: dict) -> bool:
        """Whether the weight average's score beats its best so far (it has its own best model)."""
        if self.ema is None or self.monitor_mode == "off":
            return False
        value = row[EMA_PREFIX + self.monitor_metric]
        if not self._better(value, self.best_ema):
            return False
        self.best_ema, self.best_ema_epoch = value, row["epoch"]
        return True

    def _better(self, value: float, best: float) -> bool:
        return value > best if self.monitor_mode == "max" else value < best

    def _worst(self) -> float:
        return -math.inf if self.monitor_mode == "max" else math.inf

    def _finish(self) -> dict:
        summary = {"run_dir": str(self.run_dir), "epochs_trained": len(self.history),
                   "monitor": self.settings.monitor}
        if self.monitor_mode != "off" and self.best_epoch:
            best_row = next(row for row in self.history if row["epoch"] == self.best_epoch)
            summary.update(best_epoch=self.best_epoch, best_metrics=best_row)
        if self.ema is not None and self.monitor_mode != "off" and self.best_ema_epoch:
            summary["best_ema_epoch"] = self.best_ema_epoch
        if self.history:
            summary["last_metrics"] = self.history[-1]
        if distributed.is_main_process():
            write_json(summary, self.run_dir / "summary.json")
            plot_learning_curves(self.history, self.run_dir / "learning_curves.png")
        return summary

    @staticmethod
    def _format_row(row: dict) -> str:
        parts = [f"epoch {row['epoch']}"]
        for key in ("train_loss", "val_loss", "mIoU", "pixel_acc", "mean_acc", "fwIoU", EMA_PREFIX + "mIoU", "lr",
                    "time"):
            if isinstance(row.get(key), (int, float)):
                parts.append(f"{key} {row[key]:.4g}")
        return " | ".join(parts)

    # --- stopping ------------------------------------------------------------------
    def _stop_point(self) -> str:
        """When the loop acts on a stop request (said on the first signal); trainers say it more precisely."""
        return "at the next check"

    @contextlib.contextmanager
    def _catch_stop_signals(self):
        """Ctrl-C or SIGTERM ask the loop to stop and save; a second Ctrl-C quits without saving.

        The training loop looks at the request where :meth:`_stop_point` says (after
        the current iteration in one process), where all processes agree to stop
        together; a wait the loop marks with ``_leave_wait`` ends at once. A second
        Ctrl-C (more than ``FORCE_QUIT_AFTER`` seconds later) quits at once: one
        line, exit code 130, no checkpoint written (the previous one is untouched;
        the loaders' workers are still shut down on the way out). Data-loading
        workers block these signals (see :mod:`base.base_dataloader`): the main
        process shuts them down.
        """
        def handler(signum, frame):
            if self._stop_requested:
                if signum == signal.SIGINT and time.monotonic() - self._stop_time > FORCE_QUIT_AFTER:
                    self.logger.warning("SIGINT again: quitting without saving")
                    # SystemExit, not KeyboardInterrupt: it leaves through the commands' error handling
                    # (and the `finally` that closes the loaders) without a traceback.
                    raise SystemExit(130)
                return
            self._stop_requested, self._stop_time = True, time.monotonic()
            self.logger.warning(f"\n{signal.Signals(signum).name}: stopping {self._stop_point()} and saving a "
                                f"checkpoint (Ctrl-C again, after {FORCE_QUIT_AFTER:g} s, to quit without saving)")
            if self._leave_wait:
                raise StopWaiting

        previous = {}
        try:
            for sig in STOP_SIGNALS:
                previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not in the main thread: keep the default behaviour
            pass
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _stop_agreed(self) -> bool:
        """Whether any process was asked to stop; all processes then stop together.

        Under torchrun every rank must leave the loop at the same iteration or
        the next collective operation would hang.
        """
        self._stop_requested = distributed.any_process([self._stop_requested], self._device())[0]
        return self._stop_requested

    def _device(self) -> torch.device:
        return next(self.unwrapped_model.parameters()).device

    def _partial_totals(self) -> dict[str, float]:
        """The epoch's running sums over all processes (a collective under torchrun; ``lr`` as it is)."""
        sums = {k: v for k, v in self.partial.items() if k != "lr"}
        if not (sums and distributed.is_distributed()):
            return dict(self.partial)
        totals = distributed.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64,
                                                         device=self._device()))
        return {**self.partial, **dict(zip(sums, totals.tolist()))}

    def _interrupt(self, epoch: int) -> None:
        # Every process holds its own share of the epoch's running sums: save their total
        # (a collective; all processes stop together), which rank 0 alone takes back on resume.
        sums = {k: v for k, v in self.partial.items() if k != "lr"}
        if sums and distributed.is_distributed():
            totals = distributed.all_reduce_sum(torch.tensor(list(sums.values()), dtype=torch.float64,
                                                             device=self._device()))
            self.partial.update(zip(sums, totals.tolist()))
        path = self._save("checkpoint.pth", epoch, self.iteration, epoch_done=False)
        raise TrainingInterrupted(path, epoch, self.iteration)

    # --- checkpoints ------------------------------------------------------------------
    def _position(self) -> dict[str, Any]:
        """The settings that fix an epoch's batches: a mid-epoch resume needs them unchanged."""
        loader = self.train_loader
        return {"train_loader.args.batch_size": loader.batch_size,
                "number of processes (torchrun --nproc_per_node x nodes)": distributed.get_world_size(),
                "train_loader.args.drop_last": loader.drop_last,
                "trainer.accumulate_steps": self.settings.accumulate_steps,
                "train_loader.args.subset": self.settings.subset,
                "train_loader.args.shuffle": loader.sampler.shuffle,
                "seed": self.seed,
                "number of training samples": len(loader.dataset)}

    def _save(self, filename: str, epoch: int, iteration: int, epoch_done: bool,
              partial: dict[str, float] | None = None) -> Path:
        """The full training state, everything an exact resume needs (``partial``: the epoch's running
        sums to store, by default ``self.partial``)."""
        path = self.run_dir / filename
        if not distributed.is_main_process():
            return path
        state = {
            "arch": self.meta["arch"], "num_classes": self.meta["num_classes"], "meta": self.meta,
            "model": self.unwrapped_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "epoch": epoch, "iteration": iteration, "epoch_iters": self.epoch_iters,
            "epoch_done": epoch_done, "finished": self.finished,
            "batch_size": self.train_loader.batch_size, "position": self._position(),
            "partial": dict(self.partial if partial is None else partial),
            "monitor": self.settings.monitor, "best": self.best, "best_epoch": self.best_epoch,
            "not_improved": self.not_improved, "history": self.history,
            "best_ema": self.best_ema, "best_ema_epoch": self.best_ema_epoch,
            "rng": rng_state(), "config": dict(self.settings.record),
            # The ids of the tracked runs (MLflow, W&B) of the trainer's sinks, continued on resume.
            "tracker_runs": dict(getattr(getattr(self, "tb", None), "runs", {})),
        }
        save_atomic(state, path)
        return path

    def _save_best(self, filename: str, model: nn.Module, epoch: int, row: dict[str, Any]) -> None:
        """A best model: what inference and fine-tuning need (weights, classes, config), no training state."""
        if distributed.is_main_process():
            save_atomic({"arch": self.meta["arch"], "num_classes": self.meta["num_classes"], "meta": self.meta,
                         "model": model.state_dict(), "config": dict(self.settings.record),
                         "epoch": epoch, "monitor": self.settings.monitor, "metrics": row},
                        self.run_dir / filename)

    def _check_position(self, path: str | Path, state: dict) -> None:
        """Refuse a mid-epoch resume whose batches would differ (samples skipped or repeated)."""
        saved = state.get("position") or {"train_loader.args.batch_size": state["batch_size"]}
        for setting, now in self._position().items():
            if setting in saved and saved[setting] != now:
                raise ConfigError(f"{path}: the run stopped in the middle of epoch {state['epoch']} with "
                                  f"{setting} {saved[setting]!r}, now {now!r}; resume it with the same value "
                                  "(another would skip or repeat samples of that epoch)")

    def resume(self, path: str | Path, state: dict | None = None) -> None:
        """Continue from a checkpoint written by :meth:`_save` (``state``: already loaded from ``path``)."""
        state = state if state is not None else load_checkpoint(path)
        load_model_weights(self.unwrapped_model, state, path, self.meta["arch"], self.meta["num_classes"])
        try:
            epoch, iteration, done = state["epoch"], state["iteration"], state["epoch_done"]
            trained = not done and iteration >= state.get("epoch_iters", math.inf)  # only validation was left
            if not done and iteration and not trained:
                self._check_position(path, state)
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if self.scaler.is_enabled() and state["scaler"]:  # empty when saved without float16 AMP
                self.scaler.load_state_dict(state["scaler"])
            self._resume_ema(path, state)
            set_rng_state(state["rng"])
            self.best, self.best_epoch = state["best"], state["best_epoch"]
            self.not_improved, self.history = state["not_improved"], list(state["history"])
            self.best_ema, self.best_ema_epoch = state.get("best_ema", self._worst()), state.get("best_ema_epoch", 0)
            # The saved sums are the total over all processes: one process takes them back.
            partial = dict(state["partial"])
            if not distributed.is_main_process():
                partial = {k: (v if k == "lr" else 0.0) for k, v in partial.items()}
            self.partial = partial
        except (KeyError, ValueError) as exc:
            raise CheckpointError(f"{path}: checkpoint lacks training state ({exc}); "
                                  "it can be used for inference but not to resume") from exc
        if state.get("finished") == "early stop":  # resumed with more epochs: patience starts again
            self.not_improved = 0
        if state.get("monitor") != self.settings.monitor:
            self.logger.warning(f"monitor changed from {state.get('monitor')!r}; best value reset")
            self.best = self.best_ema = self._worst()
            self.best_epoch, self.best_ema_epoch, self.not_improved = 0, 0, 0
        self.start_epoch, self.start_iter = (epoch + 1, 0) if done else (epoch, iteration)
        if trained:  # skip the whole training part of the epoch, whatever its length is now
            self.start_iter = len(self.train_loader)
        self.iteration = self.start_iter
        self.logger.info(f"Resumed from {path}: epoch {self.start_epoch}, iteration {self.start_iter}")

    def _resume_ema(self, path: str | Path, state: dict) -> None:
        """The weight average's state; a run that enables EMA on resume starts it from the current weights."""
        if self.ema is None:
            return
        if state.get("ema") is None:
            self.logger.warning(f"{path}: the checkpoint has no weight average (trainer.ema was off); "
                                "it starts from the resumed weights")
            return
        try:
            self.ema.load_state_dict(state["ema"])
        except RuntimeError as exc:
            raise CheckpointError(f"{path}: the saved weight average does not fit the model: "
                                  f"{str(exc).splitlines()[0]}") from exc
