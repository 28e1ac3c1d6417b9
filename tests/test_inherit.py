"""Config inheritance (``"base": [...]``): merging, ``_replace_``, errors naming the chain, the
shipped configs refactored onto ``configs/_base_/``, ``--print-config`` and ``--explain``."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import train
from utils.config import load_config, read_config, read_json
from utils.errors import ConfigError
from utils.inherit import explain, resolve

ROOT = Path(__file__).resolve().parents[1]
#: ``load_config`` of every shipped config as it was before the configs were refactored onto bases
#: (absolute paths written relative to the repository; see :func:`snapshot`).
FIXTURE = ROOT / "tests" / "fixtures" / "resolved_configs.json"
SNAPSHOT = json.loads(FIXTURE.read_text())


def snapshot() -> dict:
    """What the fixture holds: ``load_config`` of config.json and configs/*.json, absolute paths relative
    to the repository (the fixture was written by this function before the configs got bases)."""
    def portable(value):
        if isinstance(value, dict):
            return {k: portable(v) for k, v in value.items()}
        if isinstance(value, list):
            return [portable(v) for v in value]
        return os.path.relpath(value, ROOT) if isinstance(value, str) and os.path.isabs(value) else value
    paths = [ROOT / "config.json", *sorted((ROOT / "configs").glob("*.json"))]
    return {p.relative_to(ROOT).as_posix(): portable(load_config(p)) for p in paths}


@pytest.mark.parametrize("name", sorted(SNAPSHOT))
def test_shipped_config_resolves_as_before_the_refactoring(name):
    # The snapshot goes through validation again so that keys added to the schema since (with their
    # defaults) and path resolution apply to both sides; a resolved config validates to itself.
    assert load_config(ROOT / name) == load_config(None, base=SNAPSHOT[name])


def test_the_comparison_configs_are_one_change_on_a_base():
    for path in sorted((ROOT / "configs").glob("minicity_deeplabv3_*.json")):
        own = read_json(path)
        assert own["base"] == "_base_/minicity_deeplabv3.json"
        assert len(own) <= 3, path.name  # base, name and the one key compared


# --- merging ------------------------------------------------------------------------------------------

def write(folder: Path, name: str, content: dict) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content))
    return path


def test_bases_merge_in_order_then_the_file_on_top(tmp_path):
    write(tmp_path, "_base_/data.json", {"loader": {"type": "A", "args": {"size": 1, "sizes": [1, 2], "x": 1}},
                                         "trainer": {"epochs": 10, "val": True}})
    write(tmp_path, "_base_/schedule.json", {"trainer": {"epochs": 20, "monitor": "max mIoU"}})
    path = write(tmp_path, "exp.json", {"base": ["_base_/data.json", "_base_/schedule.json"],
                                        "loader": {"args": {"sizes": [3], "x": None}}, "trainer": {"val": False}})
    config, sources = resolve(path, read_json)
    assert config == {"loader": {"type": "A", "args": {"size": 1, "sizes": [3], "x": None}},
                      "trainer": {"epochs": 20, "val": False, "monitor": "max mIoU"}}
    data, schedule, exp = (str(tmp_path / n) for n in ("_base_/data.json", "_base_/schedule.json", "exp.json"))
    assert sources["loader.type"] == data and sources["loader.args.size"] == data
    assert sources["loader.args.sizes[0]"] == exp and "loader.args.sizes[1]" not in sources
    assert sources["trainer.epochs"] == schedule and sources["trainer.val"] == exp


def test_bases_may_have_bases_and_paths_are_relative_to_each_file(tmp_path):
    write(tmp_path, "configs/_base_/root.json", {"a": 1, "b": {"c": 1, "d": 1}})
    write(tmp_path, "configs/_base_/mid.json", {"base": "root.json", "b": {"c": 2}})
    absolute = write(tmp_path, "elsewhere/extra.json", {"e": 5})
    path = write(tmp_path, "configs/exp.json", {"base": ["_base_/mid.json", str(absolute)], "b": {"d": 3}})
    assert read_config(path) == {"a": 1, "b": {"c": 2, "d": 3}, "e": 5}


def test_replace_marker_replaces_a_whole_object_and_is_removed(tmp_path):
    write(tmp_path, "base.json", {"optimizer": {"type": "SGD", "args": {"lr": 0.1, "momentum": 0.9}}})
    merged = write(tmp_path, "merged.json", {"base": "base.json", "optimizer": {"type": "Adam", "args": {"lr": 1}}})
    replaced = write(tmp_path, "replaced.json", {"base": "base.json",
                                                 "optimizer": {"_replace_": True, "type": "Adam", "args": {"lr": 1}}})
    assert read_config(merged)["optimizer"] == {"type": "Adam", "args": {"lr": 1, "momentum": 0.9}}
    assert read_config(replaced)["optimizer"] == {"type": "Adam", "args": {"lr": 1}}
    assert "_replace_" not in json.dumps(read_config(replaced))


def test_a_component_name_and_its_type_args_form_replace_each_other(tmp_path):
    write(tmp_path, "base.json", {"loss": "CrossEntropyLoss", "norm": {"type": "GroupNorm", "args": {"num_groups": 2}},
                                  "ema": None, "log_dir": "x"})
    path = write(tmp_path, "exp.json", {"base": "base.json", "loss": {"type": "FocalLoss", "args": {"gamma": 2}},
                                        "norm": "BatchNorm", "ema": {"decay": 0.9}, "log_dir": None})
    assert read_config(path) == {"loss": {"type": "FocalLoss", "args": {"gamma": 2}}, "norm": "BatchNorm",
                                 "ema": {"decay": 0.9}, "log_dir": None}


def one_line_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        read_config(path)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_a_cycle_names_the_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.json", {"base": "b.json"})
    write(tmp_path, "b.json", {"base": ["c.json", "a.json"]})
    write(tmp_path, "c.json", {})
    write(tmp_path, "self.json", {"base": "./self.json"})
    assert one_line_error(Path("a.json")) == "a.json -> b.json -> a.json: the bases form a cycle"
    assert one_line_error(Path("self.json")) == "self.json -> self.json: the bases form a cycle"


def test_a_missing_or_broken_base_names_the_chain(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.json", {"base": "_base_/b.json"})
    write(tmp_path, "_base_/b.json", {"base": "missing.json"})
    (tmp_path / "broken.json").write_text('{"a": 1,}')
    write(tmp_path, "uses_broken.json", {"base": "broken.json"})
    assert one_line_error(Path("a.json")) == "a.json -> _base_/b.json -> _base_/missing.json: config file not found"
    assert one_line_error(Path("uses_broken.json")).startswith("uses_broken.json -> broken.json:1:")
    write(tmp_path, "bad.json", {"base": 3})
    assert "bad.json: base: expected a path or a list of paths" in one_line_error(Path("bad.json"))


def test_changing_an_object_into_a_value_or_back_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "base.json", {"trainer": {"epochs": 3}, "seed": 1})
    write(tmp_path, "scalar.json", {"base": "base.json", "trainer": 5})
    write(tmp_path, "object.json", {"base": "base.json", "seed": {"value": 2}})
    write(tmp_path, "marked.json", {"base": "base.json", "seed": {"_replace_": True, "value": 2}})
    write(tmp_path, "bad_marker.json", {"base": "base.json", "trainer": {"_replace_": "yes"}})
    message = one_line_error(Path("scalar.json"))
    assert message.startswith("scalar.json: trainer: 5 cannot replace the object set in base.json")
    assert '"_replace_": true' in message
    message = one_line_error(Path("object.json"))
    assert message.startswith("object.json: seed: an object cannot replace 1 set in base.json")
    assert read_config(Path("marked.json"))["seed"] == {"value": 2}
    assert "trainer._replace_: expected true or false" in one_line_error(Path("bad_marker.json"))


def test_a_type_change_between_two_bases_names_the_file_that_merges_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "one.json", {"a": {"b": 1}})
    write(tmp_path, "two.json", {"a": [1]})
    write(tmp_path, "mid.json", {"base": ["one.json", "two.json"]})
    write(tmp_path, "top.json", {"base": "mid.json"})
    assert one_line_error(Path("top.json")).startswith("top.json -> mid.json: a: [1] cannot replace the object "
                                                       "set in one.json")


def test_explain_names_the_source_of_every_value(tmp_path):
    write(tmp_path, "base.json", {"loss": "CrossEntropyLoss", "trainer": {"epochs": 3}})
    path = write(tmp_path, "exp.json", {"base": "base.json", "trainer": {"val": False}})
    config, sources = resolve(path, read_json)
    lines = explain({"loss": {"type": "CrossEntropyLoss", "args": {"weight": None}},
                     "trainer": {"epochs": 3, "val": False, "tags": []}}, sources)
    assert [(line.split(" = ")[0], line.split("# ")[1]) for line in lines] == [
        ("loss.type", str(tmp_path / "base.json")), ("loss.args.weight", "default"),
        ("trainer.epochs", str(tmp_path / "base.json")), ("trainer.val", str(path)), ("trainer.tags", "default")]


# --- the command line ---------------------------------------------------------------------------------

def split_config(tiny_config: dict, folder: Path) -> Path:
    """``tiny_config`` as a data base, a schedule base and a top file."""
    data = {k: tiny_config.pop(k) for k in ("train_loader", "val_loader")}
    write(folder, "_base_/data.json", data)
    write(folder, "_base_/schedule.json", {"base": "data.json", "optimizer": tiny_config.pop("optimizer")})
    return write(folder, "exp.json", {"base": ["_base_/schedule.json"], **tiny_config})


def test_print_config_prints_the_resolved_config_and_builds_nothing(tiny_config, tmp_path, capsys):
    tiny_config["trainer"]["save_dir"] = str(tmp_path / "saved")
    path = split_config(tiny_config, tmp_path)
    assert train.main(["-c", str(path), "--print-config", "--set", "trainer.epochs=5"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == load_config(path, ["trainer.epochs=5"]) and printed["trainer"]["epochs"] == 5
    assert "base" not in printed
    assert not (tmp_path / "saved").exists()


def test_explain_prints_where_each_value_came_from(tiny_config, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_config["trainer"]["save_dir"] = str(tmp_path / "saved")
    split_config(tiny_config, tmp_path)
    assert train.main(["-c", "exp.json", "--explain", "--set", "trainer.epochs=5",
                       "--set", 'trainer.ema={"decay": 0.9}']) == 0
    lines = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["trainer.epochs"].endswith("# --set") and "= 5 " in lines["trainer.epochs"]
    assert lines["trainer.ema.decay"].endswith("# --set")
    assert lines["train_loader.args.num_samples"].endswith("# _base_/data.json")
    assert lines["optimizer.args.lr"].endswith("# _base_/schedule.json")
    assert lines["name"].endswith("# exp.json")
    assert lines["trainer.early_stop"].endswith("# default")
    assert not (tmp_path / "saved").exists()


def test_a_bad_base_is_a_one_line_error_of_train(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "a.json", {"base": "b.json"})
    write(tmp_path, "b.json", {"base": "a.json"})
    assert train.main(["-c", "a.json", "--print-config"]) == 2
    assert capsys.readouterr().err == "error: a.json -> b.json -> a.json: the bases form a cycle\n"


def test_a_run_keeps_the_resolved_config_and_resumes_without_its_bases(tiny_config, tmp_path, capsys):
    tiny_config["trainer"].update(epochs=1, save_dir=str(tmp_path / "saved"))
    path = split_config(tiny_config, tmp_path)
    run_dir = tmp_path / "run"
    assert train.main(["-c", str(path), "--run-dir", str(run_dir), "--device", "cpu"]) == 0
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved == load_config(path) and "base" not in saved
    for base in (tmp_path / "_base_").iterdir():
        base.unlink()
    capsys.readouterr()
    assert train.main(["--resume", str(run_dir / "checkpoint.pth"), "--set", "trainer.epochs=2",
                       "--device", "cpu"]) == 0
    assert json.loads((run_dir / "summary.json").read_text())["epochs_trained"] == 2
