"""Experiment configs: one module per experiment, loaded by name, with dotted typed overrides.

A dataclass config module defines ``config() -> ExperimentConfig``. Detection configs (``det_*``) are
mmengine Python configs consumed unchanged by ``mmengine.Runner.from_cfg``; ``config_kind`` tells them
apart without importing them.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import types
import typing
from pathlib import Path

from configs._schema import (
    AugmentConfig,
    CheckpointConfig,
    DataConfig,
    DistillConfig,
    EvalConfig,
    ExperimentConfig,
    LaunchConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PrepareConfig,
    ScheduleConfig,
    TrainConfig,
)

__all__ = [
    "AugmentConfig",
    "CheckpointConfig",
    "DataConfig",
    "DistillConfig",
    "EvalConfig",
    "ExperimentConfig",
    "LaunchConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PrepareConfig",
    "ScheduleConfig",
    "TrainConfig",
    "apply_overrides",
    "config_kind",
    "config_path",
    "from_dict",
    "list_configs",
    "load_config",
    "parse_overrides",
    "save_config",
    "to_dict",
]

CONFIG_DIR = Path(__file__).resolve().parent


def list_configs() -> list[str]:
    """Names of all experiment configs (dataclass and mmengine) in ``configs/``."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_"))


def config_path(name: str) -> Path:
    """File of config ``name``; a clear error listing the available names when there is none."""
    path = CONFIG_DIR / f"{name}.py"
    if name.startswith("_") or not path.is_file():
        raise ValueError(f"unknown config {name!r}; available configs: {', '.join(list_configs())}")
    return path


def config_kind(name: str) -> str:
    """``"dataclass"`` when the module defines ``config()``, else ``"mmengine"``."""
    tree = ast.parse(config_path(name).read_text())
    has_fn = any(isinstance(n, ast.FunctionDef) and n.name == "config" for n in tree.body)
    return "dataclass" if has_fn else "mmengine"


def load_config(name: str, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Build config ``name`` and apply dotted overrides (``a.b=v`` or ``--a.b v``)."""
    if config_kind(name) != "dataclass":
        raise ValueError(f"config {name!r} is an mmengine config; use trainers/detection.py for it")
    module = importlib.import_module(f"configs.{name}")
    cfg = module.config()
    if not isinstance(cfg, ExperimentConfig):
        raise TypeError(f"configs/{name}.py: config() must return ExperimentConfig, got {type(cfg).__name__}")
    return apply_overrides(cfg, parse_overrides(overrides))


def parse_overrides(args: typing.Sequence[str]) -> list[tuple[str, str]]:
    """``["a.b=1", "--c.d", "2", "--e=3"]`` -> ``[("a.b", "1"), ("c.d", "2"), ("e", "3")]``."""
    pairs: list[tuple[str, str]] = []
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        flag = arg.startswith("--")
        key_value = arg[2:] if flag else arg
        if "=" in key_value:
            key, value = key_value.split("=", 1)
            i += 1
        elif flag and i + 1 < len(args):
            key, value = key_value, args[i + 1]
            i += 2
        else:
            raise ValueError(f"cannot parse override {arg!r}; write key=value or --key value")
        pairs.append((key.strip(), value))
    return pairs


def apply_overrides(cfg, pairs: typing.Iterable[tuple[str, str]]):
    """Set each dotted key to its value converted to the field's type, then re-validate the tree."""
    for key, raw in pairs:
        node = cfg
        parts = key.split(".")
        for depth, part in enumerate(parts):
            fields = {f.name: f for f in dataclasses.fields(node)}
            if part not in fields:
                prefix = ".".join(parts[:depth])
                valid = ", ".join(f"{prefix + '.' if prefix else ''}{n}" for n in fields)
                raise ValueError(f"unknown config key {key!r}; valid keys here: {valid}")
            hint = typing.get_type_hints(type(node))[part]
            if depth < len(parts) - 1:
                node = getattr(node, part)
                if not dataclasses.is_dataclass(node):
                    raise ValueError(f"config key {key!r}: {'.'.join(parts[: depth + 1])} is not a section")
            else:
                if dataclasses.is_dataclass(getattr(node, part)):
                    raise ValueError(f"config key {key!r} is a section; set one of its fields instead")
                try:
                    value = _convert(raw, hint)
                except ValueError as exc:
                    raise ValueError(f"config key {key!r}: {exc}") from None
                object.__setattr__(node, part, value)
    _revalidate(cfg)
    return cfg


def _convert(raw: str, hint):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(raw, inner[0])
    if origin in (tuple, list):
        text = raw.strip()
        if text.startswith(("[", "(")):
            text = text[1:-1]
        items = [s.strip() for s in text.split(",") if s.strip()]
        elem = args[0] if args else str
        values = [_convert(s, elem) for s in items]
        if origin is tuple and args and args[-1] is not Ellipsis and len(values) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values, got {len(values)}")
        return tuple(values) if origin is tuple else values
    if hint is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {raw!r}")
    if hint is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if hint is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"expected a number, got {raw!r}") from None
    if hint is str:
        return raw
    raise ValueError(f"unsupported field type {hint!r}")


def _revalidate(node) -> None:
    for f in dataclasses.fields(node):
        child = getattr(node, f.name)
        if dataclasses.is_dataclass(child):
            _revalidate(child)
    post = getattr(node, "__post_init__", None)
    if post is not None:
        post()


def to_dict(cfg) -> dict:
    """Plain nested dict of a config (tuples become lists)."""
    return dataclasses.asdict(cfg)


def from_dict(data: dict, cls=ExperimentConfig):
    """Inverse of ``to_dict``: rebuild a config tree, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown keys for {cls.__name__}: {sorted(unknown)}; valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(value, hint)
        elif typing.get_origin(hint) is tuple:
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def save_config(cfg, path: str | Path, resolved: dict | None = None) -> Path:
    """Write the resolved config as JSON (atomically) and return its path.

    ``resolved``: values derived at run time (e.g. the scaled learning rate), under the key ``"resolved"``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    data = to_dict(cfg) if resolved is None else {**to_dict(cfg), "resolved": resolved}
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
