"""Run a config several times with different values, one run after another, resumably.

    python -m tools.sweep -c CONFIG --grid KEY=V1,V2[,...] [--grid KEY2=...] [--out DIR]
                          [--set KEY=VALUE ...] [--device cpu|cuda]
    python -m tools.sweep -c CONFIG --search optuna --trials N --grid KEY=LOW:HIGH[:log] --grid KEY2=a,b,c ...

Grid search runs every combination of the ``--grid`` values (each value is read as JSON, else as
a string, like ``--set``). ``--search optuna`` lets Optuna's sampler (TPE) propose ``--trials``
combinations: ``KEY=LOW:HIGH`` is a range (integers when both ends are, ``:log`` for a log
scale), ``KEY=a,b,c`` a choice. Optuna is an optional package (``pip install optuna``).

Each run is ``train.py`` in its own process (a crash ends that run, not the sweep), in its own
folder ``DIR/runs/NNN_key=value.../``. ``DIR`` (default ``<trainer.save_dir>/sweeps/<name>``)
keeps the sweep's state in ``sweep.json``: the same command run again continues where the sweep
stopped. A run whose folder has ``summary.json`` is finished and never runs again; a run that was
stopped (Ctrl-C, SIGTERM, a kill) is resumed from its ``checkpoint.pth`` with ``--resume``; a
failed run is tried again. Ctrl-C (or SIGTERM) stops the current run at its next check (it saves
its checkpoint) and then the sweep.

After every run, ``DIR/results.csv`` has one row per run (the varied values, the best value of
``trainer.monitor``'s metric, its epoch, the run's time in seconds, its status and folder) and
``DIR/results.png`` plots the metric against each varied key.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.compare import read_run
from utils.config import load_config, read_config
from utils.errors import ConfigError, run_command
from utils.files import make_dir, write_json
from utils.plots import pyplot

ROOT = Path(__file__).resolve().parents[1]
#: The script each run executes (a test may swap it).
TRAIN = ROOT / "train.py"
STATE = "sweep.json"
RESULTS = "results.csv"
PLOT = "results.png"
#: The exit code of a training run stopped by Ctrl-C or SIGTERM (it saved its checkpoint).
INTERRUPTED = 130


@dataclass(frozen=True)
class Axis:
    """One varied key: a list of values, or (Optuna only) a numeric range."""
    key: str
    values: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    def describe(self) -> Any:
        if self.values is not None:
            return list(self.values)
        return {"low": self.low, "high": self.high, "log": self.log, "integer": self.integer}


def parse_value(text: str) -> Any:
    """A value as ``--set`` reads it: JSON, else the string itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def split_top_level(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside brackets and quotes (``[1,2],[3,4]`` is two values)."""
    parts, depth, quote, start = [], 0, False, 0
    for i, char in enumerate(text):
        if char == '"' and (i == 0 or text[i - 1] != "\\"):
            quote = not quote
        elif not quote and char in "[{":
            depth += 1
        elif not quote and char in "]}":
            depth -= 1
        elif not quote and depth == 0 and char == sep:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_axis(spec: str, search: str) -> Axis:
    """``KEY=V1,V2`` or (Optuna) ``KEY=LOW:HIGH[:log]``."""
    if "=" not in spec:
        raise ConfigError(f"--grid {spec}: expected KEY=V1,V2,... (or KEY=LOW:HIGH with --search optuna)")
    key, text = (part.strip() for part in spec.split("=", 1))
    bounds = [parse_value(b) for b in split_top_level(text, ":")]
    if len(bounds) in (2, 3) and "," not in text and all(_is_number(b) for b in bounds[:2]) \
            and (len(bounds) == 2 or bounds[2] == "log"):
        low, high = bounds[0], bounds[1]
        if search != "optuna":
            raise ConfigError(f"--grid {spec}: a range LOW:HIGH needs --search optuna; a grid lists its values: "
                              f"{key}=V1,V2,...")
        if not low < high:
            raise ConfigError(f"--grid {spec}: the range needs LOW < HIGH")
        if len(bounds) == 3 and low <= 0:
            raise ConfigError(f"--grid {spec}: a log range needs LOW > 0")
        return Axis(key, low=low, high=high, log=len(bounds) == 3,
                    integer=isinstance(low, int) and isinstance(high, int))
    values = tuple(parse_value(v.strip()) for v in split_top_level(text, ","))
    if not text or any(v == "" for v in values):
        raise ConfigError(f"--grid {spec}: an empty value; write {key}=V1,V2,...")
    if len(set(map(json.dumps, values))) != len(values):
        raise ConfigError(f"--grid {spec}: a value is listed twice")
    return Axis(key, values=values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def assignment(key: str, value: Any) -> str:
    """``--set`` text giving ``key`` exactly ``value`` (strings quoted as JSON)."""
    return f"{key}={json.dumps(value)}"


def run_name(index: int, params: dict[str, Any]) -> str:
    """``003_lr=0.01_batch_size=4``: the index and the values by the last part of each key."""
    parts = []
    for key, value in params.items():
        short = key.rsplit(".", 1)[-1]
        shown = f"{value:.4g}" if isinstance(value, float) else (value if isinstance(value, str) else
                                                                   json.dumps(value))
        parts.append(f"{short}={shown}")
    name = re.sub(r"[^\w.=,+-]+", "-", re.sub(r'[\[\]{}" ]', "", "_".join(parts)))[:80]
    return f"{index:03d}_{name}" if name else f"{index:03d}"


class Sweep:
    """The sweep in ``out``: its definition, its runs' state, and how to run one."""

    def __init__(self, args: argparse.Namespace, axes: list[Axis], base: dict, out: Path) -> None:
        self.args, self.axes, self.base, self.out = args, axes, base, out
        monitor = base["trainer"]["monitor"]
        if monitor == "off":
            raise ConfigError("trainer.monitor is 'off': a sweep compares runs by their best monitored metric; "
                              "set it, e.g. --set 'trainer.monitor=max mIoU'")
        self.mode, self.metric = monitor.split()
        self.definition = {
            "config": str(Path(args.config).resolve()), "overrides": list(args.overrides),
            "search": args.search, "axes": [{"key": a.key, **{"values": a.describe()}} for a in axes],
            # The config file and its bases as written: editing them changes the sweep.
            "config_digest": hashlib.sha1(json.dumps(read_config(args.config), sort_keys=True).encode())
            .hexdigest()[:12]}
        self.state = self._load_state()
        self.child: subprocess.Popen | None = None
        self.stop_signal: int | None = None

    # --- state ----------------------------------------------------------------------------------------
    def _load_state(self) -> dict:
        path = self.out / STATE
        if not path.is_file():
            return {"definition": self.definition, "runs": {}}
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read the sweep's state ({exc}); move it away to start again")
        old = state.get("definition", {})
        changed = [k for k in self.definition if old.get(k) != self.definition[k]]
        if changed:
            what = ", ".join("the config file" if k == "config_digest" else k for k in changed)
            raise ConfigError(f"{self.out} holds a sweep with other settings ({what} changed); run the same "
                              f"command to continue it, or give another --out")
        return state

    def save_state(self) -> None:
        write_json(self.state, self.out / STATE)

    # --- running --------------------------------------------------------------------------------------
    def command(self, entry: dict) -> list[str]:
        run_dir = self.out / "runs" / entry["name"]
        sets = [*self.args.overrides, *(assignment(k, v) for k, v in entry["params"].items())]
        device = ["--device", self.args.device] if self.args.device else []
        if (run_dir / "checkpoint.pth").is_file():  # stopped before: continue it
            head = ["--resume", str(run_dir / "checkpoint.pth")]
        else:
            head = ["-c", str(self.args.config), "--run-dir", str(run_dir)]
        return [sys.executable, str(TRAIN), *head, *device,
                *[word for s in sets for word in ("--set", s)]]

    def run(self, entry: dict, position: str) -> str:
        """Train one run (resuming it when it was stopped); returns its status."""
        run_dir = self.out / "runs" / entry["name"]
        shown = " ".join(f"{k}={json.dumps(v)}" for k, v in entry["params"].items())
        if entry.get("status") == "done" or (run_dir / "summary.json").is_file():
            print(f"[{position}] {shown}: finished before, skipped ({run_dir})", flush=True)
            entry["status"] = "done"
            return "done"
        command = self.command(entry)
        verb = "resuming" if "--resume" in command else "training"
        script = os.path.relpath(command[1]) if Path(command[1]).is_relative_to(Path.cwd()) else command[1]
        print(f"[{position}] {shown}: {verb} in {run_dir}\n    {shlex.join(['python', script, *command[2:]])}",
              flush=True)
        entry["status"] = "running"
        self.save_state()
        started = time.monotonic()
        self.child = subprocess.Popen(command)
        try:
            code = self.child.wait()
        finally:
            entry["time"] = round(entry.get("time", 0.0) + time.monotonic() - started, 1)
            self.child = None
        if code == 0:
            entry["status"] = "done"
        elif code == INTERRUPTED or self.stop_signal is not None:
            entry["status"] = "stopped"
        else:
            entry["status"] = "failed"
            entry["exit_code"] = code
            print(f"[{position}] failed (exit code {code}); the sweep goes on. See {run_dir / 'train.log'}",
                  flush=True)
        self.save_state()
        return entry["status"]

    def _on_signal(self, signum, frame) -> None:
        """Ctrl-C or SIGTERM: the current run saves and stops (the signal is passed on), then the sweep."""
        first = self.stop_signal is None
        self.stop_signal = signum
        if first:
            print(f"\n{signal.Signals(signum).name}: stopping the current run (it saves a checkpoint) and the "
                  "sweep; run the same command to continue", file=sys.stderr, flush=True)
        if self.child is not None and self.child.poll() is None:
            # A Ctrl-C in the terminal reached the run already; it takes a second one within
            # 2 seconds as the same request.
            self.child.send_signal(signum)

    def catch_signals(self):
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(sig, handler) for sig, handler in previous.items()]

    # --- results --------------------------------------------------------------------------------------
    def results(self) -> list[dict]:
        rows = []
        for index, entry in sorted(self.state["runs"].items(), key=lambda item: int(item[0])):
            run_dir = self.out / "runs" / entry["name"]
            best, epoch = math.nan, ""
            if (run_dir / "config.json").is_file():
                info = read_run(run_dir)
                if info.best is not None:
                    best, epoch = info.best, info.best_epoch
            rows.append({"run": entry["name"], **entry["params"], self.metric: best, "best_epoch": epoch,
                         "time_s": entry.get("time", 0.0), "status": entry.get("status", "pending"),
                         "run_dir": str(run_dir)})
        return rows

    def write_results(self) -> list[dict]:
        rows = self.results()
        keys = [a.key for a in self.axes]
        fields = ["run", *keys, self.metric, "best_epoch", "time_s", "status", "run_dir"]
        with (self.out / RESULTS).open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: _cell(row.get(k)) for k in fields})
        plot_results(rows, keys, self.metric, self.out / PLOT)
        return rows


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    if isinstance(value, (list, dict, bool)) or value is None:
        return json.dumps(value)
    return value


def plot_results(rows: list[dict], keys: list[str], metric: str, path: Path) -> None:
    """The metric against each varied key (one panel per key; text values are placed in order)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(row[key], row[metric]) for row in rows if isinstance(row[metric], float)
                  and math.isfinite(row[metric])]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in points)
        if numeric:
            points.sort(key=lambda p: p[0])
            xs = [x for x, _ in points]
        else:
            labels = list(dict.fromkeys(json.dumps(x) if not isinstance(x, str) else x for x, _ in points))
            xs = [labels.index(json.dumps(x) if not isinstance(x, str) else x) for x, _ in points]
            ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        if points:
            ax.plot(xs, [y for _, y in points], "o", markersize=6)
        if numeric and len(xs) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 10:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the two searches ---------------------------------------------------------------------------------

def grid_search(sweep: Sweep) -> None:
    combos = list(itertools.product(*[a.values for a in sweep.axes]))
    for index, combo in enumerate(combos):
        params = dict(zip([a.key for a in sweep.axes], combo))
        entry = sweep.state["runs"].setdefault(str(index), {"name": run_name(index, params), "params": params})
        sweep.run(entry, f"{index + 1}/{len(combos)}")
        sweep.write_results()
        if sweep.stop_signal is not None:
            return


def optuna_search(sweep: Sweep, trials: int) -> None:
    try:
        import optuna
    except ImportError:
        raise ConfigError("--search optuna needs the optuna package: pip install optuna") from None
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions, choices = {}, {}
    for axis in sweep.axes:
        if axis.values is not None:  # Optuna's choices are plain values: others travel as JSON text
            choices[axis.key] = {json.dumps(v): v for v in axis.values}
            distributions[axis.key] = CategoricalDistribution(list(choices[axis.key]))
        elif axis.integer:
            distributions[axis.key] = IntDistribution(int(axis.low), int(axis.high), log=axis.log)
        else:
            distributions[axis.key] = FloatDistribution(float(axis.low), float(axis.high), log=axis.log)
    storage = JournalStorage(JournalFileBackend(str(sweep.out / "optuna.journal")))
    study = optuna.create_study(study_name="sweep", storage=storage, load_if_exists=True,
                                direction="maximize" if sweep.mode == "max" else "minimize",
                                sampler=optuna.samplers.TPESampler(seed=sweep.base["seed"]))

    def params_of(trial) -> dict:
        return {k: choices[k][v] if k in choices else v for k, v in trial.params.items()}

    def run_trial(number: int, params: dict) -> None:
        entry = sweep.state["runs"].setdefault(str(number), {"name": run_name(number, params), "params": params})
        status = sweep.run(entry, f"trial {number + 1}/{trials}")
        if status == "stopped":
            return  # left RUNNING in the study: the next invocation resumes it
        info = read_run(sweep.out / "runs" / entry["name"]) if status == "done" else None
        if info is not None and info.best is not None:
            study.tell(number, info.best)
        else:
            study.tell(number, state=optuna.trial.TrialState.FAIL)
        sweep.write_results()

    # Trials a stopped sweep left running continue first, with the values they had.
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        run_trial(trial.number, params_of(trial))
        if sweep.stop_signal is not None:
            return
    while len(study.trials) < trials and sweep.stop_signal is None:
        trial = study.ask(distributions)
        run_trial(trial.number, params_of(trial))
    sweep.write_results()


# --- the command --------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Run a config with several values, one run after another "
                                                 "(resumable): a grid, or Optuna's proposals.")
    parser.add_argument("-c", "--config", required=True, help="JSON config")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="a varied key and its values (repeatable); with --search optuna also "
                             "KEY=LOW:HIGH[:log], a range")
    parser.add_argument("--search", choices=("grid", "optuna"), default="grid",
                        help="grid: every combination (default); optuna: --trials proposals of Optuna's sampler")
    parser.add_argument("--trials", type=int, help="number of runs with --search optuna")
    parser.add_argument("--out", help="sweep folder (default: <trainer.save_dir>/sweeps/<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every run (repeatable)")
    parser.add_argument("-d", "--device", help="passed to train.py: cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if not args.grid:
        parser.error("give at least one --grid KEY=V1,V2,...")
    if args.search == "optuna" and (args.trials is None or args.trials < 1):
        parser.error("--search optuna needs --trials N (N >= 1)")
    if args.search == "grid" and args.trials is not None:
        parser.error("--trials goes with --search optuna; a grid runs every combination")
    return args


def run(args: argparse.Namespace) -> int:
    axes = [parse_axis(spec, args.search) for spec in args.grid]
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError("--grid: a key is given twice")
    base = load_config(args.config, args.overrides)
    for axis in axes:  # every value must be valid before anything runs
        for value in axis.values if axis.values is not None else (axis.low, axis.high):
            try:
                load_config(args.config, [*args.overrides, assignment(axis.key, value)])
            except ConfigError as exc:
                raise ConfigError(f"--grid {axis.key}={json.dumps(value)}: {exc}") from None
    out = Path(args.out) if args.out else Path(base["trainer"]["save_dir"]) / "sweeps" / base["name"]
    make_dir(out, "--out")
    sweep = Sweep(args, axes, base, out)
    sweep.save_state()
    restore = sweep.catch_signals()
    try:
        if args.search == "optuna":
            optuna_search(sweep, args.trials)
        else:
            grid_search(sweep)
    finally:
        restore()
    rows = sweep.write_results()
    return report(sweep, rows)


def report(sweep: Sweep, rows: list[dict]) -> int:
    """The sweep's outcome on stdout; the exit code (130 stopped, 1 some runs failed, 0 all done)."""
    done = [r for r in rows if r["status"] == "done" and isinstance(r[sweep.metric], float)
            and math.isfinite(r[sweep.metric])]
    if done:
        pick = max if sweep.mode == "max" else min
        best = pick(done, key=lambda r: r[sweep.metric])
        values = " ".join(f"{a.key}={json.dumps(best[a.key])}" for a in sweep.axes)
        print(f"Best {sweep.metric}: {best[sweep.metric]:.4f} (epoch {best['best_epoch']}) with {values}: "
              f"{best['run_dir']}")
    print(f"Results: {sweep.out / RESULTS} and {sweep.out / PLOT} ({len(done)} of {len(rows)} runs finished)")
    if sweep.stop_signal is not None:
        print("Stopped; run the same command to continue.", file=sys.stderr)
        return INTERRUPTED
    failed = [r["run"] for r in rows if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}; run the same command to try them again",
              file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
