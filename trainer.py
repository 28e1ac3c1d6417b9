"""The segmentation trainer: one training epoch and one validation pass.

It receives built objects (model, loss, optimizer, scheduler, loaders) and owns
only the loop; checkpoints, resume, early stop and Ctrl-C live in
:class:`base.base_trainer.BaseTrainer`.

Batches arrive as ``uint8`` images and compact integer labels and are
converted on the device (a quarter of the bytes to copy). Reading a value of
the device on the host waits for the device, so the loop keeps its running
loss there and looks at it and at the NaN check only every
``trainer.log_per_iter`` iterations. A stop request (Ctrl-C, SIGTERM) is acted
on after the current optimizer step; under torchrun, where the processes must
agree on it, within about ``STOP_AGREEMENT_SECONDS`` of training (see
:class:`StopSchedule`).
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm

from base.base_dataloader import BaseDataLoader, EpochSampler, is_worker_failure
from utils.images import normalize_batch
from base.base_trainer import EMA_PREFIX, BaseTrainer, StopWaiting, TrainerSettings
from utils import distributed
from utils.errors import ConfigError, TrainingError
from utils.metrics import ConfusionMatrix, segmentation_metrics
from utils.trackers import open_trackers
from utils.visualize import prediction_grid


#: The scores of a validation row (besides the per-class ``iou/NAME``).
#: The means over classes (mIoU, mean_acc, mean_f1...) follow the config's ``metrics`` section.
VALIDATION_KEYS = ("val_loss", "pixel_acc", "mean_acc", "mIoU", "fwIoU", "mean_f1", "mean_precision", "mean_recall")

AmpMode = Literal["off", "bf16", "fp16"]
#: The autocast type of each ``amp`` mode (float16 also scales the loss).
AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: The validation images shown in TensorBoard's prediction grid.
GRID_IMAGES = 4

#: Under torchrun the processes agree on a stop request about this often (seconds of training).
STOP_AGREEMENT_SECONDS = 1.0


def amp_mode(value: str | bool, device: torch.device) -> AmpMode:
    """The ``amp`` setting of the config on ``device``: ``true`` is fp16 on CUDA and bf16 elsewhere."""
    if isinstance(value, bool):
        return ("fp16" if device.type == "cuda" else "bf16") if value else "off"
    if value == "fp16" and device.type != "cuda":
        raise ConfigError(f"amp: 'fp16' needs CUDA (float16 with loss scaling) but training runs on "
                          f"{device.type}; choose 'bf16' or 'off' (choices: {', '.join(map(repr, AMP_DTYPES))})")
    return value


class Trainer(BaseTrainer):
    """Trains a segmentation model; see :class:`BaseTrainer` for the shared arguments.

    Args:
        loss: called as ``loss(logits, target)``.
        device: where the model lives.
        aux_loss: the loss of ``outputs["aux"]`` for models with an auxiliary
            head; ``None`` uses ``loss``.
        ema: the moving average of the weights (``trainer.ema``), updated after every
            optimizer step and validated beside the model; None disables it.

    Of the settings, ``amp`` (``"off"``, ``"bf16"``: autocast to bfloat16, ``"fp16"``: float16
    with loss scaling; see :func:`amp_mode`), ``channels_last`` (channels-last inputs; the
    weights should be too), ``aux_loss_weight`` and ``ignore_index`` shape each step, and
    ``accumulate_steps`` and ``clip_grad_norm`` each optimizer step (see :meth:`_train_epoch`).

    The input normalisation (``meta["mean"]``, ``meta["std"]``) is applied on
    the device.
    """

    def __init__(self, *, model: nn.Module, loss: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler, train_loader, val_loader, device: torch.device, run_dir: Path,
                 settings: TrainerSettings, meta: dict, aux_loss: nn.Module | None = None,
                 ema: AveragedModel | None = None) -> None:
        amp = settings.amp
        if amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        super().__init__(model, optimizer, lr_scheduler, train_loader, val_loader, run_dir, settings, meta,
                         torch.amp.GradScaler(device.type, enabled=amp == "fp16"), ema)
        self.loss = loss
        self.aux_loss = aux_loss
        self.device = device
        self.amp = amp
        self.amp_dtype = AMP_DTYPES[amp]
        self.channels_last = settings.channels_last
        self.accumulate_steps = settings.accumulate_steps
        self.clip_grad_norm = settings.clip_grad_norm
        self.aux_loss_weight = settings.aux_loss_weight
        self.ignore_index = settings.ignore_index
        self.mean, self.std = meta["mean"], meta["std"]
        self.confusion = ConfusionMatrix(meta["num_classes"], self.ignore_index, device=device)
        self.tb = open_trackers(settings, run_dir)  # TensorBoard, MLflow, W&B: trainer.trackers
        self.show_progress = settings.progress_bar and distributed.is_main_process()
        # Off a terminal (a cluster job, nohup, CI) tqdm shows nothing: a plain line every log_per_iter instead.
        self.log_lines = distributed.is_main_process() and not (settings.progress_bar and _is_terminal(sys.stderr))
        self._val_sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.val_sample_indices: list[int] = []  # the data set indices of the grid's images
        self._stops = StopSchedule(settings.log_per_iter)

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype,
                              enabled=self.amp_dtype is not None)

    def _to_device(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``uint8`` images and compact labels -> the normalised float input and int64 targets, on the device."""
        images = normalize_batch(images.to(self.device, non_blocking=True), self.mean, self.std)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(self.device, non_blocking=True).long()

    def compute_loss(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        loss = self.loss(outputs["out"], target)
        if "aux" in outputs and self.aux_loss_weight:
            aux_loss = self.aux_loss if self.aux_loss is not None else self.loss
            loss = loss + self.aux_loss_weight * aux_loss(outputs["aux"], target)
        return loss

    def _batches(self, loader: BaseDataLoader, may_leave: Callable[[], bool] = lambda: True
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The loader's batches, until the loader ends or a stop request ends them.

        In one process, a stop request that comes while the loop waits for a batch
        (workers starting, slow augmentation, a loaded machine) ends the wait at
        once, when ``may_leave()`` (no accumulation group is half done): the next
        iteration has not started. Under torchrun the processes leave only together,
        at an agreed iteration. A worker that dies after a stop request ends the
        epoch too: workers block the stop signals, but one started by a forkserver
        can still be hit while it starts; its death is then the stop point, not a crash.
        """
        batches = iter(loader)
        while True:
            try:
                try:  # inside the outer `try`: the handler may raise StopWaiting from any line of it
                    self._leave_wait = not distributed.is_distributed() and may_leave()
                    if self._leave_wait and self._stop_requested:
                        raise StopWaiting
                    batch = next(batches)
                finally:
                    self._leave_wait = False
            except StopWaiting:
                self._leave_wait = False  # the signal may have come inside the `finally`
                loader.shutdown()  # the iterator was left in the middle of a batch
                return
            except StopIteration:
                return
            except Exception as exc:
                if not (self._stop_requested and is_worker_failure(exc)):
                    raise
                self.logger.warning(f"a data-loading worker ended after the stop request ({exc}); stopping here")
                loader.shutdown()
                return
            yield batch

    def _train_epoch(self, epoch: int, start_iter: int) -> dict[str, float]:
        """One epoch from batch ``start_iter``.

        With ``accumulate_steps`` k, the gradients of k batches are added up before
        each optimizer step (the epoch's last group may be shorter; its losses are
        averaged over its own size). Checks (and so stops) happen only after a
        step, so a checkpoint never holds half-accumulated gradients.

        A stop request ends the epoch after the step that follows it, or at once if
        the loop is waiting for a batch at a step boundary (one process; see
        :meth:`_batches`), or at the next agreement of the processes (torchrun;
        :class:`StopSchedule`). The NaN check and the logs come every
        ``log_per_iter`` iterations, and once more before stopping.
        """
        self.model.train()
        loader = self.train_loader
        loader.set_epoch(epoch, skip_batches=start_iter)
        iters = self.epoch_iters = start_iter + len(loader)
        self.iteration = start_iter
        window = LossWindow(self.device)
        totals = {"loss_sum": self.partial.get("loss_sum", 0.0), "count": self.partial.get("count", 0)}
        lr = self.partial.get("lr")
        bar = tqdm(total=iters, initial=start_iter, desc=f"train {epoch}/{self.epochs}",
                   disable=None if self.show_progress else True, dynamic_ncols=True, leave=False)
        rate = ImageRate()
        self._clock = ProgressClock(start_iter)
        log_every, k = self.settings.log_per_iter, self.accumulate_steps
        next_check = (start_iter // log_every + 1) * log_every
        self._stops.start(start_iter)
        group_losses: list[torch.Tensor] = []  # the losses of the batches since the last step
        for images, targets in self._batches(loader, may_leave=lambda: self.iteration % k == 0):
            images, targets = self._to_device(images, targets)
            lr = self.optimizer.param_groups[0]["lr"]
            group_start = self.iteration - self.iteration % k
            group_size = min(k, iters - group_start)
            steps = self.iteration + 1 == group_start + group_size
            if self.iteration == group_start:
                self.optimizer.zero_grad(set_to_none=True)
            # Under DDP only the batch before a step reduces gradients across processes.
            no_sync = self.model.no_sync() if hasattr(self.model, "no_sync") and not steps else nullcontext()
            with no_sync:
                with self._autocast():
                    loss = self.compute_loss(self._forward(images), targets)
                self.scaler.scale(loss / group_size).backward()
            self.iteration += 1
            group_losses.append(loss.detach())
            bar.update(1)
            rate.update(images.shape[0])
            if not steps:
                continue
            self._optimizer_step()
            for i, value in enumerate(group_losses):
                window.add(value, group_start + i + 1)
            group_losses.clear()
            log_due = self.iteration >= next_check or self.iteration == iters
            stop = False
            if not log_due and self._stops.due(self.iteration):  # a log check agrees on the stop too
                stop = self._stop_requested = self._stops.agree(self._stop_requested, self.iteration, self.device)
            if log_due or stop:
                next_check = (self.iteration // log_every + 1) * log_every
                self._check(epoch, window, totals, lr, iters, bar, rate)  # the losses up to the stop
                if self._stop_requested:
                    break
        if group_losses:  # a worker ended the epoch after a stop request, within a group: redo it on resume
            self.iteration -= len(group_losses)
            self.optimizer.zero_grad(set_to_none=True)
        if window.count:  # the epoch ended between checks (a worker ended it after a stop request)
            self._check(epoch, window, totals, lr, iters, bar, rate)
        bar.close()
        logs = {"train_loss": _reduced_mean(totals["loss_sum"], int(totals["count"]), self.device)}
        if lr is not None:
            logs["lr"] = lr  # the rate of the epoch's last iteration
        return logs

    def _optimizer_step(self) -> None:
        """Clip, step (through the loss scaler), advance the schedule and the weight average."""
        if self.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.unwrapped_model.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.unwrapped_model)

    def _check(self, epoch: int, window: LossWindow, totals: dict, lr: float | None, iters: int,
               bar: tqdm, rate: ImageRate) -> None:
        """Every ``log_per_iter`` iterations: read the loss window (a sync), agree on NaN and stop, log."""
        loss_sum, count, bad_iteration, bad_value = window.read()
        diverged, self._stop_requested = distributed.any_process([bad_iteration > 0, self._stop_requested],
                                                                 self.device)
        if diverged:
            where = (f"{bad_value} at epoch {epoch}, iteration {bad_iteration}" if bad_iteration > 0
                     else f"not finite on another process in epoch {epoch} (before iteration {self.iteration})")
            raise TrainingError(f"loss is {where}; stopped. The last good checkpoint in {self.run_dir} is "
                                "untouched (try a lower learning rate, or amp off)")
        totals["loss_sum"] += loss_sum
        totals["count"] += count
        self.partial = {**totals, "lr": lr}
        step = (epoch - 1) * iters + self.iteration
        self.tb.scalar("train/loss", loss_sum / count, step)  # mean over the iterations since the last check
        for i, group in enumerate(self.optimizer.param_groups):
            self.tb.scalar(f"train/lr/{group.get('name', i)}", group["lr"], step)
        bar.set_postfix(loss=f"{totals['loss_sum'] / totals['count']:.4f}", lr=f"{lr:.2e}",
                        img_s=f"{rate.value or 0:.1f}", refresh=False)
        if self.log_lines:
            self.logger.info(self._progress_line(epoch, iters, loss_sum / count, lr, rate))

    def _progress_line(self, epoch: int, iters: int, loss: float, lr: float | None, rate: ImageRate) -> str:
        """The plain-text progress of the epoch (when there is no progress bar): the loss is the mean
        since the previous line, the speed that of the images since then, the ETA that of the epoch."""
        images_per_s, eta = self._clock.lap(self.iteration, iters, rate.images)
        if self.device.type == "cuda":
            memory = f"cuda max {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MiB"
        else:
            memory = f"rss {_rss_bytes() / 2**20:.0f} MiB"
        lr_text = f"{lr:.3e}" if lr is not None else "-"
        return (f"epoch {epoch}/{self.epochs} | iter {self.iteration}/{iters} | loss {loss:.4f} | lr {lr_text} | "
                f"{images_per_s:.1f} img/s | eta {_clock_text(eta)} | {memory}")

    def _stop_point(self) -> str:
        """When the loop stops after a stop request, for the message printed on the first signal."""
        k = self.accumulate_steps
        if self._stops.distributed:
            step = f" (after an optimizer step: every {k} iterations)" if k > 1 else ""
            return f"within about {self._stops.seconds:g} s of training, where all processes agree{step},"
        if k > 1:
            return f"after this optimizer step (every trainer.accumulate_steps = {k} iterations)"
        return "after this iteration"

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        try:
            return self.model(images)
        except ValueError as exc:
            # Batch norm on a 1x1 map (e.g. ASPP's image pooling) with a single image.
            if "Expected more than 1 value per channel" in str(exc):
                raise TrainingError(f"a training batch has a single image, which batch norm cannot "
                                    f"normalise in this model ({exc}); use batch_size >= 2 and "
                                    "drop_last true, freeze_bn, or norm GroupNorm") from exc
            raise

    @torch.no_grad()
    def _valid_epoch(self, epoch: int) -> dict[str, Any]:
        # Under torchrun each process validates its own unpadded shard with the bare model:
        # shards may differ in length, and DDP's forward would wait for the other processes.
        row = self._evaluate(self.unwrapped_model, epoch, "val")
        if self.ema is not None:
            ema_row = self._evaluate(self.ema.module, epoch, "val ema")
            row.update({f"{EMA_PREFIX}{key}": value for key, value in ema_row.items()})
        return row

    def _evaluate(self, model: nn.Module, epoch: int, label: str) -> dict[str, Any]:
        """Loss and metrics of ``model`` on the validation set (all processes' shards together)."""
        distributed.broadcast_buffers(model)  # every process evaluates rank 0's weights
        model.eval()
        self.confusion.reset()
        self.val_loader.set_epoch(epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        count = position = 0
        # The grid's samples: the same spread-out images at every validation (and after resume).
        stream = self._val_indices() if model is self.unwrapped_model else []
        wanted, picked = set(grid_indices(sorted(set(stream)))), {}
        bar = tqdm(total=len(self.val_loader), desc=f"{label} {epoch}/{self.epochs}", dynamic_ncols=True,
                   leave=False, disable=None if self.show_progress else True)
        rate = ImageRate()
        # Data sets whose items carry instance maps (Cityscapes') add a third item: their benchmark's
        # iIoU is measured too.
        dataset = self.val_loader.dataset
        benchmark = dataset.benchmark_evaluator(self.ignore_index) if dataset.instance_maps else None
        for raw_images, raw_targets, *instances in self._batches(self.val_loader):
            images, targets = self._to_device(raw_images, raw_targets)
            with self._autocast():
                logits = model(images)["out"]
                loss = self.loss(logits, targets)
            preds = logits.argmax(dim=1)
            self.confusion.update(preds, targets)
            if benchmark is not None and instances:
                for pred, target, instance in zip(preds.cpu(), raw_targets, instances[0]):
                    benchmark.update(pred, target, instance)
            loss_sum += loss.detach().double() * images.shape[0]
            count += images.shape[0]
            for j, index in enumerate(stream[position:position + images.shape[0]]):
                if index in wanted and index not in picked:
                    picked[index] = (raw_images[j], raw_targets[j], preds[j].cpu())
            position += images.shape[0]
            bar.update(1)
            bar.set_postfix(img_s=f"{rate.update(images.shape[0]):.1f}", refresh=False)
            if self._stop_requested:
                break
        bar.close()
        if model is self.unwrapped_model and picked:
            chosen = sorted(picked)
            size = picked[chosen[0]][0].shape
            chosen = [i for i in chosen if picked[i][0].shape == size]  # one grid: images of one size
            self.val_sample_indices = chosen
            self._val_sample = tuple(torch.stack([picked[i][part] for i in chosen]) for part in range(3))
        self.confusion.all_reduce()
        selection = self.settings.metrics or {}
        metrics = segmentation_metrics(self.confusion.matrix, self.meta["class_names"],
                                       metric_classes=selection.get("classes"), exclude=selection.get("exclude"))
        row = {"val_loss": _reduced_mean(loss_sum.item(), count, self.device),
               **{k: metrics[k] for k in VALIDATION_KEYS[1:]}}
        for name, iou in zip(self.meta["class_names"], metrics["class_iou"]):
            row[f"iou/{name}"] = iou
        if benchmark is not None:
            row.update(_benchmark_scores(benchmark, self.device))
        return row

    def _val_indices(self) -> list[int]:
        """The data set indices of this process's validation items, in the loader's order."""
        sampler = getattr(self.val_loader, "sampler", None)
        if isinstance(sampler, EpochSampler):
            return [index for _, index in sampler]
        return list(range(len(self.val_loader.dataset)))

    def _log_epoch(self, epoch: int, row: dict[str, Any]) -> None:
        self.tb.scalar("train/epoch_loss", row["train_loss"], epoch)
        if "val_loss" not in row:
            return
        for key, value in row.items():
            name = key.removeprefix(EMA_PREFIX)
            if name in VALIDATION_KEYS or name == "iIoU" or name.startswith(("iou/", "iiou/")):
                self.tb.scalar(f"val/{key}", value, epoch)
        if self._val_sample is not None:
            images, targets, preds = self._val_sample
            grid = prediction_grid(images, targets, preds, self.meta["palette"], self.ignore_index)
            self.tb.image("val/image_groundtruth_prediction", grid, epoch)

    def close(self) -> None:
        self.tb.close()
        for loader in (self.train_loader, self.val_loader):
            if isinstance(loader, BaseDataLoader):
                loader.shutdown()


def grid_indices(indices: list[int], count: int = GRID_IMAGES) -> list[int]:
    """``count`` of ``indices`` evenly spread from the first to the last (all of them if no more).

    Consecutive frames (CamVid's) look alike: the grid shows images from across the validation set.
    """
    n = len(indices)
    if n <= count:
        return list(indices)
    return [indices[i * (n - 1) // (count - 1)] for i in range(count)]


class StopSchedule:
    """The iterations after which the training loop looks at a stop request (Ctrl-C, SIGTERM).

    One process looks after every optimizer step: the request is a Python bool that the
    signal handler sets, so reading it costs nothing.

    Under torchrun every process must leave the loop after the same iteration, so they agree
    with a collective operation, and reading its result on the host waits for the device: the
    sync the loop avoids per iteration. So the processes agree every ``interval`` iterations,
    about ``seconds`` of training. The interval cannot be decided by each process's own clock
    (two processes could then pick different iterations, and the one left waiting in the
    collective would hang): each agreement also carries every process's seconds per iteration
    since the previous agreement, and all take the largest and so set the same next one. The
    wall time between two agreements, both syncs, is the true time of the iterations between
    them, data loading included. The first agreement of a run is after one iteration; the
    interval is at most ``log_per_iter``, whose checks agree on the stop as well.
    """

    def __init__(self, log_per_iter: int, seconds: float = STOP_AGREEMENT_SECONDS) -> None:
        self.limit, self.seconds = max(1, log_per_iter), seconds
        self.interval = 1
        self.start(0)

    @property
    def distributed(self) -> bool:
        return distributed.is_distributed()

    def start(self, iteration: int) -> None:
        """An epoch starts (or resumes) at ``iteration``: the clock starts again."""
        self._last, self._time = iteration, time.perf_counter()
        self._next = iteration + self.interval

    def due(self, iteration: int) -> bool:
        """Whether to look at the request after ``iteration`` (the same answer on every process)."""
        return not self.distributed or iteration >= self._next

    def agree(self, requested: bool, iteration: int, device: torch.device) -> bool:
        """Whether any process was asked to stop (a collective under torchrun: every process calls it)."""
        if not self.distributed:
            return requested
        per_iteration = (time.perf_counter() - self._time) / max(iteration - self._last, 1)
        (stop,), (slowest,) = distributed.any_process_and_max([requested], [per_iteration], device)
        self.interval = int(min(max(self.seconds / max(slowest, 1e-6), 1), self.limit))
        self._last, self._time, self._next = iteration, time.perf_counter(), iteration + self.interval
        return stop


class LossWindow:
    """The training losses since the last check, kept on the device (no host sync per iteration).

    Also remembers the first iteration whose loss was not finite, and that loss.
    """

    def __init__(self, device: torch.device) -> None:
        self._sum = torch.zeros((), dtype=torch.float64, device=device)
        self._bad = torch.zeros(2, dtype=torch.float64, device=device)  # (iteration or 0, value)
        self.count = 0

    def add(self, loss: torch.Tensor, iteration: int) -> None:
        loss = loss.double()
        self._sum += loss
        first = ~torch.isfinite(loss) & (self._bad[0] == 0)
        self._bad = torch.where(first, torch.stack([torch.full_like(loss, iteration), loss]), self._bad)
        self.count += 1

    def read(self) -> tuple[float, int, int, float]:
        """``(loss sum, count, first non-finite iteration or 0, its loss)``; resets the window."""
        loss_sum, bad_iteration, bad_value = torch.cat([self._sum.view(1), self._bad]).tolist()  # the sync
        count = self.count
        self._sum.zero_()
        self._bad.zero_()
        self.count = 0
        return loss_sum, count, int(bad_iteration), bad_value


class ImageRate:
    """Images per second over recent iterations (data loading included), for the progress bars."""

    def __init__(self) -> None:
        self.tick = time.perf_counter()
        self.value: float | None = None
        self.images = 0  # images seen so far

    def update(self, images: int) -> float:
        self.images += images
        now = time.perf_counter()
        speed = images / max(now - self.tick, 1e-9)
        self.tick = now
        self.value = speed if self.value is None else 0.9 * self.value + 0.1 * speed
        return self.value


class ProgressClock:
    """The speed since the previous progress line and the time left in the epoch (data loading included)."""

    def __init__(self, start_iter: int) -> None:
        self.start = self.tick = time.perf_counter()
        self.start_iter = start_iter
        self.images = 0

    def lap(self, iteration: int, iters: int, images: int) -> tuple[float, float]:
        """``(images per second since the last lap, seconds left in the epoch)`` after ``iteration`` of ``iters``
        (``images``: seen since the epoch (re)started)."""
        now = time.perf_counter()
        speed = (images - self.images) / max(now - self.tick, 1e-9)
        per_iteration = (now - self.start) / max(iteration - self.start_iter, 1)
        self.tick, self.images = now, images
        return speed, per_iteration * max(iters - iteration, 0)


def _clock_text(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # replaced or closed
        return False


def _rss_bytes() -> int:
    """The resident memory of this process (its peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def _reduced_mean(total: float, count: int, device: torch.device) -> float:
    """Mean of a per-process sum over all processes."""
    if not distributed.is_distributed():
        return total / max(count, 1)
    pair = distributed.all_reduce_sum(torch.tensor([total, float(count)], device=device, dtype=torch.float64))
    return (pair[0] / pair[1].clamp(min=1)).item()


def _benchmark_scores(benchmark, device: torch.device) -> dict[str, float]:
    """The data set's benchmark iIoU (mean and per instance class) over all processes' shards."""
    benchmark.synchronize(device)
    scores = benchmark.result()
    return {"iIoU": scores["iIoU"], **{f"iiou/{name}": value for name, value in scores["class_iiou"].items()}}
