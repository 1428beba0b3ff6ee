"""The one way this project reads a torch file: weights-only, with errors that name the file.

``torch.load(weights_only=True)`` rebuilds tensors and plain Python data only, so a crafted file cannot run
code. torch's own message on a refused file advises ``weights_only=False``, which would run that code:
the errors here never pass that advice on.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch

_NOT_A_TORCH_FILE = (RuntimeError, EOFError, KeyError, IndexError, ValueError, OSError, pickle.UnpicklingError)


def load_weights_only(
    path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu", mmap: bool = False
) -> Any:
    """``torch.load(path, weights_only=True)``; a missing, truncated, foreign or code-carrying file is a
    ``FileNotFoundError`` / ``ValueError`` that names ``what`` and the path, without a traceback's worth of text.

    ``mmap``: memory-map the file where its format allows (torch's legacy pre-zip format does not)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} is not a file")
    try:
        if mmap:
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
            except RuntimeError:  # not a zip-format file: load it whole (a damaged one fails below)
                pass
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if re.search(r"GLOBAL [\w.]+", str(exc)):
            raise ValueError(
                f"{what} {path} holds Python objects besides tensors and plain data ({_refused_global(exc)}); "
                "it is not loaded, because loading it could run code from the file"
            ) from None
        raise ValueError(f"{what} {path} is not a torch file, or it is truncated ({_first_line(exc)})") from None
    except _NOT_A_TORCH_FILE as exc:
        raise ValueError(f"{what} {path} is not a torch file, or it is truncated ({_first_line(exc)})") from None


def _refused_global(exc: BaseException) -> str:
    """What the weights-only loader refused (``it needs posix.system``), without torch's advice."""
    return "it needs " + re.search(r"GLOBAL ([\w.]+)", str(exc)).group(1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    first = first.split(". ")[0]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def require_private(folder: str | os.PathLike, what: str) -> None:
    """Refuse ``folder`` (and everything in it, and its parent) when someone else owns it or others can write it.

    For files that a library unpickles fully (DeepSpeed's ZeRO optimizer shards): they are trusted only when
    no other user could have placed or changed them.
    """
    root = os.path.abspath(folder)
    paths = [os.path.dirname(root), root]
    for base, dirs, files in os.walk(root):
        paths += [os.path.join(base, name) for name in dirs + files]
    for path in paths:
        st = os.lstat(path)
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise ValueError(
                f"{what} {root} is not loaded: {path} is owned by uid {st.st_uid} with mode {st.st_mode & 0o777:o}; "
                "its files are unpickled (which can run code), so they must be yours and writable only by you"
            )
