"""How every command line of the project ends: a user error is one line, a traceback only with ``--debug``.

``sys.exit(run_cli(main))`` in an entry point: ``main(argv)`` raises ``ValueError`` / ``FileNotFoundError`` /
``PermissionError`` for what the user can fix (a config key, a file, a data root; also a shards folder another
process writes, and a full disk), and this prints
``error: <message>`` (which names the key or file) on stderr and exits with 2. ``--debug`` anywhere on the
command line, or ``DETRETR_DEBUG=1`` in the environment, re-raises with the full traceback instead.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable
from typing import Any

from datasets.shardguard import ShardsBusy

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ShardsBusy)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
"""a full disk or quota: the message names the path and the bytes needed (``trainers.checkpoint``)"""
DEBUG_FLAG = "--debug"


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("DETRETR_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """Call ``main`` with the arguments (``--debug`` removed); the exit code: the one ``main`` returns as an int,
    else 0 when it returns (a detector trained without evaluation returns no metrics); 2 for an error the user
    can fix."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(args)
    try:
        result = main([a for a in args if a != DEBUG_FLAG])
    except (*USER_ERRORS, OSError) as exc:
        if debug or not (isinstance(exc, USER_ERRORS) or exc.errno in NO_SPACE):
            raise
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        rank = f"rank {os.environ.get('RANK', '0')}: " if world > 1 else ""
        print(f"{rank}error: {exc}\n{rank}(run with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        return 2
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 0
