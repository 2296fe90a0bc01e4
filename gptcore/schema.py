"""How configuration files become typed values: a YAML reader that reads numbers as DVC
does, and mappings turned into (nested, frozen) dataclasses, every field type-checked and
unknown keys refused with the closest allowed name. The values themselves, their ranges
and defaults are :mod:`gptcore.config`'s; this module knows no field.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(path: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{path}: invalid value {value!r}")
    # A bare ``list`` / ``dict`` annotation has no origin; treat it like list[Any] / dict[...].
    if origin is tuple:  # tuple[X, ...]: YAML gives a list
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        item_tp = typing.get_args(tp)[0]
        return tuple(_coerce(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value))
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(f"{path}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {_type_name(tp)} at {path}")  # programming error


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and bad types."""
    where = path or cls.__name__
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    types_ = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(names))
    if unknown:
        hints = [m for k in unknown for m in difflib.get_close_matches(k, names, n=1)]
        hint = f" (did you mean {', '.join(map(repr, hints))}?)" if hints else ""
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}{hint}; allowed: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(f"{path + '.' if path else ''}{name}", data[name], types_[name])
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        # Re-prefix errors from __post_init__ with the section they belong to.
        msg = str(exc)
        raise ConfigError(f"{path}.{msg}" if path and not msg.startswith(path + ".") else msg) from None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """``{"model": {"n_layer": 4}}`` -> ``{"model.n_layer": 4}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as YAML 1.2 does, as DVC (ruamel.yaml) does.

    YAML 1.1, PyYAML's dialect, needs a dot for a float, so ``1e-3`` would be the string
    '1e-3' here while DVC's ``params diff`` and ``exp run --set-param`` see 0.001. With
    this loader both read the same file the same way: ``1e-3``, ``3E-4`` and ``1e3`` are
    floats (as in YAML 1.2, ``1e3`` is the float 1000.0, not an integer)."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9][0-9_]*(?:\.[0-9_]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file with :class:`YamlLoader`; any problem is one ConfigError naming the file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:  # a stream, so errors name the file
            return yaml.load(f, Loader=YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); "
                          "save it as UTF-8") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory, not a YAML file") from None
