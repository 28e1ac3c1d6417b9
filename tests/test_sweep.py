"""``python -m tools.sweep`` (grid and Optuna, resumable) and ``python -m tools.compare``."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tools import compare, sweep

ROOT = Path(__file__).resolve().parents[1]

#: Stands in for train.py: writes the files of a finished run whose mIoU peaks at lr 0.01, logs its
#: arguments to $FAKE_LOG, and fails (exit code 1) when the model depth is 3.
FAKE_TRAIN = r'''
import json, math, os, sys
from pathlib import Path
args = sys.argv[1:]
sets = dict(args[i + 1].split("=", 1) for i, word in enumerate(args) if word == "--set")
run_dir = Path(args[args.index("--resume") + 1]).parent if "--resume" in args else Path(args[args.index("--run-dir") + 1])
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps({"run_dir": run_dir.name, "resume": "--resume" in args, "sets": sets}) + "\n")
depth = json.loads(sets.get("arch.args.depth", "2"))
if depth == 3:
    sys.exit(1)
lr = json.loads(sets.get("optimizer.args.lr", "0.01"))
score = round(1 - abs(math.log10(lr) + 2) / 4, 6)
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "config.json").write_text(json.dumps({"name": "fake", "trainer": {"monitor": "max mIoU"},
                                                 "optimizer": {"args": {"lr": lr}}, "arch": {"args": {"depth": depth}}}))
(run_dir / "metrics.csv").write_text(f"epoch,train_loss,val_loss,mIoU,iou/a,iou/b\n1,1.0,0.9,{score / 2},0.1,0.2\n"
                                     f"2,0.5,0.6,{score},{score},0.3\n")
(run_dir / "summary.json").write_text(json.dumps({"best_epoch": 2, "best_metrics": {
    "epoch": 2, "mIoU": score, "iou/a": score, "iou/b": 0.3}}))
'''


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    """tools.sweep runs FAKE_TRAIN instead of train.py; returns the list of its calls so far."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    log = tmp_path / "calls.jsonl"
    monkeypatch.setattr(sweep, "TRAIN", script)
    monkeypatch.setenv("FAKE_LOG", str(log))
    return lambda: [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture
def config_path(tiny_config, tmp_path):
    tiny_config["trainer"].update(epochs=1, save_dir=str(tmp_path / "saved"))
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(tiny_config))
    return path


def read_results(folder: Path) -> list[dict]:
    with (folder / "results.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


# --- parsing --------------------------------------------------------------------------------------------

def test_grid_values_and_ranges_are_parsed_like_set():
    assert sweep.parse_axis("a.b=1,0.5,x", "grid").values == (1, 0.5, "x")
    assert sweep.parse_axis("t=[1,2],[3,4]", "grid").values == ([1, 2], [3, 4])
    assert sweep.parse_axis('s="a,b",c', "grid").values == ("a,b", "c")
    assert sweep.parse_axis("device=cuda:0", "grid").values == ("cuda:0",)
    lr = sweep.parse_axis("lr=1e-4:1e-1:log", "optuna")
    assert (lr.low, lr.high, lr.log, lr.integer) == (1e-4, 0.1, True, False)
    assert sweep.parse_axis("n=1:8", "optuna").integer
    for spec, search, message in [("lr=0.1:0.01", "optuna", "LOW < HIGH"), ("lr=1e-4:1e-1", "grid", "needs --search optuna"),
                                  ("lr=0:1:log", "optuna", "LOW > 0"), ("lr", "grid", "expected KEY=V1,V2"),
                                  ("lr=1,,2", "grid", "an empty value"), ("lr=1,1", "grid", "listed twice")]:
        with pytest.raises(sweep.ConfigError, match=message):
            sweep.parse_axis(spec, search)
    assert sweep.run_name(3, {"optimizer.args.lr": 0.001, "arch.type": "UNet"}) == "003_lr=0.001_type=UNet"


def test_bad_grid_values_are_refused_before_anything_runs(config_path, tmp_path, capsys, fake_train):
    out = tmp_path / "sweep"
    assert sweep.main(["-c", str(config_path), "--grid", "optimizer.args.lr=0.1,fast", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: --grid optimizer.args.lr="fast": ') and "expected float" in err
    assert sweep.main(["-c", str(config_path), "--grid", "trainer.epoch=1,2", "--out", str(out)]) == 2
    assert "Did you mean 'epochs'" in capsys.readouterr().err
    assert not out.exists() and fake_train() == []


# --- grid search with a stand-in for train.py -----------------------------------------------------------

def test_a_grid_runs_every_combination_goes_on_after_a_failure_and_never_repeats_a_finished_run(
        config_path, tmp_path, capsys, fake_train):
    out = tmp_path / "sweep"
    argv = ["-c", str(config_path), "--grid", "optimizer.args.lr=0.001,0.01", "--grid", "arch.args.depth=2,3",
            "--out", str(out), "--set", "trainer.epochs=2"]
    assert sweep.main(argv) == 1  # the depth-3 runs fail; the others finish
    printed = capsys.readouterr()
    assert "2 run(s) failed: 001_lr=0.001_depth=3, 003_lr=0.01_depth=3" in printed.err
    assert "Best mIoU: 1.0000 (epoch 2) with optimizer.args.lr=0.01 arch.args.depth=2" in printed.out
    calls = fake_train()
    assert [c["run_dir"] for c in calls] == ["000_lr=0.001_depth=2", "001_lr=0.001_depth=3",
                                             "002_lr=0.01_depth=2", "003_lr=0.01_depth=3"]
    assert calls[0]["sets"] == {"trainer.epochs": "2", "optimizer.args.lr": "0.001", "arch.args.depth": "2"}
    rows = read_results(out)
    assert [(r["optimizer.args.lr"], r["arch.args.depth"], r["mIoU"], r["best_epoch"], r["status"]) for r in rows] == [
        ("0.001", "2", "0.75", "2", "done"), ("0.001", "3", "", "", "failed"),
        ("0.01", "2", "1", "2", "done"), ("0.01", "3", "", "", "failed")]
    assert (out / "results.png").stat().st_size > 0

    assert sweep.main(argv) == 1  # again: only the failed runs are tried again
    assert [c["run_dir"] for c in fake_train()[4:]] == ["001_lr=0.001_depth=3", "003_lr=0.01_depth=3"]
    assert "finished before, skipped" in capsys.readouterr().out

    # The same folder with other settings is refused.
    assert sweep.main([*argv[:-2], "--set", "trainer.epochs=3"]) == 2
    assert "holds a sweep with other settings (overrides changed)" in capsys.readouterr().err


def test_compare_prints_the_differences_best_scores_and_class_iou(config_path, tmp_path, capsys, fake_train):
    out = tmp_path / "sweep"
    assert sweep.main(["-c", str(config_path), "--grid", "optimizer.args.lr=0.001,0.01", "--out", str(out)]) == 0
    capsys.readouterr()
    png = tmp_path / "cmp" / "curves.png"
    assert compare.main([str(out), "-o", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "optimizer.args.lr", "mIoU", "epoch", "finished", "a", "b"]
    assert lines[2].split() == ["000_lr=0.001", "0.001", "0.7500", "2", "yes", "0.750", "0.300"]
    assert lines[3].split() == ["001_lr=0.01", "0.01", "1.0000", "2", "yes", "1.000", "0.300"]
    assert png.stat().st_size > 0
    assert compare.main([str(tmp_path / "nothing")]) == 2
    assert "no such folder" in capsys.readouterr().err


# --- Optuna ---------------------------------------------------------------------------------------------

def test_optuna_proposes_values_in_the_ranges_and_continues_with_more_trials(config_path, tmp_path, capsys,
                                                                            fake_train):
    pytest.importorskip("optuna")
    out = tmp_path / "sweep"
    argv = ["-c", str(config_path), "--search", "optuna", "--grid", "optimizer.args.lr=1e-4:1e-1:log",
            "--grid", "arch.args.depth=1,2", "--out", str(out)]
    assert sweep.main([*argv, "--trials", "3"]) == 0
    rows = read_results(out)
    assert len(rows) == 3 and all(r["status"] == "done" for r in rows)
    assert all(1e-4 <= float(r["optimizer.args.lr"]) <= 0.1 and r["arch.args.depth"] in ("1", "2") for r in rows)
    assert (out / "optuna.journal").is_file()
    assert sweep.main([*argv, "--trials", "4"]) == 0  # one more trial; the first three are not run again
    assert len(fake_train()) == 4 and len(read_results(out)) == 4


def test_optuna_missing_is_a_one_line_error_naming_the_package(config_path, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna raises ImportError
    assert sweep.main(["-c", str(config_path), "--search", "optuna", "--trials", "2",
                       "--grid", "optimizer.args.lr=0.001:0.1", "--out", str(tmp_path / "sweep")]) == 2
    assert capsys.readouterr().err == "error: --search optuna needs the optuna package: pip install optuna\n"


# --- real runs: a stop in the middle, then the same command --------------------------------------------

def test_a_stopped_sweep_resumes_its_run_and_then_skips_finished_ones(config_path, tmp_path):
    out = tmp_path / "sweep"
    command = [sys.executable, "-m", "tools.sweep", "-c", str(config_path), "--grid", "optimizer.args.lr=0.01,0.05",
               "--out", str(out), "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        # The first run logs its folder once its stop handlers are in place: Ctrl-C to the sweep and its run.
        for line in process.stdout:
            if line.startswith("Run folder:"):
                os.killpg(process.pid, signal.SIGINT)
                break
        _, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, err
    first = out / "runs" / "000_lr=0.01"
    assert (first / "checkpoint.pth").is_file() and not (first / "summary.json").exists(), err
    assert not (out / "runs" / "001_lr=0.05").exists()
    assert json.loads((out / "sweep.json").read_text())["runs"]["0"]["status"] == "stopped"

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert "[1/2] optimizer.args.lr=0.01: resuming" in again.stdout
    assert "[2/2] optimizer.args.lr=0.05: training" in again.stdout
    assert "Resumed from" in (first / "train.log").read_text()
    rows = read_results(out)
    assert [(r["run"], r["status"], r["best_epoch"]) for r in rows] == [("000_lr=0.01", "done", "1"),
                                                                       ("001_lr=0.05", "done", "1")]
    assert all(0 <= float(r["mIoU"]) <= 1 and float(r["time_s"]) > 0 for r in rows)
    finished = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}

    third = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    assert third.stdout.count("finished before, skipped") == 2 and "training" not in third.stdout
    assert {p: p.stat().st_mtime_ns for p in finished} == finished
