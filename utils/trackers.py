"""Experiment trackers: TensorBoard, MLflow and Weights & Biases behind one small interface.

The trainer logs through ``self.tb``, which has the interface of :class:`utils.logger.TensorBoard`:
``scalar(tag, value, step)``, ``image(tag, image_chw, step)`` and ``close()``.
:func:`open_trackers` returns a :class:`Trackers` that sends each call to the sinks named by
``trainer.trackers`` (``["tensorboard"]`` by default):

* ``tensorboard``: event files in the run folder's ``tensorboard/`` (``trainer.tensorboard: false``
  turns it off as before);
* ``mlflow``: a run in ``trainer.mlflow.tracking_uri`` (default: the local folder
  ``<trainer.save_dir>/mlruns``), experiment ``trainer.mlflow.experiment`` (default: the config's
  ``name``);
* ``wandb``: a Weights & Biases run, offline unless ``trainer.wandb.mode`` (or ``WANDB_MODE``) says
  otherwise, its files under the run folder's ``wandb/``.

MLflow and W&B receive the resolved config flattened as parameters (``trainer.epochs`` = 30), every
scalar under the TensorBoard tag and step (``val/mIoU`` per epoch, ``train/loss`` per logged
iteration), and at the end of a finished run its best checkpoint(s), ``learning_curves.png``,
``metrics.csv``, ``summary.json`` and ``config.json`` as artifacts. Their run ids are saved in every
checkpoint (:attr:`Trackers.runs`): a resumed run continues the same tracked run. Their runs start
at the first value logged, so a run that fails before training leaves no tracked run behind.

Only the main process tracks. MLflow and W&B are optional packages: choosing one that is not
installed is a :class:`ConfigError` naming the package (:func:`require`).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from utils import distributed
from utils.config import resolve_path
from utils.errors import ConfigError
from utils.logger import TensorBoard

#: Tracker name -> (module to import, package to install).
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny"),
            "wandb": ("wandb", "wandb")}
#: The files of a finished run sent as artifacts (those that exist).
ARTIFACTS = ("best_model.pth", "best_model_ema.pth", "learning_curves.png", "metrics.csv", "summary.json",
             "config.json")

logger = logging.getLogger("segmentation")  # the run's logger (utils.logger.run_logger)


def require(names: list[str] | tuple[str, ...]) -> None:
    """A :class:`ConfigError` naming the package to install for each tracker that is not installed."""
    missing = [name for name in names if importlib.util.find_spec(PACKAGES[name][0]) is None]
    if missing:
        packages = " ".join(PACKAGES[name][1] for name in missing)
        raise ConfigError(f"trainer.trackers: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not "
                          f"installed; install with: pip install {packages} (or remove it from trainer.trackers)")


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """A config as ``{"trainer.epochs": "30", ...}``: objects and lists of objects by dotted keys
    (``transforms.0.type``), other lists as JSON text, null as ``null``."""
    if isinstance(config, Mapping):
        return {k: v for key, child in config.items() for k, v in flatten(child, f"{prefix}{key}.").items()}
    if isinstance(config, list) and any(isinstance(item, (Mapping, list)) for item in config):
        return {k: v for i, child in enumerate(config) for k, v in flatten(child, f"{prefix}{i}.").items()}
    if isinstance(config, (list, bool)) or config is None:
        text = json.dumps(config)
    else:
        text = str(config)
    return {prefix.rstrip("."): text}


def outcome(run_dir: Path) -> str:
    """How the run that is closing ended: ``FINISHED`` (no error and a summary written), ``KILLED``
    (a stop request, Ctrl-C) or ``FAILED``.

    The trainer closes its sinks in a ``finally`` clause, where the exception in flight, if any,
    is visible.
    """
    exc = sys.exc_info()[1]
    if exc is None:
        return "FINISHED" if (run_dir / "summary.json").is_file() else "KILLED"
    stopped = isinstance(exc, (KeyboardInterrupt, SystemExit)) or type(exc).__name__ == "TrainingInterrupted"
    return "KILLED" if stopped else "FAILED"


class Trackers:
    """The sinks of a run behind the interface of :class:`utils.logger.TensorBoard`."""

    def __init__(self, sinks: list, run_dir: Path | None = None) -> None:
        self.sinks = sinks
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.closed = False

    @property
    def runs(self) -> dict[str, str]:
        """The tracked runs' ids by tracker (``{"mlflow": "3f15..."}``), saved in checkpoints."""
        return {sink.name: sink.run_id for sink in self.sinks if getattr(sink, "run_id", None)}

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.closed or value is None or math.isnan(value):
            return
        for sink in self.sinks:
            sink.scalar(tag, value, step)

    def image(self, tag: str, image_chw: np.ndarray, step: int) -> None:
        if self.closed:
            return
        for sink in self.sinks:
            sink.image(tag, image_chw, step)

    def close(self) -> None:
        """End the tracked runs: finished ones get their artifacts (see :func:`outcome`)."""
        if self.closed:
            return
        self.closed = True
        status = outcome(self.run_dir) if self.run_dir is not None else "KILLED"
        for sink in self.sinks:
            if hasattr(sink, "finish"):
                sink.finish(status, self.run_dir)
            else:
                sink.close()


def open_trackers(settings, run_dir: Path) -> Trackers:
    """The sinks that ``settings`` (a ``TrainerSettings``) asks for, for the run in ``run_dir``.

    Reads ``trackers``, ``tensorboard_dir``, ``mlflow``, ``wandb``, ``tracker_runs`` (the ids of
    the runs to continue, from the resumed checkpoint) and ``record`` (the resolved config).
    """
    if not distributed.is_main_process():
        return Trackers([])
    names = list(getattr(settings, "trackers", ("tensorboard",)))
    require(names)
    runs = dict(getattr(settings, "tracker_runs", None) or {})
    record = dict(settings.record)
    sinks: list = []
    if "tensorboard" in names and settings.tensorboard_dir is not None:
        sinks.append(TensorBoard(settings.tensorboard_dir))
    if "mlflow" in names:
        sinks.append(MLflowSink(Path(run_dir), record, dict(getattr(settings, "mlflow", None) or {}),
                                runs.get("mlflow")))
    if "wandb" in names:
        sinks.append(WandbSink(Path(run_dir), record, dict(getattr(settings, "wandb", None) or {}),
                               runs.get("wandb")))
    return Trackers(sinks, run_dir)


def _run_name(record: dict, run_dir: Path) -> str:
    return f"{record.get('name', 'run')}/{run_dir.name}"


class MLflowSink:
    """An MLflow run through ``MlflowClient`` (no global ``mlflow.start_run`` state).

    The run starts (or a resumed one reopens) at the first value logged: a run that fails before
    training leaves nothing in the tracking store. Scalars are buffered and sent in batches: at
    most every ``FLUSH_SECONDS``, at each image (once per validation) and at the end.
    """

    name = "mlflow"
    FLUSH_SECONDS = 10.0
    FLUSH_SIZE = 500
    #: Characters MLflow accepts in a metric name; others become ``_``.
    _BAD = re.compile(r"[^\w\-. /:]")
    _MAX_PARAM = 6000

    def __init__(self, run_dir: Path, record: dict, options: dict, run_id: str | None) -> None:
        uri = options.get("tracking_uri") or str(Path(record["trainer"]["save_dir"]) / "mlruns")
        if ":" not in uri and uri != "databricks":  # a local folder (relative: from the project root)
            uri = Path(resolve_path(uri)).as_uri()
        self.uri, self.run_dir, self.record, self.options = uri, run_dir, record, options
        self.run_id = run_id  # the run to continue, until the run starts
        self.client = None
        self.buffer: list = []
        self.last_flush = time.monotonic()

    def _start(self) -> None:
        if self.uri.startswith("file:"):  # MLflow 3 keeps its file store in maintenance mode behind this opt-in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            logged: dict[str, str] = {}
            if self.run_id is not None:
                try:
                    logged = self.client.get_run(self.run_id).data.params
                    self.client.update_run(self.run_id, status="RUNNING")
                    logger.info(f"MLflow: continuing run {self.run_id} at {self.uri}")
                except MlflowException as exc:
                    logger.warning(f"MLflow: cannot continue run {self.run_id} at {self.uri} "
                                   f"({str(exc).splitlines()[0]}); starting a new one")
                    self.run_id = None
            if self.run_id is None:
                experiment = self.options.get("experiment") or self.record.get("name") or "Default"
                found = self.client.get_experiment_by_name(experiment)
                experiment_id = found.experiment_id if found is not None else \
                    self.client.create_experiment(experiment)
                self.run_id = self.client.create_run(experiment_id, run_name=_run_name(self.record, self.run_dir),
                                                     tags={"run_dir": str(self.run_dir)}).info.run_id
                logger.info(f"MLflow: run {self.run_id} in experiment '{experiment}' at {self.uri}")
            self._log_params(flatten(self.record), logged)
        except (MlflowException, OSError) as exc:
            raise ConfigError(f"trainer.mlflow: cannot track the run at {self.uri}: "
                              f"{str(exc).splitlines()[0]}") from exc

    def _log_params(self, params: dict[str, str], logged: dict[str, str]) -> None:
        """New parameters; a resumed run whose values changed (more epochs) notes them in a tag."""
        from mlflow.entities import Param

        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v[:self._MAX_PARAM])
        new = [Param(k, v[:self._MAX_PARAM]) for k, v in params.items() if k not in logged]
        for start in range(0, len(new), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=new[start:start + 100])
        if changed:
            self.client.set_tag(self.run_id, "changed_on_resume",
                                ", ".join(f"{k}={params[k]}" for k in changed)[:5000])

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.client is None:
            self._start()
        from mlflow.entities import Metric
        self.buffer.append(Metric(self._BAD.sub("_", tag), float(value), int(time.time() * 1000), int(step)))
        if len(self.buffer) >= self.FLUSH_SIZE or time.monotonic() - self.last_flush >= self.FLUSH_SECONDS:
            self.flush()

    def image(self, tag: str, image_chw: np.ndarray, step: int) -> None:
        if self.client is not None:
            self.flush()  # once per validation: the epoch's metrics are visible in the UI

    def flush(self) -> None:
        for start in range(0, len(self.buffer), 1000):  # MLflow's batch limit
            self.client.log_batch(self.run_id, metrics=self.buffer[start:start + 1000])
        self.buffer = []
        self.last_flush = time.monotonic()

    def finish(self, status: str, run_dir: Path | None) -> None:
        if self.client is None:  # nothing was logged: no run started, a resumed one is left as it was
            return
        self.flush()
        if status == "FINISHED" and run_dir is not None:
            for name in ARTIFACTS:
                if (run_dir / name).is_file():
                    self.client.log_artifact(self.run_id, str(run_dir / name))
        self.client.set_terminated(self.run_id, status=status)

    def close(self) -> None:
        self.finish("KILLED", None)


class WandbSink:
    """A Weights & Biases run, offline unless configured (``trainer.wandb.mode``).

    Like :class:`MLflowSink` it starts at the first value logged. The trainer logs per-iteration
    and per-epoch values under one interface, so each tag gets its own step metric
    (``step/<tag>``, hidden): ``val/mIoU`` is plotted against the epoch and ``train/loss`` against
    the iteration, as in TensorBoard.
    """

    name = "wandb"

    def __init__(self, run_dir: Path, record: dict, options: dict, run_id: str | None) -> None:
        self.run_dir, self.record, self.options = run_dir, record, options
        self.run_id = run_id  # the run to continue, until the run starts
        self.run = None
        self.defined: set[str] = set()

    def _start(self) -> None:
        import wandb

        self.wandb = wandb
        mode = self.options.get("mode") or os.environ.get("WANDB_MODE") or "offline"
        settings = wandb.Settings(console="off", silent=True, disable_git=True)
        resumed = self.run_id is not None
        self.run = wandb.init(project=self.options.get("project") or self.record.get("name") or "segmentation",
                              entity=self.options.get("entity"), name=_run_name(self.record, self.run_dir),
                              dir=str(self.run_dir), id=self.run_id, resume="allow" if resumed else None,
                              mode=mode, config=flatten(self.record), allow_val_change=True, reinit="create_new",
                              settings=settings)
        self.run_id = self.run.id
        self.run.define_metric("step/*", hidden=True)
        logger.info(f"W&B: {'continuing ' if resumed else ''}run {self.run_id} ({mode}) in "
                    f"{self.run_dir / 'wandb'}")

    def _step_key(self, tag: str) -> str:
        if self.run is None:
            self._start()
        key = f"step/{tag}"
        if tag not in self.defined:
            self.run.define_metric(tag, step_metric=key)
            self.defined.add(tag)
        return key

    def scalar(self, tag: str, value: float, step: int) -> None:
        key = self._step_key(tag)
        self.run.log({tag: float(value), key: int(step)})

    def image(self, tag: str, image_chw: np.ndarray, step: int) -> None:
        key = self._step_key(tag)
        self.run.log({tag: self.wandb.Image(np.transpose(image_chw, (1, 2, 0))), key: int(step)})

    def finish(self, status: str, run_dir: Path | None) -> None:
        if self.run is None:
            return
        if status == "FINISHED" and run_dir is not None:
            files = [run_dir / name for name in ARTIFACTS if (run_dir / name).is_file()]
            for kind, chosen in (("model", [f for f in files if f.suffix == ".pth"]),
                                 ("results", [f for f in files if f.suffix != ".pth"])):
                if chosen:
                    artifact = self.wandb.Artifact(f"{kind}-{self.run_id}", type=kind)
                    for path in chosen:
                        artifact.add_file(str(path))
                    self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)

    def close(self) -> None:
        self.finish("KILLED", None)
