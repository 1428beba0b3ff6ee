"""A job's outcome as JSON in its job folder: written by rank 0 of the job, read by ``--status`` and the waiter.

The launcher never unpickles submitit's ``*_result.pkl``: a job folder may lie on a shared filesystem where
another user can place files, and unpickling runs code. JSON cannot.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

RESULT = "result.json"


def jsonable(value: Any) -> Any:
    """``value`` as JSON data: dataclasses and mappings become objects, tensors and numpy scalars numbers."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return jsonable(value.item())  # 0-d tensor or numpy scalar
    return repr(value)


def write_result(folder: str | os.PathLike, state: str, **fields: Any) -> Path:
    """Atomically write ``folder/result.json`` = ``{"state": state, "time": ..., **fields}``."""
    path = Path(folder) / RESULT
    record = {"state": state, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **jsonable(fields)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{RESULT}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_result(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The job's result record, or None while there is none (running, or killed before writing one)."""
    path = Path(folder) / RESULT
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        return {"state": "error", "error": f"unreadable result file {path}: {exc}"}
    if not isinstance(record, dict) or record.get("state") not in ("success", "error"):
        return {"state": "error", "error": f"result file {path} is not a job result record"}
    return record


def clear_result(folder: str | os.PathLike) -> None:
    """Remove a result of an earlier attempt of the same job (a requeued job runs again in its folder)."""
    (Path(folder) / RESULT).unlink(missing_ok=True)
