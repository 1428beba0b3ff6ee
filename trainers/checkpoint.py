"""Resumable training state: atomic writes, the last K kept, ``--resume auto|PATH``, RNG capture, config diffs.

A state file is a plain dict of tensors and Python values, loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from inference.serialization import load_weights_only

log = logging.getLogger(__name__)

STATE_PREFIX = "state-"

# Config keys that may change between a run and its resumption without changing the result. The global batch
# (data.batch_size) is fixed, but how it is cut (processes x optim.grad_accum) may change: a run resumed on half
# the processes may double optim.grad_accum to keep each process's micro-batch, its memory and its BatchNorm
# statistics as they were.
RESUME_IGNORED = (
    "launch.",
    "optim.grad_accum",
    "output_dir",
    "train.log_every",
    "train.record_batches",
    "train.dist_timeout_s",
    "checkpoint.",
    "data.num_workers",
    "data.cache_mb",
    "data.shards_wait_s",  # how long to wait for a prepare that is still writing, not what is read
    "data.eval_batch_size",
    "eval.",
)


def state_path(ckpt_dir: str | Path, global_step: int) -> Path:
    return Path(ckpt_dir) / f"{STATE_PREFIX}{global_step:09d}.pt"


def list_states(ckpt_dir: str | Path) -> list[Path]:
    """State files under ``ckpt_dir``, oldest first (by step in the name)."""
    folder = Path(ckpt_dir)
    return sorted(folder.glob(f"{STATE_PREFIX}*.pt")) if folder.is_dir() else []


TMP_SUFFIX = ".tmp"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def save_atomic(obj: dict, path: str | Path) -> Path:
    """``torch.save`` to a unique temporary file in the same folder, fsync, rename over ``path``, fsync the folder.

    A failed write removes its temporary file (a killed one is removed by ``remove_partial`` at the next
    start); a full disk or quota raises ``OSError(ENOSPC)`` saying so, with the path and the bytes needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a crash only once the folder is synced
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if _no_space(exc):
            raise no_space_error(path, estimate_bytes(obj)) from None
        raise
    return path


def fsync_dir(folder: str | Path) -> None:
    """Flush a folder's entries (renames, unlinks) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the data itself is already synced
        pass
    finally:
        os.close(fd)


def _no_space(exc: BaseException) -> bool:
    """Whether a full disk/quota caused ``exc``: torch reports it as ``unexpected pos`` with the OSError chained."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def estimate_bytes(obj) -> int:
    """Bytes a ``torch.save`` of ``obj`` needs, about: tensor storages (each counted once) plus 1 KiB per leaf."""
    seen, total, stack = set(), 0, [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        else:
            total += 1024
    return total


def no_space_error(path: Path, needed: int) -> OSError:
    free = shutil.disk_usage(path.parent).free if path.parent.exists() else 0
    return OSError(
        errno.ENOSPC,
        f"no space left on device: writing {path} needs about {needed:,} bytes ({needed / 2**20:.1f} MiB); "
        f"{free:,} bytes free there. Free space (or raise the quota) and resume with --resume auto",
    )


def remove_partial(folder: str | Path) -> list[Path]:
    """Delete temporary files that killed writes left in ``folder`` (``.NAME.*.tmp``); return them."""
    folder = Path(folder)
    stale = sorted(folder.glob(f".*{TMP_SUFFIX}")) if folder.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    if stale:
        log.warning("removed %d partial file(s) of an interrupted write in %s: %s", len(stale), folder,
                    ", ".join(p.name for p in stale[:5]))  # fmt: skip
    return stale


def save_best(weights: dict, run_dir: str | Path, metric: float) -> Path:
    """Write the best weights as ``mAPxx.x.pth``, then remove the previous best (a kill in between keeps one)."""
    path = save_atomic(weights, Path(run_dir) / f"mAP{100 * metric:.1f}.pth")
    for old in Path(run_dir).glob("mAP*.pth"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def is_intact(path: Path) -> bool:
    """Cheap check that a state file is complete: its zip directory, at the very end of the file, reads."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") or name == "data.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def newest_intact(states: list[Path], where: str) -> Path | None:
    """The newest of ``states`` that is intact; skipped (truncated) ones are reported."""
    for path in reversed(states):
        if is_intact(path):
            return path
        log.warning("%s: %s is truncated or unreadable; falling back to the previous state", where, path)
    return None


def save_state(state: dict, ckpt_dir: str | Path, global_step: int, keep_last: int) -> Path:
    """Write the state for ``global_step`` and delete all but the newest ``keep_last`` states."""
    path = save_atomic(state, state_path(ckpt_dir, global_step))
    # Only states up to this step count: a newer one is left from before a resume (e.g. the truncated state
    # `--resume auto` fell back from), and pruning by name would otherwise delete the state just written.
    for old in [p for p in list_states(ckpt_dir) if p.name <= path.name][:-keep_last]:
        old.unlink(missing_ok=True)
        shutil.rmtree(old.with_suffix(".zero"), ignore_errors=True)  # DeepSpeed's sharded part, if any
    return path


def resolve_resume(resume: str | None, run_dir: str | Path) -> Path | None:
    """``auto`` -> newest intact state under run_dir/checkpoints (None if there is none); else the given file.

    A truncated newest state (a write cut by a full disk or a kill) is skipped with a warning.
    """
    if not resume:
        return None
    if resume == "auto":
        folder = Path(run_dir) / "checkpoints"
        remove_partial(folder)
        remove_partial(run_dir)
        states = list_states(folder)
        if not states:
            log.info("--resume auto: no state under %s; starting from scratch", folder)
            return None
        path = newest_intact(states, "--resume auto")
        if path is None:
            raise ValueError(f"--resume auto: every state under {folder} is truncated or unreadable")
        if path != states[-1]:
            log.warning("--resume auto: resuming from %s, the newest intact state", path)
        return path
    path = Path(resume)
    if path.is_dir():
        states = list_states(path) or list_states(path / "checkpoints")
        if not states:
            raise FileNotFoundError(f"--resume {resume}: no {STATE_PREFIX}*.pt in that folder or its checkpoints/")
        found = newest_intact(states, f"--resume {resume}")
        if found is None:
            raise ValueError(f"--resume {resume}: every state in that folder is truncated or unreadable")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"--resume {resume}: no such file (use --resume auto or a state-*.pt file)")
    return path


def load_state(path: str | Path) -> dict:
    state = load_weights_only(path, "--resume state file")
    for key in ("model", "optimizer", "global_step", "epoch", "config"):
        if not isinstance(state, dict) or key not in state:
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
