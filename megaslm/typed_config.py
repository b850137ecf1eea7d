"""Typed dataclass configs from YAML-shaped data (the machinery of megaslm/config.py): each value checked and
converted against its annotated type, unknown keys refused, `section.key=value` overrides applied; every error
is a UserError naming the key path and the file."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import yaml

from megaslm.errors import UserError


class Source(str):
    """The config file's name (what errors name), knowing which keys `--set` overrides gave instead."""

    def __new__(cls, name: str, overrides: dict[str, str] | None = None):
        obj = super().__new__(cls, name)
        obj.overrides = dict(overrides or {})
        return obj


def where(src: str, key: str) -> str:
    """What to name as the source of `key`'s value: its `--set` override (or one of a section above it), else
    the file."""
    overrides = getattr(src, "overrides", {})
    parts = key.replace("[", ".[").split(".")
    for n in range(len(parts), 0, -1):
        item = overrides.get(".".join(parts[:n]))
        if item is not None:
            return f"--set {item}"
    below = [item for k, item in overrides.items() if k.startswith(f"{key}.")]  # `--set bogus.key=1`: 'bogus'
    return f"--set {below[0]}" if below and key else str(src)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the second would silently win)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise UserError(f"{self.name}: key '{key}' is given twice (lines {seen[key]} and {line}); the "
                                    f"second would replace the first: merge them")
            except TypeError:  # an unhashable key: the constructor below reports it
                break
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, name: str):
    """YAML text as data, a duplicated key refused naming it and both lines (yaml.YAMLError for bad syntax)."""
    loader = _UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _coerce(value: Any, tp: Any, key: str, src: str) -> Any:
    """Check/convert one value against its annotated type; errors name the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        shaped = [a for a in inner if isinstance(value, (list, dict)) and typing.get_origin(a) is type(value)]
        return _coerce(value, (shaped or inner)[0], key, src)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, src)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{where(src, key)}: {key} must be a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", src) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            value = [value] if isinstance(value, str) else value
        if not isinstance(value, list):
            raise UserError(f"{where(src, key)}: {key} must be a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]", src) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{where(src, key)}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where(src, key)}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{where(src, key)}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise UserError(f"{where(src, key)}: {key} must be a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported config type {tp} for {key}")


def _build(cls: type, data: Any, prefix: str, src: str) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"{where(src, prefix)}: {prefix or 'the config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            path = f"{prefix}.{k}" if prefix else str(k)
            raise UserError(f"{where(src, path)}: unknown config key '{path}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] if data[f.name] is not None else {}, key, src)
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, key, src)
    return cls(**kwargs)


def _apply_override(data: dict, item: str) -> str:
    """Apply one `section.key=value`; returns the key path it set."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {item!r}: '{p}' is not a section")
        node = child
    node[parts[-1]] = value
    return key
