"""A user error under ``accelerate launch``: our one line, then what the launcher (not ours) prints about it.

Accelerate's parent process raises its own exception when the trainer exits non-zero: ``CalledProcessError`` for
one process (``-q`` silences it) and torch elastic's ``ChildFailedError`` for several (no quiet mode). The trainer
says so after its line, and its error goes into torch elastic's error file so that the summary names it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from configs.cli import launcher_args, launcher_hint, run_cli

REPO = Path(__file__).resolve().parents[1]
OUR_FRAMES = re.compile(r'File ".*(trainers|configs|datasets|inference)/\w+\.py", line')


def _parent_like(*argv: str) -> subprocess.Popen:
    """A live process whose command line ends with ``argv`` (as the real launcher's does after ``python``)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", *argv])
    cmdline = Path(f"/proc/{proc.pid}/cmdline")
    deadline = time.monotonic() + 30
    while argv[-1] not in cmdline.read_bytes().decode(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.01)  # until the child has exec'd
    return proc


def test_the_launcher_is_recognised_from_its_command_line_and_the_hint_fits_it():
    procs = {
        "plain": _parent_like("/venv/bin/accelerate", "launch", "--num_processes", "1", "trainers/retrieval.py", "-q"),
        "quiet": _parent_like("/venv/bin/accelerate", "launch", "-q", "trainers/retrieval.py", "--config", "x"),
        "module": _parent_like("-m", "accelerate.commands.launch", "--quiet", "t.py"),
        "other": _parent_like("trainers/retrieval.py", "--config", "x"),
    }
    try:
        found = {name: launcher_args(p.pid) for name, p in procs.items()}
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
    # a -q after the script is the script's own argument, not Accelerate's
    assert found == {"plain": ["--num_processes", "1"], "quiet": ["-q"], "module": ["--quiet"], "other": None}
    assert "accelerate launch -q" in launcher_hint(found["plain"], world=1)
    assert launcher_hint(found["quiet"], world=1) is None and launcher_hint(None, world=1) is None
    assert "ChildFailedError" in launcher_hint(found["quiet"], world=2)  # -q does nothing for several processes
    assert launcher_args(2**22 + 7) is None  # no such process


def test_the_error_reaches_torch_elastic_failure_summary(tmp_path, monkeypatch, capsys):
    """torch elastic reads the worker's error file into its summary: it shows our line, not a link to its docs."""
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("DETRETR_DEBUG", raising=False)

    def main(argv):
        raise ValueError("unknown config key 'optim.lrx'")

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err.startswith("rank 1: error: unknown config key")
    failure = ProcessFailure(local_rank=1, pid=os.getpid(), exitcode=2, error_file=str(error_file))
    assert failure.message["message"] == "error: unknown config key 'optim.lrx'"
    assert "py_callstack" not in json.loads(error_file.read_text())["message"]["extraInfo"]


def _accelerate(tmp_path: Path, *options: str, processes: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    env.pop("DETRETR_DEBUG", None)
    launch = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", *options]
    launch += ["--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--main_process_port", "0"]  # fmt: skip
    if processes > 1:
        launch.append("--multi_gpu")
    cmd = [*launch, str(REPO / "trainers" / "retrieval.py"), "--config", "retr_demo", "optim.lrx=1"]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # the real launcher starts torch twice: about 10 s on an idle 2-core machine
def test_one_process_without_quiet_says_whose_traceback_follows(tmp_path):
    proc = _accelerate(tmp_path)
    err = proc.stderr
    assert proc.returncode != 0
    lines = err.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("error: unknown config key 'optim.lrx'"))
    assert "accelerate launch -q" in "\n".join(lines[at + 1 : at + 3]), err
    assert "CalledProcessError" in err and not OUR_FRAMES.search(err), err


@pytest.mark.slow  # two trainer processes under torch elastic: about 15 s on an idle 2-core machine
def test_two_processes_name_our_error_as_the_root_cause(tmp_path):
    proc = _accelerate(tmp_path, "-q", processes=2)
    err = proc.stderr
    assert proc.returncode != 0
    assert err.count("rank 0: error: unknown config key 'optim.lrx'") == 1, err
    root = err.split("Root Cause")[-1]
    assert "traceback : error: unknown config key 'optim.lrx'" in root, err
    assert err.count("ChildFailedError' that Accelerate's launcher prints next") == 1, err
    assert not OUR_FRAMES.search(err), err
