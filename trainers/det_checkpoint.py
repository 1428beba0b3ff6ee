"""Detector checkpoints that load weights-only: mmengine's resumable state without pickled Python objects.

mmengine 0.10.7 saves its MessageHub (``HistoryBuffer`` objects, numpy arrays and scalars) by pickling them,
so resuming would need ``torch.load(weights_only=False)``, which runs whatever code a file holds. A run
directory may lie on a shared filesystem, so nothing is ever loaded that way here: our checkpoints carry
those values as plain data (tensors, lists, numbers) and a format marker, and are turned back into mmengine's
objects after a weights-only load. A checkpoint without the marker is either plain weights (pretrained
``load_from`` files) or refused with a message that names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer

from inference.serialization import load_weights_only

FORMAT_KEY = "detretr_format"  # in checkpoint["meta"]
FORMAT = 1
_TAG = "__detretr__"
_NUMERIC = "biuf"  # numpy kinds that map to torch tensors


def encode(value: Any) -> Any:
    """``value`` with every HistoryBuffer, numpy array and numpy scalar replaced by weights-only data."""
    if isinstance(value, HistoryBuffer):
        log, count = value.data
        return {_TAG: "HistoryBuffer", "log": encode(log), "count": encode(count), "max_length": value.max_length}
    if isinstance(value, np.ndarray):
        data = torch.from_numpy(value.copy()) if value.dtype.kind in _NUMERIC else value.tolist()
        return {_TAG: "ndarray", "data": data, "dtype": value.dtype.str}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return type(value)((k, encode(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(encode(v) for v in value)
    return value


def decode(value: Any) -> Any:
    """The inverse of :func:`encode`."""
    if isinstance(value, dict):
        tag = value.get(_TAG)
        if tag == "HistoryBuffer":
            return HistoryBuffer(decode(value["log"]), decode(value["count"]), value["max_length"])
        if tag == "ndarray":
            data = value["data"]
            array = data.numpy() if isinstance(data, torch.Tensor) else data
            return np.asarray(array, dtype=np.dtype(value["dtype"]))
        return type(value)((k, decode(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return type(value)(decode(v) for v in value)
    return value


class PlainStateHook(Hook):
    """Saves every checkpoint (periodic, best, preemption) in the weights-only format, with the marker."""

    priority = "LOWEST"  # after the hooks that add to the checkpoint

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        for key in list(checkpoint):
            if key not in ("state_dict", "optimizer"):  # tensors and plain dicts already
                checkpoint[key] = encode(checkpoint[key])
        checkpoint.setdefault("meta", {})[FORMAT_KEY] = FORMAT


def load(filename: str | Path, map_location: Any = None) -> dict:
    """Load a checkpoint weights-only; a file of ours is turned back into mmengine's resumable state.

    A checkpoint's ``meta["config"]`` (Python source that mmengine's resume would execute to compare GPU
    counts) is dropped: a loaded file must never run code.
    """
    path = Path(filename)
    state = load_weights_only(path, "checkpoint", map_location=map_location)
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds a {type(state).__name__}, not a checkpoint dict")
    meta = state.get("meta")
    if isinstance(meta, dict):
        meta.pop("config", None)
        if meta.get(FORMAT_KEY) == FORMAT:
            state = decode(state)
    meta = state.get("meta")
    ours = isinstance(meta, dict) and meta.get(FORMAT_KEY) == FORMAT
    if "message_hub" in state and not ours:
        raise ValueError(f"checkpoint {path} is a resumable state without the {FORMAT_KEY!r} marker; not resuming")
    return state
