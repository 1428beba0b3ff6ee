"""``TRAINERS``: what ``cfg.trainer`` may name, each the function that builds the parts the one training loop
(``trainers/retrieval.py``) trains: ``build(cfg, accelerator, num_classes, steps_per_epoch) -> Parts``.

The config schema validates ``trainer`` against this dict, so a trainer exists as soon as it is registered here.
A builder is registered by its dotted path (``module:function``) and imported when a run needs it: the builders
read configs themselves (a teacher's, for distillation), so importing them from the schema would be a cycle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

TRAINERS: dict[str, str] = {
    "retrieval": "trainers.setup:build_retrieval_parts",
    "distill": "trainers.distillation:build_distill_parts",
}


def trainer_builder(name: str) -> Callable:
    """The parts builder registered under ``name``."""
    if name not in TRAINERS:
        raise ValueError(f"trainer={name!r} is not registered; choose one of {sorted(TRAINERS)}")
    module, _, function = TRAINERS[name].partition(":")
    return getattr(importlib.import_module(module), function)
