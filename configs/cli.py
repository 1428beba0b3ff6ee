"""How every command line of the project ends: a user error is one line, a traceback only with ``--debug``.

``sys.exit(run_cli(main))`` in an entry point: ``main(argv)`` raises ``ValueError`` / ``FileNotFoundError`` /
``PermissionError`` for what the user can fix (a config key, a file, a data root; also a shards folder another
process writes, and a full disk), and this prints
``error: <message>`` (which names the key or file) on stderr and exits with 2. ``--debug`` anywhere on the
command line, or ``DETRETR_DEBUG=1`` in the environment, re-raises with the full traceback instead.

Under ``accelerate launch`` the launcher process is not ours: after our line it raises its own exception
(``CalledProcessError`` for one process unless ``-q``; torch elastic's ``ChildFailedError`` for several). So the
error also goes into torch elastic's error file, whose summary then shows our line as the root cause instead of
a pointer to its docs, and a second line says that the traceback which follows is the launcher's.
"""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from datasets.shardguard import ShardsBusy

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ShardsBusy)
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
"""a full disk or quota: the message names the path and the bytes needed (``trainers.checkpoint``)"""
DEBUG_FLAG = "--debug"
QUIET_FLAGS = ("-q", "--quiet")


def debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get("DETRETR_DEBUG", "") not in ("", "0")


def launcher_args(pid: int) -> list[str] | None:
    """The options of ``accelerate launch`` (up to the script) when process ``pid`` is that launcher, else None.

    Linux only (``/proc``); elsewhere, or when it cannot be read, None."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    for i, arg in enumerate(argv):
        if arg == "accelerate.commands.launch" or (
            Path(arg).name == "accelerate" and argv[i + 1 : i + 2] == ["launch"]
        ):
            rest = argv[i + (1 if arg.endswith(".launch") else 2) :]
            script = next((j for j, a in enumerate(rest) if a.endswith(".py")), len(rest))
            return rest[:script]
    return None


def launcher_hint(options: list[str] | None, world: int) -> str | None:
    """The line that says what the ``accelerate launch`` parent prints after our error, and how to hide it."""
    if options is None:
        return None
    if world > 1:  # torch elastic's launcher has no quiet mode
        return ("(the traceback and 'ChildFailedError' that Accelerate's launcher prints next are its own report of "
                "this exit; the error above is the cause)")  # fmt: skip
    if any(flag in options for flag in QUIET_FLAGS):
        return None
    return ("(Accelerate prints its own 'CalledProcessError' traceback next, about this exit; "
            "'accelerate launch -q ...' leaves only the line above)")  # fmt: skip


def record_for_elastic(message: str) -> None:
    """Write ``message`` as this worker's error into torch elastic's error file (``TORCHELASTIC_ERROR_FILE``,
    set by its launcher), so that the launcher's failure summary shows it rather than 'To enable traceback see'."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": {"message": message, "extraInfo": {"timestamp": str(int(time.time()))}}}
    try:
        Path(path).write_text(json.dumps(data))
    except OSError:  # the summary then falls back to its own text; our line is already on stderr
        pass


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
        rank = os.environ.get("RANK", "0")
        prefix = f"rank {rank}: " if world > 1 else ""
        print(f"{prefix}error: {exc}\n{prefix}(run with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        record_for_elastic(f"error: {exc}")
        hint = launcher_hint(launcher_args(os.getppid()), world) if rank == "0" else None
        if hint:
            print(hint, file=sys.stderr)
        return 2
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 0
