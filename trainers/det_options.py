"""``--cfg-options`` checked against the detection config: an unknown key or a wrong type is a clear error.

mmengine merges any key into a config, so a typo (``train_cfg.max_epoch=2``) or a wrong type
(``train_cfg.max_epochs=two``) only surfaces later as a deep ``TypeError`` from a constructor, or never.
Here a key must exist in the config, or be an argument of the class its section builds (``type=...``),
or be one of the Runner's top-level settings; a new value must have the type of the value it replaces.
"""

from __future__ import annotations

import inspect
from typing import Any

OUR_KEYS = ("class_agnostic", "data_root", "make_sample", "find_unused_parameters", "num_classes")


def check_cfg_options(cfg: Any, options: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first option whose key is unknown or whose value has the wrong type."""
    for key, value in options.items():
        parent, last = _parent(cfg, key)
        if isinstance(parent, list):
            if not (last.isdigit() and int(last) < len(parent)):
                raise ValueError(f"--cfg-options {key}: {last!r} is not an index of that list (0..{len(parent) - 1})")
            _check_type(key, parent[int(last)], value)
        elif last in parent:
            _check_type(key, parent[last], value)
        elif not _accepts(cfg, parent, last):
            section = key.rsplit(".", 1)[0] if "." in key else "the config"
            has = ", ".join(sorted(map(str, parent)))
            raise ValueError(f"--cfg-options {key}: unknown key {last!r} in {section} (it has: {has})")


def _parent(cfg: Any, key: str) -> tuple[Any, str]:
    """The section holding the last part of the dotted ``key``, and that part."""
    *path, last = key.split(".")
    node: Any = cfg
    for depth, part in enumerate(path):
        here = ".".join(path[: depth + 1])
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif not isinstance(node, list) and hasattr(node, "keys") and part in node:
            node = node[part]
        elif isinstance(node, list):
            raise ValueError(f"--cfg-options {key}: {here} is not in the config (indices 0..{len(node) - 1})")
        else:
            has = ", ".join(sorted(map(str, node.keys())))
            raise ValueError(f"--cfg-options {key}: {here} is not in the config (that section has: {has})")
        if not isinstance(node, list) and not hasattr(node, "keys"):
            raise ValueError(f"--cfg-options {key}: {here} is a value ({node!r}), not a section")
    return node, last


def _accepts(cfg: Any, section: Any, name: str) -> bool:
    """Whether a new key ``name`` is legitimate in ``section``: a constructor argument of its ``type``, or a
    top-level setting of the Runner or of this trainer."""
    if section is cfg:
        from mmengine.runner import Runner

        return name in OUR_KEYS or name in inspect.signature(Runner.__init__).parameters
    cls = _registered_class(section.get("type"))
    if cls is None:
        return False
    params = inspect.signature(cls.__init__).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _registered_class(type_name: Any) -> type | None:
    """The class a ``type=`` names, looked up in mmdetection's registries (mmengine's are their parents)."""
    if not isinstance(type_name, str):
        return type_name if inspect.isclass(type_name) else None
    import mmdet.registry as registries
    from mmengine.registry import init_default_scope

    init_default_scope("mmdet")
    for name in dir(registries):
        registry = getattr(registries, name)
        if name.isupper() and hasattr(registry, "get"):
            found = registry.get(type_name)
            if inspect.isclass(found):
                return found
    return None


def _check_type(key: str, old: Any, new: Any) -> None:
    if old is None or new is None or _same_kind(old, new):
        return
    raise ValueError(f"--cfg-options {key}={new!r}: expected {_kind(old)}, like the config's {old!r}")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "True or False"
    names = {int: "an integer", float: "a number", str: "a string", list: "a list", tuple: "a list"}
    return names.get(type(value), "a dict" if hasattr(value, "keys") else f"a {type(value).__name__}")


def _same_kind(old: Any, new: Any) -> bool:
    if isinstance(old, bool) or isinstance(new, bool):
        return isinstance(old, bool) and isinstance(new, bool)
    if isinstance(old, int) and isinstance(new, int):
        return True
    if isinstance(old, float):
        return isinstance(new, (int, float))
    if isinstance(old, (list, tuple)):
        return isinstance(new, (list, tuple))
    if hasattr(old, "keys"):
        return hasattr(new, "keys")
    return isinstance(new, type(old))
