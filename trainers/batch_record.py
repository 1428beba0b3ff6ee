"""A record of the samples every optimizer step trained on (``train.record_batches=true``), for checking that a
resumed run, also on another number of processes or nodes, trained on the batches of an uninterrupted one.

Each process appends one JSON line per micro-batch to ``RUN/batches/rank<r>-of-<world>.jsonl``:
``{"epoch", "step", "rank", "world", "accum", "micro", "keys"}``. The cost is the keys' text (about 30 bytes per sample
and step) and a line write per micro-batch; it is off by default. ``global_batches(run_dir)`` puts the global
batches back together, whatever the layouts the run went through.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path


class BatchRecord:
    """Wraps a training stream (``num_steps`` / ``epoch`` / ``close``) and records the micro-batches it yields.

    A micro-batch past ``schedule.iters_per_epoch`` (the loop reads one and stops) is not recorded: it trains
    nothing.
    """

    def __init__(self, stream, folder: Path, rank: int, world: int, accum: int, iters_per_epoch: int = 0) -> None:
        self.stream, self.rank, self.world, self.accum, self.iters = stream, rank, world, accum, iters_per_epoch
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / f"rank{rank}-of-{world}.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def num_steps(self, epoch: int) -> int:
        return self.stream.num_steps(epoch)

    def epoch(self, epoch: int, start: int = 0):
        steps = min(self.iters or self.stream.num_steps(epoch), self.stream.num_steps(epoch))
        for batch in self.stream.epoch(epoch, start):
            if batch["step"] < steps:
                line = {"epoch": epoch, "step": batch["step"], "rank": self.rank, "world": self.world,
                        "accum": self.accum, "micro": batch["micro"], "keys": list(batch["key"])}  # fmt: skip
                self.file.write(json.dumps(line) + "\n")
                self.file.flush()  # a stopped or killed process keeps what it trained on
            yield batch

    def close(self) -> None:
        self.file.close()
        self.stream.close()


def global_batches(run_dir: str | Path) -> dict[tuple[int, int], list[str]]:
    """(epoch, step) -> the sample keys of that global batch (rank-major, then micro-batch: the plan's order).

    Raises ValueError naming the step when it was recorded twice (a resume repeated it) or in part (a process's
    record is missing).
    """
    slices: dict[tuple[int, int], dict[tuple[int, int, int], list[str]]] = defaultdict(dict)
    layouts: dict[tuple[int, int], set[tuple[int, int]]] = defaultdict(set)  # (world, accum) each step was cut in
    for path in sorted(Path(run_dir, "batches").glob("rank*-of-*.jsonl")):
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                rec = json.loads(text)
                pos, part = (rec["epoch"], rec["step"]), (rec["world"], rec["rank"], rec["micro"])
                layouts[pos].add((rec["world"], rec["accum"]))
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{path}:{number}: not a batch record line") from None
            if part in slices[pos]:
                raise ValueError(f"epoch {pos[0]} step {pos[1]} was trained more than once ({path})")
            slices[pos][part] = rec["keys"]
    out = {}
    for pos, parts in sorted(slices.items()):
        # the layout comes from the records, not from the parts seen: a step whose last micro-batch was never
        # recorded (killed mid-step, not resumed) is incomplete, not a smaller complete step
        ((world, accum), *others) = layouts[pos]
        expected = {(world, r, m) for r in range(world) for m in range(accum)}
        if others or set(parts) != expected:
            raise ValueError(f"epoch {pos[0]} step {pos[1]}: recorded in part or more than once: {sorted(parts)}")
        out[pos] = [key for part in sorted(parts) for key in parts[part]]
    return out
