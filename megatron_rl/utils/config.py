"""YAML over typed dataclasses: load, override with `key.path=value`, validate with errors naming the key.

    cfg = load_dataclass(RLConfig, yaml_dict, overrides=["train.steps=20", "loss.mode=cppo"])

Every field is checked against its annotation (int, float, bool, str, Optional, Literal, list, dict,
nested dataclasses); an unknown key names the section and lists the known keys; a wrong value names the
full key path; a float key must be finite (NaN / inf refused, except the keys a caller allows to be
infinite). Dataclasses may validate themselves in __post_init__ (raise ValueError): the message is
prefixed with the section's key path.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    pass


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str, allow_inf: frozenset = frozenset()) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"config key `{key}` must not be null")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, allow_inf)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"config key `{key}` = {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key `{key}` = {value!r} is not allowed; allowed values: "
                              f"{', '.join(repr(a) for a in allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key `{key}` must be a mapping (section), got {value!r}")
        return _build(tp, value, key, allow_inf)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key `{key}` must be a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)   # list[X] / tuple[X, ...]
        items = [_coerce(v, item_tp, f"{key}[{i}]", allow_inf) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key `{key}` must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key `{key}` must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key `{key}` must be an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-6 as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"config key `{key}` must be a number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key `{key}` must be a string, got {value!r}")
    return value


def _check_finite(value: Any, key: str, allow_inf: frozenset) -> None:
    # NaN compares false with everything, so `lr <= 0`-style checks in __post_init__ let it through, and
    # inf passes every lower bound: refused for every float key once its section has run its own checks
    # (their messages, which say the allowed range, come first)
    if isinstance(value, float):
        if math.isnan(value) or (math.isinf(value) and key not in allow_inf):
            raise ConfigError(f"config key `{key}` must be a finite number, got {value}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]", allow_inf)


def _build(cls, data: dict, prefix: str = "", allow_inf: frozenset = frozenset()):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"`{prefix}`" if prefix else "the top level"
        raise ConfigError(f"unknown config key(s) {', '.join('`' + _join(prefix, u) + '`' for u in unknown)}; "
                          f"known keys in {where}: {', '.join(sorted(fields))}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"config key(s) {', '.join('`' + _join(prefix, m) + '`' for m in missing)} "
                          f"required but not given")
    kwargs = {name: _coerce(v, hints[name], _join(prefix, name), allow_inf) for name, v in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        section = f"config section `{prefix}`" if prefix else "config"
        raise ConfigError(f"{section}: {e}") from None
    for name, value in kwargs.items():   # the nested sections were checked by their own _build
        _check_finite(value, _join(prefix, name), allow_inf)
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` strings (value parsed as YAML: 3 -> int, true -> bool, [1,2] -> list)."""
    data = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        node = data
        parts = path.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: `{part}` is not a section")
        node[parts[-1]] = value
    return data


def _deepcopy(d):
    return {k: _deepcopy(v) for k, v in d.items()} if isinstance(d, dict) else d


def load_dataclass(cls, source: dict | str | Path | None, overrides: list[str] | None = None,
                   allow_inf: frozenset | set = frozenset()):
    """Build `cls` from a YAML file path or a dict, after applying `overrides`. Every float key must be
    finite, except the full key paths in `allow_inf` (which may be +-inf; NaN never)."""
    if source is None:
        data = {}
    elif isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return _build(cls, apply_overrides(data, overrides or []), allow_inf=frozenset(allow_inf))


def to_dict(obj) -> Any:
    """The plain-dict form of a config (what gets written next to a run's logs and checkpoints)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
