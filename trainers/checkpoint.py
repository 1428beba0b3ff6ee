"""Resumable training state: atomic writes, the last K kept, ``--resume auto|PATH``, RNG capture, config diffs.

A state file is a plain dict of tensors and Python values, loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

STATE_PREFIX = "state-"

# Config keys that may change between a run and its resumption without changing the result.
RESUME_IGNORED = (
    "launch.",
    "output_dir",
    "train.log_every",
    "checkpoint.",
    "data.num_workers",
    "data.cache_mb",
    "data.shuffle_buffer",  # an unused key that states written before it was removed still hold
    "data.eval_batch_size",
    "eval.",
)


def state_path(ckpt_dir: str | Path, global_step: int) -> Path:
    return Path(ckpt_dir) / f"{STATE_PREFIX}{global_step:09d}.pt"


def list_states(ckpt_dir: str | Path) -> list[Path]:
    """State files under ``ckpt_dir``, oldest first (by step in the name)."""
    folder = Path(ckpt_dir)
    return sorted(folder.glob(f"{STATE_PREFIX}*.pt")) if folder.is_dir() else []


def save_atomic(obj: dict, path: str | Path) -> Path:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def save_state(state: dict, ckpt_dir: str | Path, global_step: int, keep_last: int) -> Path:
    """Write the state for ``global_step`` and delete all but the newest ``keep_last`` states."""
    path = save_atomic(state, state_path(ckpt_dir, global_step))
    for old in list_states(ckpt_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
        shutil.rmtree(old.with_suffix(".zero"), ignore_errors=True)  # DeepSpeed's sharded part, if any
    return path


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """``auto`` -> newest state under run_dir/checkpoints (None if there is none); else the given file."""
    if not resume:
        return None
    if resume == "auto":
        states = list_states(Path(run_dir) / "checkpoints")
        if not states:
            log.info("--resume auto: no state under %s/checkpoints; starting from scratch", run_dir)
            return None
        return states[-1]
    path = Path(resume)
    if path.is_dir():
        states = list_states(path) or list_states(path / "checkpoints")
        if not states:
            raise FileNotFoundError(f"--resume {resume}: no {STATE_PREFIX}*.pt in that folder or its checkpoints/")
        return states[-1]
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such file (use --resume auto or a state-*.pt file)")
    return path


def load_state(path: str | Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "global_step", "epoch", "config"):
        if key not in state:
            raise ValueError(f"{path} is not a resumable state of trainers/retrieval.py (no {key!r})")
    return state


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def config_changes(old: dict, new: dict, ignored: tuple[str, ...] = RESUME_IGNORED) -> list[str]:
    """``key: old -> new`` for every setting that differs, except the ``ignored`` prefixes."""
    a, b = flatten(old), flatten(new)
    keys = sorted(set(a) | set(b))
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys if a.get(k) != b.get(k) and not k.startswith(ignored)]


def rng_state() -> dict:
    """Python, NumPy and torch (CPU and CUDA) generator states, as weights_only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch from one integer (used per epoch so the data stream is reproducible)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
