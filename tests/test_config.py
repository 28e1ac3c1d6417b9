"""Config reading, overrides and whole-config validation, with the exact messages users see."""
from __future__ import annotations

import json
import re
from typing import Annotated

import pytest

from utils.config import apply_override, load_config, read_json, validate_config
from utils.errors import ConfigError
from utils.registry import Check, Registry


def write(tmp_path, config) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config) if isinstance(config, dict) else config)
    return str(path)


def error_of(config: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(config)
    return str(info.value)


def test_malformed_json_names_line_and_column(tmp_path):
    path = write(tmp_path, '{\n  "name": "x",\n  "seed": 1\n  "amp": true\n}')
    with pytest.raises(ConfigError, match=r"config\.json:4:3: invalid JSON: Expecting ',' delimiter"):
        read_json(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="nope.json: config file not found"):
        read_json(tmp_path / "nope.json")


def test_resolved_config_has_defaults(tiny_config):
    resolved = validate_config(tiny_config)
    assert resolved["ignore_index"] == 255
    assert resolved["amp"] == "off"
    assert resolved["trainer"]["early_stop"] == 0
    assert resolved["trainer"]["val_per_epochs"] == 1
    assert resolved["arch"]["args"] == {"backbone": None, "in_channels": 3, "base_channels": 4, "depth": 2,
                                        "decoder_channels": None, "upsampling": "bilinear", "output_stride": 32,
                                        "pretrained": False, "weights_path": None, "freeze_bn": False,
                                        "freeze_backbone": False}
    assert resolved["optimizer"]["differential_lr"] is False
    assert resolved["optimizer"]["args"] == {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4,
                                             "nesterov": False}
    assert resolved["train_loader"]["args"]["num_workers"] == 0
    assert resolved["train_loader"]["args"]["transforms"][2] == {"type": "RandomHorizontalFlip",
                                                                 "args": {"p": 0.5}}
    assert resolved["loss"] == {"type": "CrossEntropyLoss", "args": {"label_smoothing": 0.0}}
    # The resolved config validates to itself (it is what a run saves and resumes from).
    assert validate_config(json.loads(json.dumps(resolved))) == resolved


def test_unknown_top_level_key_did_you_mean(tiny_config):
    tiny_config["trainr"] = tiny_config.pop("trainer")
    message = error_of(tiny_config)
    assert "trainr: unknown key. Did you mean 'trainer'?" in message


def test_unknown_model_argument_names_dotted_path(tiny_config):
    tiny_config["arch"]["args"]["base_chanels"] = 8
    message = error_of(tiny_config)
    assert message.startswith("arch.args.base_chanels: unknown argument for model 'UNet'. "
                              "Did you mean 'base_channels'?")


def test_unknown_type_lists_choices(tiny_config):
    tiny_config["arch"]["type"] = "UNett"
    message = error_of(tiny_config)
    assert "arch.type: unknown model 'UNett'. Did you mean 'UNet'? Available: " in message
    from utils.registry import MODELS
    assert message.split("Available: ")[1].split(", ") == MODELS.names()


def test_wrong_type_names_expected_type(tiny_config):
    tiny_config["trainer"]["epochs"] = "ten"
    assert error_of(tiny_config) == "trainer.epochs: expected an integer, got 'ten'"


def test_wrong_argument_type(tiny_config):
    tiny_config["optimizer"]["args"]["lr"] = "fast"
    assert error_of(tiny_config) == "optimizer.args.lr: expected a number, got 'fast'"


def test_injected_argument_cannot_be_set(tiny_config):
    tiny_config["arch"]["args"]["num_classes"] = 3
    assert "arch.args.num_classes: is set by the framework" in error_of(tiny_config)


def test_missing_required_section_and_argument(tiny_config):
    del tiny_config["train_loader"]
    del tiny_config["optimizer"]["args"]["lr"]
    message = error_of(tiny_config)
    assert "train_loader: missing required key" in message
    assert "optimizer.args.lr: missing required argument for optimizer 'SGD'" in message


def test_all_errors_are_reported_together(tiny_config):
    tiny_config["seed"] = 1.5
    tiny_config["loss"] = "Dice"
    tiny_config["trainer"]["monitor"] = "max miou"
    lines = error_of(tiny_config).splitlines()
    assert lines[0] == "seed: expected an integer, got 1.5"
    assert lines[1].startswith("loss.type: unknown loss 'Dice'. Available: CrossEntropyLoss")
    assert lines[2] == ("trainer.monitor: unknown metric 'miou'. Did you mean 'mIoU'? "
                        "Available: mIoU, pixel_acc, mean_acc, fwIoU, val_loss, iIoU, mean_f1, mean_precision, mean_recall")


def test_monitor_format(tiny_config):
    tiny_config["trainer"]["monitor"] = "best mIoU"
    assert "trainer.monitor: expected 'max METRIC', 'min METRIC' or 'off'" in error_of(tiny_config)


def test_loader_arguments(tiny_config):
    tiny_config["train_loader"]["args"]["batch_szie"] = 4
    tiny_config["val_loader"]["args"]["num_workers"] = -1
    message = error_of(tiny_config)
    assert "train_loader.args.batch_szie: unknown argument for dataset 'SyntheticShapes'. " \
           "Did you mean 'batch_size'?" in message
    assert "val_loader.args.num_workers: must be >= 0, got -1" in message


def test_transform_errors_name_their_index(tiny_config):
    tiny_config["train_loader"]["args"]["transforms"][1] = {"type": "RandomCrop", "args": {"sise": 3}}
    assert error_of(tiny_config).startswith(
        "train_loader.args.transforms[1].args.sise: unknown argument for transform 'RandomCrop'.")


def test_literal_choices_are_checked(tiny_config):
    tiny_config["arch"]["args"]["upsampling"] = "nearest"
    assert error_of(tiny_config) == ("arch.args.upsampling: expected one of 'bilinear', 'transpose', "
                                     "got 'nearest'")


def test_val_loader_must_match_train_dataset(tiny_config):
    tiny_config["val_loader"] = {"type": "CamVid", "args": {"data_dir": "x", "split": "val"}}
    assert "val_loader.type: must be the same data set as train_loader.type (SyntheticShapes)" \
        in error_of(tiny_config)


def test_override_keeps_type(tiny_config):
    apply_override(tiny_config, "trainer.epochs=3")
    apply_override(tiny_config, "optimizer.args.lr=1")
    apply_override(tiny_config, "arch.type=UNet")
    apply_override(tiny_config, 'train_loader.args.transforms=[{"type": "RandomHorizontalFlip"}]')
    assert tiny_config["trainer"]["epochs"] == 3
    assert tiny_config["optimizer"]["args"]["lr"] == 1.0 and isinstance(tiny_config["optimizer"]["args"]["lr"], float)
    assert tiny_config["train_loader"]["args"]["transforms"] == [{"type": "RandomHorizontalFlip"}]
    with pytest.raises(ConfigError, match=r"--set trainer.epochs: expected int like the config's 3, got 'three'"):
        apply_override(tiny_config, "trainer.epochs=three")
    with pytest.raises(ConfigError, match=r"--set trainer.progress_bar: expected bool"):
        apply_override(tiny_config, "trainer.progress_bar=1")
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_override(tiny_config, "trainer.epochs")
    with pytest.raises(ConfigError, match=r"'trainr' is not an object in the config. Did you mean 'trainer'\?"):
        apply_override(tiny_config, "trainr.epochs=3")


def test_override_of_new_key_is_validated(tmp_path, tiny_config):
    path = write(tmp_path, tiny_config)
    resolved = load_config(path, ["arch.args.depth=3", "trainer.early_stop=2"])
    assert resolved["arch"]["args"]["depth"] == 3 and resolved["trainer"]["early_stop"] == 2
    with pytest.raises(ConfigError, match=r"config\.json: trainer\.epoch: unknown key\. Did you mean 'epochs'\?"):
        load_config(path, ["trainer.epoch=3"])


def test_registry_rejects_duplicates_and_wraps_constructor_errors():
    registry = Registry("thing")

    @registry.register
    def Thing(size: int = 1) -> int:
        if size < 0:
            raise ValueError("size must be >= 0")
        return size

    assert registry.build({"type": "Thing", "args": {"size": 3}}, "thing") == 3
    with pytest.raises(ConfigError, match=r"^thing \(Thing\): size must be >= 0$"):
        registry.build({"type": "Thing", "args": {"size": -1}}, "thing")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(lambda: None, name="Thing")
    with pytest.raises(ConfigError, match=r"thing.args: expected an object, got list"):
        registry.validate({"type": "Thing", "args": [1]}, "thing")
    with pytest.raises(ConfigError, match=r"thing.arg: unknown key. Did you mean 'args'\?"):
        registry.validate({"type": "Thing", "arg": {}}, "thing")


def _even(value, path):
    if value % 2:
        raise ConfigError(f"{path}: must be even, got {value}")


def test_annotated_checks_run_at_validation():
    things = Registry("thing")

    @things.register
    def pair(n: Annotated[int, Check(_even)] = 2) -> int:
        return n

    assert things.validate({"type": "pair", "args": {"n": 4}}, "x") == {"type": "pair", "args": {"n": 4}}
    with pytest.raises(ConfigError, match=r"^x\.args\.n: must be even, got 3$"):
        things.validate({"type": "pair", "args": {"n": 3}}, "x")
    # The type is checked first, so a check only ever sees a value of its type.
    with pytest.raises(ConfigError, match=r"x\.args\.n: expected an integer, got 'z'"):
        things.validate({"type": "pair", "args": {"n": "z"}}, "x")


@pytest.mark.parametrize("text", ['"lr": NaN', '"lr": Infinity', '"lr": -Infinity', '"lr": 1e999'])
def test_non_finite_numbers_in_the_file_are_rejected_with_their_path(tmp_path, tiny_config, text):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(tiny_config).replace('"lr": 0.05', text))
    with pytest.raises(ConfigError, match=r"config.json: optimizer.args.lr: NaN and Infinity are not allowed"):
        load_config(path)


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999", '[1, NaN]'])
def test_non_finite_numbers_in_set_are_rejected(tiny_config, value):
    with pytest.raises(ConfigError, match=r"^--set optimizer.args.lr(\[1\])?: NaN and Infinity are not allowed"):
        apply_override(tiny_config, f"optimizer.args.lr={value}")


def test_adam_betas_must_be_a_pair(tiny_config):
    tiny_config["optimizer"] = {"type": "Adam", "args": {"lr": 0.001, "betas": [0.9]}}
    with pytest.raises(ConfigError, match=r"optimizer.args.betas: expected a list of 2 numbers, got \[0.9\]"):
        validate_config(tiny_config)
    tiny_config["optimizer"]["args"]["betas"] = [0.8, 0.99]
    assert validate_config(tiny_config)["optimizer"]["args"]["betas"] == [0.8, 0.99]


def test_any_constructor_error_from_a_value_names_the_path():
    registry = Registry("thing")

    @registry.register
    def Pick(choices: list[int] = (1, 2), index: int = 0) -> int:
        return choices[index]

    with pytest.raises(ConfigError, match=r"^thing \(Pick\): IndexError: list index out of range$"):
        registry.build({"type": "Pick", "args": {"index": 5}}, "thing")


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_seed_is_bounded(tiny_config, seed):
    tiny_config["seed"] = seed
    with pytest.raises(ConfigError, match=rf"seed: must be between 0 and 4294967295, got {seed}"):
        validate_config(tiny_config)


def test_set_on_a_plain_loss_name_shows_the_type_args_form(tiny_config):
    with pytest.raises(ConfigError) as info:
        apply_override(tiny_config, "loss.args.label_smoothing=0.1")
    assert str(info.value) == (
        "--set loss.args.label_smoothing: 'loss' is the name \"CrossEntropyLoss\" here, which has no args; "
        "give the {type, args} form: --set 'loss={\"type\": \"CrossEntropyLoss\", \"args\": "
        "{\"label_smoothing\": 0.1}}'")
    # The suggested command works.
    apply_override(tiny_config, 'loss={"type": "CrossEntropyLoss", "args": {"label_smoothing": 0.1}}')
    assert validate_config(tiny_config)["loss"]["args"]["label_smoothing"] == 0.1


def test_set_of_a_number_where_a_string_is_hints_at_quoting(tiny_config):
    with pytest.raises(ConfigError, match=r"""--set name: expected str like the config's 'tiny', got 2024; """
                                          r"""to give the string "2024", quote it: --set 'name="2024"'"""):
        apply_override(tiny_config, "name=2024")
    apply_override(tiny_config, 'name="2024"')
    assert tiny_config["name"] == "2024"


def test_set_reaches_list_elements(tiny_config):
    apply_override(tiny_config, "train_loader.args.transforms[2].args={}")
    apply_override(tiny_config, "train_loader.args.transforms[2].args.p=0.3")
    apply_override(tiny_config, "train_loader.args.transforms[1].args.size=24")
    transforms = validate_config(tiny_config)["train_loader"]["args"]["transforms"]
    assert transforms[2] == {"type": "RandomHorizontalFlip", "args": {"p": 0.3}}
    assert transforms[1]["args"]["size"] == 24
    with pytest.raises(ConfigError, match=r"'train_loader.args.transforms' has 3 element\(s\); \[5\] is out of range"):
        apply_override(tiny_config, "train_loader.args.transforms[5].args.p=0.3")
    with pytest.raises(ConfigError, match=r"'trainer.epochs' is not a list in the config"):
        apply_override(tiny_config, "trainer.epochs[0]=1")
    with pytest.raises(ConfigError, match=r"cannot read 'transforms\[x\]'"):
        apply_override(tiny_config, "train_loader.args.transforms[x].p=1")


# --- metrics: which classes the means average ------------------------------------------------------

def test_metrics_section_is_resolved_only_when_given(tiny_config):
    assert "metrics" not in validate_config(tiny_config)
    tiny_config["metrics"] = {"exclude": ["background"]}
    resolved = validate_config(tiny_config)
    assert resolved["metrics"] == {"exclude": ["background"], "classes": None}
    assert validate_config(json.loads(json.dumps(resolved))) == resolved
    tiny_config["metrics"] = {"classes": ["disk", 2]}
    assert validate_config(tiny_config)["metrics"] == {"exclude": [], "classes": ["disk", 2]}


@pytest.mark.parametrize("metrics, message", [
    ({"exclude": ["backgrund"]}, re.escape("metrics.exclude: 'backgrund' is not a class of SyntheticShapes. Did "
                                           "you mean 'background'? Classes: background, disk, square, triangle, ring")),
    ({"classes": [5]}, r"metrics.classes: 5 is not a class index of SyntheticShapes \(0-4\)"),
    ({"classes": ["disk"], "exclude": ["ring"]}, "metrics: set classes .* or exclude .*, not both"),
    ({"exclude": [0, 1, 2, 3, "ring"]}, "metrics: no class of SyntheticShapes is left to average over"),
    ({"exclude": "background"}, "metrics.exclude: expected a list of a string or an integer, got "),
    ({"exclude": [True]}, "metrics.exclude: expected"),
    ({"exlude": ["background"]}, "metrics.exlude: unknown key. Did you mean 'exclude'?"),
])
def test_metrics_section_names_classes_of_the_data_set(tiny_config, metrics, message):
    tiny_config["metrics"] = metrics
    with pytest.raises(ConfigError, match=message):
        validate_config(tiny_config)
