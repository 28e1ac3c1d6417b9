"""The segmentation trainer: one training epoch and one validation pass.

It receives built objects (model, loss, optimizer, scheduler, loaders) and owns
only the loop; checkpoints, resume, early stop and Ctrl-C live in
:class:`base.base_trainer.BaseTrainer`.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from base.base_trainer import BaseTrainer
from utils import distributed
from utils.errors import TrainingError
from utils.logger import TensorBoard
from utils.metrics import ConfusionMatrix, segmentation_metrics
from utils.visualize import prediction_grid


class Trainer(BaseTrainer):
    """Trains a segmentation model; see :class:`BaseTrainer` for the shared arguments.

    Args:
        loss: called as ``loss(logits, target)``.
        device: where the model lives.
        amp: autocast (float16 with loss scaling on CUDA, bfloat16 on the CPU).
        aux_loss_weight: weight of ``outputs["aux"]`` for models with an auxiliary head.
        ignore_index: label value that counts nowhere.
        denormalize: maps a normalised batch back to 0-1 RGB (for the TensorBoard grid).
        tensorboard_dir: where TensorBoard events go; None disables them.
    """

    def __init__(self, *, model: nn.Module, loss: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler, train_loader, val_loader, device: torch.device, run_dir: Path,
                 settings: dict, config: dict, meta: dict, seed: int = 42, amp: bool = False,
                 aux_loss_weight: float = 0.4, ignore_index: int = 255, denormalize=None,
                 tensorboard_dir: Path | None = None) -> None:
        use_scaler = amp and device.type == "cuda"
        super().__init__(model, optimizer, lr_scheduler, train_loader, val_loader, run_dir, settings,
                         config, meta, seed, torch.amp.GradScaler(device.type, enabled=use_scaler))
        self.loss = loss
        self.device = device
        self.amp = amp
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.aux_loss_weight = aux_loss_weight
        self.ignore_index = ignore_index
        self.denormalize = denormalize
        self.confusion = ConfusionMatrix(meta["num_classes"], ignore_index, device=device)
        self.tb = TensorBoard(tensorboard_dir)
        self.show_progress = settings["progress_bar"] and distributed.is_main_process()

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def compute_loss(self, outputs: dict[str, torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        loss = self.loss(outputs["out"], target)
        if "aux" in outputs and self.aux_loss_weight:
            loss = loss + self.aux_loss_weight * self.loss(outputs["aux"], target)
        return loss

    def _train_epoch(self, epoch: int, start_iter: int) -> dict[str, float]:
        self.model.train()
        loader = self.train_loader
        loader.set_epoch(epoch, skip_batches=start_iter)
        iters = start_iter + len(loader)
        loss_sum = self.partial.get("loss_sum", 0.0)
        count = int(self.partial.get("count", 0))
        lr = self.partial.get("lr")
        self.iteration = start_iter
        bar = tqdm(total=iters, initial=start_iter, desc=f"train {epoch}/{self.epochs}",
                   disable=None if self.show_progress else True, dynamic_ncols=True, leave=False)
        rate = ImageRate()
        for images, targets in loader:
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            lr = self.optimizer.param_groups[0]["lr"]
            with self._autocast():
                loss = self.compute_loss(self._forward(images), targets)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.lr_scheduler.step()

            value = loss.item()  # a CPU-GPU sync point; needed for the NaN check and the bar
            diverged, self._stop_requested = distributed.any_process(
                [not math.isfinite(value), self._stop_requested], self.device)
            if diverged:
                where = value if not math.isfinite(value) else "not finite on another process"
                raise TrainingError(f"loss is {where} at epoch {epoch}, iteration {self.iteration + 1}; "
                                    f"stopped. The last good checkpoint in {self.run_dir} is untouched "
                                    "(try a lower learning rate, or amp off)")
            self.iteration += 1
            loss_sum += value
            count += 1
            self.partial = {"loss_sum": loss_sum, "count": count, "lr": lr}

            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / count:.4f}", lr=f"{lr:.2e}",
                            img_s=f"{rate.update(images.shape[0]):.1f}", refresh=False)
            step = (epoch - 1) * iters + self.iteration
            if self.iteration % self.settings["log_per_iter"] == 0:
                self.tb.scalar("train/loss", value, step)
                for i, group in enumerate(self.optimizer.param_groups):
                    self.tb.scalar(f"train/lr/{group.get('name', i)}", group["lr"], step)
            if self._stop_requested:
                break
        bar.close()
        train_loss = _reduced_mean(loss_sum, count, self.device)
        self.tb.scalar("train/epoch_loss", train_loss, epoch)
        logs = {"train_loss": train_loss}
        if lr is not None:
            logs["lr"] = lr  # the rate of the epoch's last iteration
        return logs

    def _forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        try:
            return self.model(images)
        except ValueError as exc:
            # Batch norm on a 1x1 map (e.g. ASPP's image pooling) with a single image.
            if "Expected more than 1 value per channel" in str(exc):
                raise TrainingError(f"a training batch has a single image, which batch norm cannot "
                                    f"normalise in this model ({exc}); use batch_size >= 2 and "
                                    "drop_last true, or freeze_bn") from exc
            raise

    @torch.no_grad()
    def _valid_epoch(self, epoch: int) -> dict[str, Any]:
        # Under torchrun each process validates its own unpadded shard with the bare model:
        # shards may differ in length, and DDP's forward would wait for the other processes.
        model = self.unwrapped_model
        distributed.broadcast_buffers(model)  # every process evaluates rank 0's weights
        model.eval()
        self.confusion.reset()
        self.val_loader.set_epoch(epoch)
        loss_sum, count, sample = 0.0, 0, None
        bar = tqdm(self.val_loader, desc=f"val {epoch}/{self.epochs}", dynamic_ncols=True, leave=False,
                   disable=None if self.show_progress else True)
        rate = ImageRate()
        for images, targets in bar:
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            with self._autocast():
                logits = model(images)["out"]
                loss = self.loss(logits, targets)
            preds = logits.argmax(dim=1)
            self.confusion.update(preds, targets)
            loss_sum += loss.item() * images.shape[0]
            count += images.shape[0]
            if sample is None:
                sample = (images[:4].float().cpu(), targets[:4].cpu(), preds[:4].cpu())
            bar.set_postfix(loss=f"{loss_sum / count:.4f}", img_s=f"{rate.update(images.shape[0]):.1f}",
                            refresh=False)
            if self._stop_requested:
                break
        bar.close()
        self.confusion.all_reduce()
        metrics = segmentation_metrics(self.confusion.matrix, self.meta["class_names"])
        row = {"val_loss": _reduced_mean(loss_sum, count, self.device),
               **{k: metrics[k] for k in ("pixel_acc", "mean_acc", "mIoU", "fwIoU")}}
        for name, iou in zip(self.meta["class_names"], metrics["class_iou"]):
            row[f"iou/{name}"] = iou
        self._log_validation(epoch, row, sample)
        return row

    def _log_validation(self, epoch: int, row: dict, sample) -> None:
        for key, value in row.items():
            if isinstance(value, float):
                self.tb.scalar(f"val/{key}", value, epoch)
        if sample is not None and self.denormalize is not None:
            images, targets, preds = sample
            grid = prediction_grid(self.denormalize(images), targets, preds, self.meta["palette"],
                                   self.ignore_index)
            self.tb.image("val/image_groundtruth_prediction", grid, epoch)

    def close(self) -> None:
        self.tb.close()


class ImageRate:
    """Images per second over recent iterations (data loading included), for the progress bars."""

    def __init__(self) -> None:
        self.tick = time.perf_counter()
        self.value: float | None = None

    def update(self, images: int) -> float:
        now = time.perf_counter()
        speed = images / max(now - self.tick, 1e-9)
        self.tick = now
        self.value = speed if self.value is None else 0.9 * self.value + 0.1 * speed
        return self.value


def _reduced_mean(total: float, count: int, device: torch.device) -> float:
    """Mean of a per-process sum over all processes."""
    if not distributed.is_distributed():
        return total / max(count, 1)
    pair = distributed.all_reduce_sum(torch.tensor([total, float(count)], device=device, dtype=torch.float64))
    return (pair[0] / pair[1].clamp(min=1)).item()
