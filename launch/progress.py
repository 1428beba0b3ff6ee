"""What a running job is doing, read from its log: epoch, step, loss and the last evaluation, for the waiting
launcher (a line every few seconds, or one line rewritten in place on a terminal)."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

TAIL_BYTES = 64 * 1024  # the newest lines are enough; a long log is never read whole
# retrieval: "Epoch[3] Iteration[20/54] Loss: 1.234, ..."; mmengine: "Epoch(train) [3][20/54] ... loss: 1.2345"
STEP_LINES = (
    re.compile(r"Epoch\[(\d+)\] Iteration\[(\d+)/(\d+)\] Loss: ([-\d.naif]+)"),
    re.compile(r"Epoch\(train\)\s*\[(\d+)\]\[\s*(\d+)/(\d+)\].*?\bloss: ([-\d.naif]+)"),
)
# retrieval: "Validation Results - Epoch: 2  mAP: 71.2%  rank1: ..."; mmengine: "coco/bbox_mAP: 0.0150"
METRIC_LINES = (
    re.compile(r"Validation Results - Epoch: \d+\s+mAP: ([\d.]+%)"),
    re.compile(r"coco/bbox_mAP: ([\d.]+)"),
)


@dataclass
class JobProgress:
    epoch: int = 0
    step: int = 0
    steps: int = 0
    loss: str = ""
    metric: str = ""

    def line(self) -> str:
        text = f"epoch {self.epoch}, step {self.step}/{self.steps}, loss {self.loss}"
        return f"{text}, last eval {self.metric}" if self.metric else text


def _tail(path: Path) -> str:
    with open(path, "rb") as fh:
        fh.seek(max(0, path.stat().st_size - TAIL_BYTES))
        return fh.read().decode("utf-8", errors="replace")


def _logs(folder: Path) -> list[Path]:
    """The job's logs, newest first: the trainer's train.log, mmengine's <time>/<time>.log, rank 0's stderr."""
    found = [folder / "train.log", *folder.glob("*/*.log"), *folder.glob("*_0_log.err")]
    return sorted((p for p in found if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)


def read_progress(folder: str | Path) -> JobProgress | None:
    """The latest step (and evaluation) in the job's logs, or None before the first step is logged."""
    for path in _logs(Path(folder)):
        text = _tail(path)
        steps = [m for pattern in STEP_LINES for m in pattern.finditer(text)]
        if not steps:
            continue
        last = max(steps, key=lambda m: m.start())
        epoch, step, total, loss = last.groups()
        progress = JobProgress(int(epoch), int(step), int(total), loss)
        metrics = [m for pattern in METRIC_LINES for m in pattern.finditer(text)]
        if metrics:
            best = max(metrics, key=lambda m: m.start())
            progress.metric = f"mAP {best.group(1)}"
        return progress
    return None


class ProgressReporter:
    """Call it while waiting: every ``every_s`` it shows the job's progress when that changed."""

    def __init__(self, folder: str | Path, job_id: str, every_s: float = 10.0, out: TextIO | None = None) -> None:
        self.folder, self.job_id, self.every_s = Path(folder), job_id, every_s
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self.last_line, self.next_at, self.start = "", 0.0, time.monotonic()

    def __call__(self) -> None:
        now = time.monotonic()
        if now < self.next_at:
            return
        self.next_at = now + (1.0 if self.tty else self.every_s)
        progress = read_progress(self.folder)
        if progress is None or progress.line() == self.last_line:
            return
        self.last_line = progress.line()
        text = f"job {self.job_id} [{_clock(now - self.start)}] {self.last_line}"
        # on a terminal one line is rewritten in place; in a log file each update is its own line
        self.out.write(f"\r\033[K{text}" if self.tty else f"{text}\n")
        self.out.flush()

    def close(self) -> None:
        if self.tty and self.last_line:
            self.out.write("\n")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"
