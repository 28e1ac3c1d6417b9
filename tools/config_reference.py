"""The configuration key reference, ``docs/config.md``, generated from the schema and the registries.

    python -m tools.config_reference                          # prints the Markdown
    python -m tools.config_reference --write docs/config.md   # writes the whole file

``tests/test_generated_docs.py`` fails while ``docs/config.md`` differs from this
output, so the reference cannot drift from the code.
"""
from __future__ import annotations

import argparse
import inspect
import json
import re
import sys

from utils.config import (DATASET_INJECTED, EMA_KEYS, INFERENCE_KEYS, LOADER_KEYS, LOSS_INJECTED, METRICS_KEYS,
                          MLFLOW_KEYS, MODEL_INJECTED, WANDB_KEYS,
                          OPTIMIZER_INJECTED,
                          OPTIMIZER_KEYS, SCHEDULER_INJECTED, TOP_LEVEL, TRAINER_KEYS, TRANSFORM_INJECTED,
                          Key, import_components)
from utils.errors import run_command
from utils.registry import (DATASETS, LOSSES, MODELS, NORMS, OPTIMIZERS, SCHEDULERS, TRANSFORMS, Registry,
                            describe_type)
from tools.generated import generated_note, write_generated

PATH = "docs/config.md"
COMMAND = f"python -m tools.config_reference --write {PATH}"


def _default(value) -> str:
    if value is inspect.Parameter.empty:
        return "required"
    return f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | {d} | {m} |" for k, t, d, m in rows]
    return lines


def _plain_rows(schema: dict[str, Key], prefix: str = "") -> list[tuple[str, str, str, str]]:
    return [(prefix + name, describe_type(key.type), _default(key.default), key.help)
            for name, key in schema.items()]


def _arg_docs(target) -> dict[str, str]:
    """``name: text`` entries of the Google-style ``Args:`` docstring sections of ``target``.

    A class inherits its bases' entries; an entry of its own that points to a base which
    documents the argument (``see EncoderModel``) gives way to that base's text.
    """
    classes = [c for c in reversed(inspect.getmro(target)) if c is not object] if isinstance(target, type) \
        else [target]
    docs: dict[str, str] = {}
    documented_by: dict[str, set[str]] = {}
    for item in classes:
        for name, text in _own_arg_docs(item).items():
            if name in docs and any(re.search(rf"\b{base}\b", text) for base in documented_by[name]):
                documented_by[name].add(item.__name__)  # a pointer to a base that documents it
                continue
            docs[name], documented_by[name] = text, {getattr(item, "__name__", "")}
    return docs


def _own_arg_docs(target) -> dict[str, str]:
    """``name: text`` entries of the ``Args:`` section of ``target``'s own docstring."""
    doc = target.__doc__ if isinstance(target, type) else inspect.getdoc(target)
    doc = inspect.cleandoc(doc or "")
    match = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)+)", doc, flags=re.M)
    docs: dict[str, str] = {}
    if not match:
        return docs
    current: list[str] = []
    for line in match.group(1).splitlines():
        entry = re.match(r"^ {4}(\w[\w, ]*):\s*(.*)$", line)
        if entry:
            current = [n.strip() for n in entry.group(1).split(",")]
            for name in current:
                docs[name] = entry.group(2).strip()
        elif line.strip() and current:
            for name in current:
                docs[name] = (docs[name] + " " + line.strip()).strip()
    return docs


def _markdown(text: str) -> str:
    """Docstring reST to Markdown: ``x`` -> `x`, :func:`x` -> `x`."""
    return re.sub(r":\w+:`", "`", text.replace("``", "`"))


def _components(registry: Registry, injected: tuple[str, ...], title: str) -> list[str]:
    lines = [f"## {title}", ""]
    for name in registry.names():
        target = registry.get(name)
        summary = (inspect.getdoc(target) or "").split("\n\n")[0].replace("\n", " ")
        params = {k: p for k, p in registry.parameters(name).items() if k not in injected}
        docs = _arg_docs(target)
        lines.append(f"- **`{name}`**: {_markdown(summary)}")
        for key, param in params.items():
            lines.append(f"  - `{key}` ({describe_type(param.annotation)}, {_default(param.default)})"
                         + (f": {_markdown(docs[key])}" if key in docs else ""))
    return lines + [""]


def reference_markdown() -> str:
    """The whole of ``docs/config.md``."""
    import_components()
    lines = [generated_note(COMMAND), "", "# Configuration key reference", "",
             "Every key of a config, and every registered component with its arguments. How a config is "
             "read and checked: [configuration](configuration.md).", "", "## Top level", ""]
    lines += _table(_plain_rows(TOP_LEVEL) + [
        ("arch", "`{type, args}`", "required", "The model; see *Models* below."),
        ("train_loader", "`{type, args}`", "required", "Training data: a data set type, its args and the "
                                                       "loader args below."),
        ("val_loader", "`{type, args}` or null", "`null`", "Validation data (same data set type)."),
        ("optimizer", "object", '`{"type": "SGD"}`', "See *optimizer* below."),
        ("loss", "name or `{type, args}`", '`"CrossEntropyLoss"`', "See *Losses* below."),
        ("aux_loss", "name or `{type, args}` or null", "`null`", "Loss of the auxiliary head (models with "
                                                                 "`aux_head`); null: the same as `loss`."),
        ("lr_scheduler", "name or `{type, args}`", '`"Poly"`', "See *Schedules* below."),
        ("trainer", "object", "`{}`", "See *trainer* below."),
    ])
    lines += ["", "## trainer", ""] + _table(_plain_rows(TRAINER_KEYS, "trainer.")
                                               + _plain_rows(EMA_KEYS, "trainer.ema.")
                                               + _plain_rows(MLFLOW_KEYS, "trainer.mlflow.")
                                               + _plain_rows(WANDB_KEYS, "trainer.wandb."))
    lines += ["", "## inference (read by inference.py; its flags override it)", ""]
    lines += _table(_plain_rows(INFERENCE_KEYS, "inference."))
    lines += ["", "## metrics (the classes that the means over classes average)", ""]
    lines += _table(_plain_rows(METRICS_KEYS, "metrics."))
    lines += ["", "## optimizer", "", "`type` and `args` select an optimizer (below); besides them:", ""]
    lines += _table(_plain_rows(OPTIMIZER_KEYS, "optimizer."))
    lines += ["", "## Loader args", "", "Accepted in `train_loader.args` and `val_loader.args` besides the "
              "data set's own args:", ""]
    lines += _table(_plain_rows(LOADER_KEYS))
    lines += [""]
    lines += _components(MODELS, MODEL_INJECTED, "Models (`arch.type`)")[:-1]
    lines += ["Every model also accepts `norm` in its args (the same as the top-level `norm`, see below).", ""]
    lines += _components(NORMS, (), "Normalisation layers (`norm`, `arch.args.norm`)")
    lines += _components(DATASETS, DATASET_INJECTED, "Data sets (`train_loader.type`, `val_loader.type`)")
    lines += _components(TRANSFORMS, TRANSFORM_INJECTED, "Transforms (`transforms[i].type`)")
    lines += _components(LOSSES, LOSS_INJECTED, "Losses (`loss.type`)")
    lines += _components(OPTIMIZERS, OPTIMIZER_INJECTED, "Optimizers (`optimizer.type`)")
    lines += _components(SCHEDULERS, SCHEDULER_INJECTED, "Schedules (`lr_scheduler.type`, stepped every iteration)")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.config_reference",
                                     description="Print the configuration key reference, or write it to a file.")
    parser.add_argument("--write", metavar="FILE", help=f"write the whole reference to FILE ({PATH})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    return run_command(run, parse_args(argv))


def run(args: argparse.Namespace) -> int:
    if args.write is None:
        print(reference_markdown(), end="")
        return 0
    write_generated(args.write, "--write", reference_markdown)
    print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
