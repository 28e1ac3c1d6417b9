"""``trainer.trackers``: TensorBoard, MLflow (its local file store, read back) and W&B (offline)."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
from utils import trackers
from utils.config import load_config
from utils.errors import ConfigError
from utils.logger import TensorBoard


def write_config(config: dict, folder: Path, **trainer) -> Path:
    config["trainer"].update(epochs=1, save_dir=str(folder / "saved"), **trainer)
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


def test_flatten_gives_dotted_keys_and_json_text():
    config = {"trainer": {"epochs": 30, "ema": None, "val": True}, "arch": {"args": {"size": [1, 2]}},
              "train_loader": {"args": {"transforms": [{"type": "Flip", "args": {"p": 0.5}}]}}, "name": "x"}
    assert trackers.flatten(config) == {
        "trainer.epochs": "30", "trainer.ema": "null", "trainer.val": "true", "arch.args.size": "[1, 2]",
        "train_loader.args.transforms.0.type": "Flip", "train_loader.args.transforms.0.args.p": "0.5", "name": "x"}


def test_the_trackers_key_is_checked(tiny_config):
    assert load_config(None, base=tiny_config)["trainer"]["trackers"] == ["tensorboard"]
    for value, message in [('["mlfow"]', "unknown tracker 'mlfow'. Did you mean 'mlflow'?"),
                           ('["mlflow", "mlflow"]', "named twice"), ('"mlflow"', "expected a list of strings")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [f"trainer.trackers={value}"], base=tiny_config)
    with pytest.raises(ConfigError, match="trainer.mlflow.experimnt: unknown key. Did you mean 'experiment'"):
        load_config(None, ['trainer.mlflow={"experimnt": "x"}'], base=tiny_config)
    with pytest.raises(ConfigError, match="trainer.wandb.mode: expected one of 'offline', 'online', 'disabled'"):
        load_config(None, ['trainer.wandb={"mode": "cloud"}'], base=tiny_config)


def settings(record: dict, **fields) -> SimpleNamespace:
    return SimpleNamespace(**{"trackers": ["tensorboard"], "tensorboard_dir": None, "mlflow": None, "wandb": None,
                              "tracker_runs": {}, "record": record, **fields})


def test_open_trackers_builds_the_named_sinks(tmp_path):
    record = {"name": "x", "trainer": {"save_dir": str(tmp_path)}}
    opened = trackers.open_trackers(settings(record, tensorboard_dir=tmp_path / "tb"), tmp_path)
    assert [type(s) for s in opened.sinks] == [TensorBoard]
    opened.close()
    assert trackers.open_trackers(settings(record), tmp_path).sinks == []  # trainer.tensorboard false
    both = trackers.open_trackers(settings(record, trackers=["mlflow"], tensorboard_dir=tmp_path / "tb"), tmp_path)
    assert [type(s).__name__ for s in both.sinks] == ["MLflowSink"]
    both.close()
    assert not (tmp_path / "mlruns").exists()  # nothing logged: no run was started


def test_a_tracker_that_is_not_installed_is_a_config_error(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(trackers.PACKAGES, "wandb", ("no_such_module_for_the_test", "wandb"))
    path = write_config(tiny_config, tmp_path, trackers=["tensorboard", "wandb"])
    assert train.main(["-c", str(path), "--device", "cpu"]) == 2
    assert capsys.readouterr().err == ("error: trainer.trackers: wandb is not installed; install with: "
                                       "pip install wandb (or remove it from trainer.trackers)\n")
    assert not (tmp_path / "saved").exists()


# --- MLflow, read back from its local store ------------------------------------------------------------

def mlflow_client(save_dir: Path):
    pytest.importorskip("mlflow")
    import os
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient
    return MlflowClient(tracking_uri=(save_dir / "mlruns").as_uri())


def test_mlflow_records_params_metrics_and_artifacts_and_a_resume_continues_its_run(tiny_config, tmp_path):
    from test_runs import scalar_steps

    pytest.importorskip("mlflow")
    path = write_config(tiny_config, tmp_path, trackers=["tensorboard", "mlflow"], tensorboard=True)
    run_dir = tmp_path / "run"
    assert train.main(["-c", str(path), "--run-dir", str(run_dir), "--device", "cpu"]) == 0
    client = mlflow_client(tmp_path / "saved")
    experiment = client.get_experiment_by_name("tiny")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny/run"
    assert torch.load(run_dir / "checkpoint.pth", weights_only=False)["tracker_runs"] == {"mlflow": run_id}
    params = run.data.params
    assert params["trainer.epochs"] == "1" and params["arch.type"] == "UNet" and params["seed"] == "7"
    assert params["train_loader.args.transforms.0.type"] == "RandomScale"
    assert params["trainer.trackers"] == '["tensorboard", "mlflow"]'
    # The same names and steps as TensorBoard's.
    tensorboard = scalar_steps(run_dir / "tensorboard")
    assert set(run.data.metrics) == set(tensorboard)
    assert {"val/mIoU", "val/iou/disk", "train/epoch_loss", "train/loss"} <= set(tensorboard)
    for tag, steps in tensorboard.items():
        assert sorted(m.step for m in client.get_metric_history(run_id, tag)) == sorted(steps), tag
    assert [m.value for m in client.get_metric_history(run_id, "val/mIoU")] == pytest.approx(
        [json.loads((run_dir / "summary.json").read_text())["best_metrics"]["mIoU"]])
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"best_model.pth", "learning_curves.png", "metrics.csv", "summary.json", "config.json"} <= artifacts

    # Resumed with one more epoch: the same MLflow run goes on.
    assert train.main(["--resume", str(run_dir / "checkpoint.pth"), "--set", "trainer.epochs=2",
                       "--device", "cpu"]) == 0
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "val/mIoU")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "train/epoch_loss")] == [1, 2]
    assert again.data.params["trainer.epochs"] == "1"  # MLflow keeps a parameter's first value...
    assert "trainer.epochs=2" in again.data.tags["changed_on_resume"]  # ...and the change is noted
    assert torch.load(run_dir / "checkpoint.pth", weights_only=False)["tracker_runs"] == {"mlflow": run_id}


def test_mlflow_takes_a_tracking_uri_and_an_experiment(tiny_config, tmp_path):
    pytest.importorskip("mlflow")
    store = tmp_path / "elsewhere"
    path = write_config(tiny_config, tmp_path, trackers=["mlflow"],
                        mlflow={"tracking_uri": str(store), "experiment": "lr-study"})
    assert train.main(["-c", str(path), "--run-dir", str(tmp_path / "run"), "--device", "cpu"]) == 0
    client = mlflow_client(tmp_path)
    client = type(client)(tracking_uri=store.as_uri())  # the configured store
    (run,) = client.search_runs([client.get_experiment_by_name("lr-study").experiment_id])
    assert run.info.status == "FINISHED" and "val/mIoU" in run.data.metrics
    assert not (tmp_path / "saved" / "mlruns").exists() and not (tmp_path / "run" / "tensorboard").exists()


def test_a_stopped_run_is_killed_in_mlflow_and_a_failed_one_failed(tmp_path):
    pytest.importorskip("mlflow")
    record = {"name": "x", "trainer": {"save_dir": str(tmp_path)}}
    client = mlflow_client(tmp_path)
    statuses = []
    for error in (KeyboardInterrupt, RuntimeError):
        sinks = trackers.open_trackers(settings(record, trackers=["mlflow"]), tmp_path / error.__name__)
        sinks.scalar("val/mIoU", 0.5, 1)
        try:
            try:
                raise error
            finally:
                sinks.close()
        except error:
            pass
        statuses.append(client.get_run(sinks.runs["mlflow"]).info.status)
    assert statuses == ["KILLED", "FAILED"]


# --- Weights & Biases, offline ---------------------------------------------------------------------------

def test_wandb_runs_offline_in_the_run_folder_and_a_resume_keeps_its_id(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    path = write_config(tiny_config, tmp_path, trackers=["wandb"])
    run_dir = tmp_path / "run"
    assert train.main(["-c", str(path), "--run-dir", str(run_dir), "--device", "cpu"]) == 0
    run_id = torch.load(run_dir / "checkpoint.pth", weights_only=False)["tracker_runs"]["wandb"]
    assert list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert train.main(["--resume", str(run_dir / "checkpoint.pth"), "--set", "trainer.epochs=2",
                       "--device", "cpu"]) == 0
    assert torch.load(run_dir / "checkpoint.pth", weights_only=False)["tracker_runs"] == {"wandb": run_id}
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 2  # `wandb sync` joins them


def test_the_sinks_share_the_tensorboard_interface():
    for sink in (TensorBoard, trackers.MLflowSink, trackers.WandbSink, trackers.Trackers):
        assert all(callable(getattr(sink, name, None)) for name in ("scalar", "image", "close")), sink
    trackers.Trackers([]).image("x", np.zeros((3, 2, 2), np.uint8), 1)
