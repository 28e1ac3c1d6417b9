"""The one registry mechanism used for every configurable component.

A config entry ``{"type": "UNet", "args": {...}}`` is resolved by name through a
:class:`Registry` and its ``args`` are checked against the constructor's
signature *before* anything is built, so a typo is reported with its dotted
config path and a did-you-mean instead of surfacing deep inside construction.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from utils.errors import ConfigError


def did_you_mean(name: str, choices: typing.Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or ``""``."""
    by_lower = {choice.lower(): choice for choice in choices}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" Did you mean '{by_lower[close[0]]}'?" if close else ""


class Check:
    """A validator attached to an argument's type: ``Annotated[str, Check(fn)]``.

    ``Registry.validate`` calls ``fn(value, path)`` once the value has the right
    type; ``fn`` raises :class:`ConfigError` naming ``path`` when the value is
    not acceptable. Use it for choices only known at run time (timm's model
    names) or for nested specs (a loss made of other losses), so they are
    checked with the rest of the config, before anything is built.
    """

    def __init__(self, fn: Callable[[Any, str], None]) -> None:
        self.fn = fn


def _strip_annotated(annotation: Any) -> tuple[Any, list[Check]]:
    """``Annotated[T, Check(...)]`` -> ``(T, [checks])``; other annotations unchanged."""
    if typing.get_origin(annotation) is typing.Annotated:
        base, *extras = typing.get_args(annotation)
        return base, [e for e in extras if isinstance(e, Check)]
    return annotation, []


def _is_union(origin: Any) -> bool:
    return origin is typing.Union or getattr(origin, "__name__", "") == "UnionType"


def describe_type(annotation: Any) -> str:
    """A readable name for a type annotation (``a list of an integer``, ``a number or null``)."""
    annotation, _ = _strip_annotated(annotation)
    if annotation is inspect.Parameter.empty or annotation is Any:
        return "any value"
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if _is_union(origin):
        return " or ".join(describe_type(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, Sequence):
        plurals = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}
        inner = plurals.get(args[0], describe_type(args[0])) if args else "values"
        if origin is tuple and args and args[-1] is not Ellipsis and len(set(args)) == 1:
            return f"a list of {len(args)} {inner}"
        return f"a list of {inner}"
    if origin in (dict, Mapping):
        return "an object"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "an object", tuple: "a list"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def type_matches(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits a type annotation.

    Handles the annotations used by registered constructors: ``bool``, ``int``,
    ``float`` (an int is accepted), ``str``, ``None``, unions, ``Literal``,
    ``list``/``tuple``/``Sequence`` of a type, and ``dict``/``Mapping``.
    """
    annotation, _ = _strip_annotated(annotation)
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    if annotation is type(None) or annotation is None:
        return value is None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if _is_union(origin):
        return any(type_matches(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        if not args:
            return True
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return len(value) == len(args) and all(type_matches(v, a) for v, a in zip(value, args))
        return all(type_matches(v, args[0]) for v in value)
    if origin in (dict, Mapping):
        return isinstance(value, dict)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _literal_strings(annotation: Any) -> list[str]:
    """The string choices of a ``Literal`` annotation (also inside a union)."""
    if typing.get_origin(annotation) is typing.Literal:
        return [a for a in typing.get_args(annotation) if isinstance(a, str)]
    return [s for arg in typing.get_args(annotation) for s in _literal_strings(arg)]


def normalize_spec(spec: Any, path: str) -> dict:
    """Turn ``"Name"`` or ``{"type": "Name", "args": {...}}`` into the dict form."""
    if isinstance(spec, str):
        return {"type": spec, "args": {}}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: expected a type name or an object with 'type' and 'args', "
                          f"got {type(spec).__name__}")
    if "type" not in spec:
        raise ConfigError(f"{path}: missing key 'type'")
    if not isinstance(spec["type"], str):
        raise ConfigError(f"{path}.type: expected a string, got {type(spec['type']).__name__}")
    unknown = set(spec) - {"type", "args"}
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{path}.{key}: unknown key.{did_you_mean(key, ('type', 'args'))} "
                          "Expected 'type' and 'args'")
    args = spec.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ConfigError(f"{path}.args: expected an object, got {type(args).__name__}")
    return {"type": spec["type"], "args": args}


class Registry:
    """Maps names to constructors (classes or functions) of one kind.

    A registry lives on the ground floor and knows its components only by the
    name of the package that fills it (``locations``, as in mmsegmentation): the
    first lookup imports those packages, whose modules register themselves. So
    ``utils/`` never imports the floors above it, and a component is one new file.

    Example:
        >>> LOSSES = Registry("loss", locations=("models.losses",))
        >>> @LOSSES.register
        ... class CrossEntropyLoss(nn.Module): ...
        >>> loss = LOSSES.build({"type": "CrossEntropyLoss", "args": {}}, "loss", ignore_index=255)
    """

    def __init__(self, kind: str, locations: Sequence[str] = ()) -> None:
        self.kind = kind
        self.locations = tuple(locations)
        self._items: dict[str, Callable] = {}
        self._populated = not self.locations

    def populate(self) -> None:
        """Import the packages named in ``locations`` (once), so that every component is registered."""
        if not self._populated:
            self._populated = True  # set first: the packages' modules call register() while importing
            for package in self.locations:
                importlib.import_module(package)

    def register(self, obj: Callable | None = None, *, name: str | None = None):
        """Register ``obj`` under ``name`` (default: its ``__name__``); usable as a decorator."""
        def add(item: Callable) -> Callable:
            key = name or item.__name__
            if key in self._items and self._items[key] is not item:
                raise ValueError(f"{self.kind} '{key}' is registered twice")
            self._items[key] = item
            return item
        return add(obj) if obj is not None else add

    def names(self) -> list[str]:
        self.populate()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self.populate()
        return name in self._items

    def get(self, name: str, path: str = "type") -> Callable:
        """The constructor registered as ``name``; a ConfigError listing the choices if none."""
        self.populate()
        if name not in self._items:
            raise ConfigError(f"{path}: unknown {self.kind} '{name}'.{did_you_mean(name, self._items)} "
                              f"Available: {', '.join(self.names())}")
        return self._items[name]

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """The keyword parameters of a registered constructor, annotations resolved."""
        target = self.get(name)
        sig = inspect.signature(target.__init__ if isinstance(target, type) else target, eval_str=True)
        return {p.name: p for p in sig.parameters.values()
                if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}

    def validate(self, spec: Any, path: str, injected: typing.Iterable[str] = (),
                 extra: Mapping[str, inspect.Parameter] | None = None) -> dict:
        """Check a spec against the registered constructor without building it.

        Args:
            spec: ``"Name"`` or ``{"type": ..., "args": {...}}``.
            path: dotted config path used in error messages (``"arch"``).
            injected: parameter names the framework supplies; the config may not set them.
            extra: further accepted arguments that the caller consumes itself
                (for example a data loader's ``batch_size``); not filled in.

        Returns:
            The normalized spec with the constructor's defaults filled into ``args``.
        """
        spec = normalize_spec(spec, path)
        self.get(spec["type"], f"{path}.type")
        params = self.parameters(spec["type"])
        injected = set(injected)
        allowed = {k: p for k, p in params.items() if k not in injected}
        allowed.update(extra or {})
        args = dict(spec["args"])
        for key, value in args.items():
            if key in injected:
                raise ConfigError(f"{path}.args.{key}: is set by the framework; remove it from the config")
            if key not in allowed:
                raise ConfigError(f"{path}.args.{key}: unknown argument for {self.kind} '{spec['type']}'."
                                  f"{did_you_mean(key, allowed)} Accepted: {', '.join(sorted(allowed))}")
            annotation = allowed[key].annotation
            if not type_matches(value, annotation):
                message = f"{path}.args.{key}: expected {describe_type(annotation)}, got {value!r}"
                hint = did_you_mean(value, _literal_strings(annotation)) if isinstance(value, str) else ""
                raise ConfigError(message + ("." + hint if hint else ""))
            for check in _strip_annotated(annotation)[1]:
                check.fn(value, f"{path}.args.{key}")
        for key, param in params.items():
            if key in args or key in injected:
                continue
            if param.default is inspect.Parameter.empty:
                raise ConfigError(f"{path}.args.{key}: missing required argument for "
                                  f"{self.kind} '{spec['type']}'")
            args[key] = list(param.default) if isinstance(param.default, tuple) else param.default
        return {"type": spec["type"], "args": args}

    def build(self, spec: Any, path: str, **available: Any) -> Any:
        """Validate ``spec`` and call the constructor with its args.

        Of the framework's ``available`` values (number of classes, ignore index...)
        the constructor receives those it declares. An error that a bad value
        causes while constructing (``ValueError``, ``TypeError``, ``IndexError``,
        ``KeyError``, arithmetic errors, ``ConfigError``) is re-raised as a
        ConfigError prefixed with the config path and type; errors about files
        (``DataError``, ``CheckpointError``) already name the file and pass through.
        """
        spec = self.validate(spec, path, injected=available.keys())
        declared = self.parameters(spec["type"])
        injected = {k: v for k, v in available.items() if k in declared}
        try:
            return self._items[spec["type"]](**spec["args"], **injected)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{path} ({spec['type']}): {exc}") from exc
        except (TypeError, IndexError, KeyError, ArithmeticError) as exc:
            raise ConfigError(f"{path} ({spec['type']}): {type(exc).__name__}: {exc}") from exc


def import_submodules(package: str) -> None:
    """Import every module below ``package`` (recursively) so that their registrations run.

    A component package calls this from its ``__init__``: adding a model, data
    set, loss, schedule or optimizer is then one new file, with no list to edit.
    """
    root = importlib.import_module(package)
    for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
        importlib.import_module(info.name)


MODELS = Registry("model", locations=("models",))
BACKBONES = Registry("backbone", locations=("models",))
DATASETS = Registry("dataset", locations=("dataloader",))
TRANSFORMS = Registry("transform", locations=("dataloader",))
LOSSES = Registry("loss", locations=("models.losses",))
OPTIMIZERS = Registry("optimizer", locations=("optim",))
SCHEDULERS = Registry("lr scheduler", locations=("optim",))
NORMS = Registry("norm layer", locations=("models",))
#: Every registry, for code that needs all components registered (the config reference).
REGISTRIES = (MODELS, BACKBONES, DATASETS, TRANSFORMS, LOSSES, OPTIMIZERS, SCHEDULERS, NORMS)
