"""Building a Config: dataclass defaults < YAML files < dotted `key=value` overrides.

    cfg = load_config("configs/voc2007/wang_resnet101.yaml", ["data.size=512", "train.epochs=2"])

A YAML file may name other files under `base:` (a path or a list, relative to the file); they are
merged first, in order. Unknown keys and bad values raise `ConfigError` naming the dotted key, the
value and the valid choices. `to_dict` / `flatten` give the plain and dotted forms MLflow logs.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml

from .choices import MEAN_STD
from .schema import Config, ConfigError


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp) -> Any:
    """Convert a YAML value to the annotated type, or raise naming the key."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(key, value, args[0])
    if origin is tuple:
        args = get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}={value!r} must be a list of {len(args)} values")
        return tuple(_coerce(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{key}={value!r} must be an integer")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} must be an integer") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} must be a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}={value!r} must be a number") from None
        if not math.isfinite(number):   # NaN compares false both ways: no range check would catch it
            raise ConfigError(f"{key}={value!r} must be a finite number")
        return number
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads `no`/`yes` as booleans (mixed_precision: no)
            return "yes" if value else "no"
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}={value!r} must be a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - valid)
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r} in {where}; valid keys: {sorted(valid)}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        key = prefix + name
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build(tp, value or {}, key + ".")
        else:
            kwargs[name] = _coerce(key, value, tp)
    return cls(**kwargs)


def _deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: what, and where (line, column)."""
    mark = getattr(e, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    what = " ".join(str(getattr(e, "problem", None) or e).split())
    return f"config file {str(path)!r} is not valid YAML{where}: {what}"


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a config file, merging the files its `base:` names first (relative to the file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.resolve() in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path.resolve()))
        raise ConfigError(f"config file {str(path)!r} is its own base (base: {chain}); remove the cycle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(_yaml_error(path, e)) from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(path)!r} is not a text (UTF-8) YAML file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"config file {str(path)!r}: base: {bases!r} must be a file name or a list of file names")
    merged: dict = {}
    for b in bases:
        merged = _deep_merge(merged, read_yaml(path.parent / b, (*_seen, path.resolve())))
    return _deep_merge(merged, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b=value` strings (values parsed as YAML scalars/lists) to a nested dict."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. data.size=512)")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        data = _deep_merge(data, _nest(key.strip(), value))
    return data


def _nest(dotted: str, value: Any) -> dict:
    parts = dotted.split(".")
    out: Any = value
    for p in reversed(parts):
        out = {p: out}
    return out


def config_from_dict(data: dict) -> Config:
    return build(Config, with_model_input_defaults(data))


def with_model_input_defaults(data: dict) -> dict:
    """A timm backbone's own input size and normalisation (its pretrained_cfg) where the config
    sets neither data.size nor data.normalize: a ViT built for 224 px with 0.5 / 0.5, a CLIP tower
    with CLIP's mean. Set keys are kept; the resolved values are what config.yaml and MLflow record
    (a run's own config.yaml sets both, so reading it back changes nothing). Torchvision
    backbones keep the defaults."""
    backbone = str((data.get("model") or {}).get("backbone", ""))
    given = data.get("data") or {}
    if not backbone.startswith("timm/") or ("size" in given and "normalize" in given):
        return data
    from ..models import timm_input_defaults   # torch and timm: only for a timm backbone

    found = timm_input_defaults(backbone)
    if found is None:
        return data
    filled = dict(given)
    filled.setdefault("size", found["size"])
    if "normalize" not in given:
        preset = next((name for name, (mean, std) in MEAN_STD.items()
                       if all(abs(a - b * 255) < 1e-3 for a, b in zip(mean + std, found["mean"] + found["std"]))), None)
        if preset is None:
            raise ConfigError(f"model.backbone={backbone}: its pretrained_cfg normalises with mean {found['mean']} "
                              f"and std {found['std']}, none of data.normalize's presets {sorted(MEAN_STD)}; set "
                              f"data.normalize to the closest one")
        filled["normalize"] = preset
    return {**data, "data": filled}


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Defaults < YAML file (with its bases) < dotted overrides."""
    data = read_yaml(path) if path else {}
    return config_from_dict(apply_overrides(data, list(overrides)))


def to_dict(cfg) -> dict:
    """Nested plain dict (tuples as lists), safe for YAML and JSON."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in fields(v)}
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    """{'data': {'size': 448}} -> {'data.size': 448} (the names users type as overrides)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def replace(cfg: Config, overrides: list[str]) -> Config:
    """A copy of `cfg` with dotted overrides applied (validated like any other)."""
    return config_from_dict(apply_overrides(to_dict(cfg), overrides))
