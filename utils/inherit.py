"""Config inheritance: ``"base": [...]`` files merged under a config, and where each value came from.

A config may name other configs it builds on::

    {"base": ["_base_/camvid.json", "_base_/schedule_poly.json"], "arch": {...}}

Paths are relative to the folder of the file that names them (or absolute). The
bases are merged in order, each one resolved first (bases may have bases), then the
file's own keys on top:

* objects are merged key by key, recursively;
* lists, strings, numbers and booleans replace what was there;
* ``{"_replace_": true, ...}`` replaces the whole object instead of merging into it
  (the marker itself is removed);
* a component's two spellings, ``"Name"`` and ``{"type": ..., "args": ...}``, count as one
  type (as for ``--set``): either replaces the other whole; ``null`` replaces anything and
  anything replaces ``null``.

Any other change between an object and a plain value is an error, as are missing files
and cycles; the messages name the chain of files (``a.json -> b.json -> a.json``).
The result has no ``base`` key: a run folder's ``config.json`` is the resolved config,
so resuming never reads the bases again.

:func:`resolve` also returns, for every value, the file that set it (``--explain``).
"""
from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from utils.errors import ConfigError

BASE_KEY = "base"
REPLACE_KEY = "_replace_"

#: Where each value of a merged config came from: dotted path (``a.b[0].c``) -> file name.
Sources = dict[str, str]


def resolve(path: str | Path, read: Callable[[Path], dict]) -> tuple[dict, Sources]:
    """The config at ``path`` with its bases merged under it, and the source of each value.

    ``read`` parses one JSON file (``utils.config.read_json``: its errors name the file).
    """
    return _resolve(Path(path), read, [])


def _resolve(path: Path, read: Callable[[Path], dict], chain: list[Path]) -> tuple[dict, Sources]:
    """Resolve ``path``, reached through ``chain`` (the files that led to it, top first)."""
    name = _display(path)
    names = [_display(p) for p in chain]
    if any(_same_file(path, seen) for seen in chain):
        raise ConfigError(f"{' -> '.join(names + [name])}: the bases form a cycle")
    try:
        own = read(path)
    except ConfigError as exc:
        if not chain:
            raise
        raise ConfigError(f"{' -> '.join(names)} -> {exc}") from None
    where = " -> ".join(names + [name])
    bases = own.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{where}: {BASE_KEY}: expected a path or a list of paths (relative to "
                          f"{_display(path.parent)}), got {json.dumps(bases)}")
    _check_markers(own, "", where)
    config: dict | None = None
    sources: Sources = {}
    for base in bases:
        base_path = Path(base) if Path(base).is_absolute() else Path(os.path.normpath(path.parent / base))
        resolved, resolved_sources = _resolve(base_path, read, chain + [path])
        if config is None:
            config, sources = resolved, resolved_sources
        else:
            config = _overlay(config, resolved, "", resolved_sources, sources, where)
    own_sources = record_all(own, name)
    if config is None:
        return _strip(own), own_sources
    return _overlay(config, own, "", own_sources, sources, where), sources


def _overlay(old: Any, new: Any, path: str, new_sources: Sources, sources: Sources, where: str) -> Any:
    """``new`` merged onto ``old`` at ``path``; ``sources`` (those of ``old``) updated from ``new_sources``."""
    if isinstance(old, dict) and isinstance(new, dict) and not new.get(REPLACE_KEY):
        merged = dict(old)
        for key, value in new.items():
            if key == REPLACE_KEY:
                continue
            child = _join(path, key)
            merged[key] = (_overlay(old[key], value, child, new_sources, sources, where) if key in old
                           else _replace(value, child, new_sources, sources))
        if path in new_sources:
            sources[path] = new_sources[path]
        return merged
    if isinstance(old, dict) != isinstance(new, dict) and not _compatible(old, new):
        _type_change(old, new, path, sources, where)
    return _replace(new, path, new_sources, sources)


def _replace(value: Any, path: str, new_sources: Sources, sources: Sources) -> Any:
    """``value`` taking the place of whatever was at ``path``: the sources under it are ``value``'s."""
    for key in [k for k in sources if _under(k, path)]:
        del sources[key]
    sources.update((k, s) for k, s in new_sources.items() if _under(k, path))
    return _strip(value)


def _compatible(old: Any, new: Any) -> bool:
    """null on either side, a component's name and its ``{type, args}`` form, or an explicit replace."""
    if old is None or new is None:
        return True
    if isinstance(new, dict) and new.get(REPLACE_KEY) is True:
        return True
    spec, name = (old, new) if isinstance(old, dict) else (new, old)
    return isinstance(name, str) and "type" in spec


def _type_change(old: Any, new: Any, path: str, sources: Sources, where: str) -> None:
    here = path or "the top level"
    origin = sources.get(path) or next((s for k, s in sources.items() if _under(k, path)), "a base")
    if isinstance(old, dict):
        raise ConfigError(f"{where}: {here}: {json.dumps(new)} cannot replace the object set in {origin} "
                          f"(only an object, or null, can); to replace the whole object give "
                          f'{{"{REPLACE_KEY}": true, ...}}')
    raise ConfigError(f"{where}: {here}: an object cannot replace {json.dumps(old)} set in {origin}; "
                      f'add "{REPLACE_KEY}": true to the object to replace the value')


def _check_markers(value: Any, path: str, where: str, recurse: bool = True) -> None:
    if isinstance(value, dict):
        if REPLACE_KEY in value and not isinstance(value[REPLACE_KEY], bool):
            raise ConfigError(f"{where}: {_join(path, REPLACE_KEY)}: expected true or false, "
                              f"got {json.dumps(value[REPLACE_KEY])}")
        if recurse:
            for key, child in value.items():
                _check_markers(child, _join(path, key), where)
    elif isinstance(value, list) and recurse:
        for i, child in enumerate(value):
            _check_markers(child, f"{path}[{i}]", where)


def _strip(value: Any) -> Any:
    """A deep copy of ``value`` without ``_replace_`` markers."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k != REPLACE_KEY}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return copy.deepcopy(value)


def _record(value: Any, path: str, name: str, sources: Sources) -> None:
    """Note ``name`` as the source of ``value`` and of everything inside it."""
    if path:
        sources[path] = name
    for child, inner in _children(value, path):
        _record(inner, child, name, sources)


def _children(value: Any, path: str) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [(_join(path, str(k)), v) for k, v in value.items()]
    if isinstance(value, list):
        return [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    return []


def leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """``(dotted path, value)`` of every plain value (empty objects and lists count as values)."""
    children = _children(value, path)
    if not children:
        return [(path, value)] if path else []
    return [leaf for child, inner in children for leaf in leaves(inner, child)]


def record_all(value: Any, name: str) -> Sources:
    """Every value of ``value`` attributed to ``name`` (a config saved in a checkpoint)."""
    sources: Sources = {}
    _record(value, "", name, sources)
    return sources


def override(sources: Sources, assignment: str, name: str) -> None:
    """``KEY=VALUE`` from ``name`` (``--set``) replaced the value at ``KEY`` (an object: all of it)."""
    dotted, _, raw = assignment.partition("=")
    dotted = dotted.strip()
    for key in [k for k in sources if _under(k, dotted)]:
        del sources[key]
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    _record(value, dotted, name, sources)


def source_of(path: str, sources: Sources, default: str = "default") -> str:
    """The file that set ``path`` of the resolved config.

    A component given by name (``"loss": "CrossEntropyLoss"``) is the source of its
    resolved ``loss.type``; values that no file set are defaults.
    """
    if path in sources:
        return sources[path]
    if path.endswith(".type") and path[:-len(".type")] in sources:
        return sources[path[:-len(".type")]]
    return default


def explain(resolved: dict, sources: Sources) -> list[str]:
    """One line per value of ``resolved``: ``path = value  # source``."""
    rows = [(path, json.dumps(value), source_of(path, sources)) for path, value in leaves(resolved)]
    width = max((len(p) + len(v) for p, v, _ in rows), default=0) + 3
    return [f"{f'{p} = {v}':<{width}}  # {s}" for p, v, s in rows]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _under(key: str, path: str) -> bool:
    """Whether ``key`` is ``path`` or inside it."""
    return not path or key == path or key.startswith((path + ".", path + "["))


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _display(path: Path) -> str:
    """``path`` relative to the working folder when it is inside it."""
    text = os.path.normpath(path)
    if os.path.isabs(text):
        rel = os.path.relpath(text)
        return text if rel.startswith("..") else rel
    return text
