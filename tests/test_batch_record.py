"""train.record_batches: the global batches are put back together from the processes' records, whatever layouts
the run went through; a step trained twice or recorded in part is named."""

import json

import pytest

from trainers.batch_record import BatchRecord, global_batches


class Plan:
    """Global batch s of every epoch holds keys s0..s7; rank r of ``world`` takes its slice, in ``accum`` parts."""

    def __init__(self, rank: int, world: int, accum: int) -> None:
        self.rank, self.world, self.accum = rank, world, accum

    def num_steps(self, epoch: int) -> int:
        return 4

    def epoch(self, epoch: int, start: int = 0):
        per = 8 // (self.world * self.accum)
        for step in range(start, 4):
            for micro in range(self.accum):
                first = (self.rank * self.accum + micro) * per
                yield {"step": step, "micro": micro, "key": [f"{step}-{i}" for i in range(first, first + per)]}

    def close(self) -> None:
        pass


def _train(run_dir, world: int, accum: int, start: int, stop: int, iters: int = 0) -> None:
    for rank in range(world):
        record = BatchRecord(Plan(rank, world, accum), run_dir / "batches", rank, world, accum, iters)
        for batch in record.epoch(0, start):  # as the loop: it stops after a step, reading nothing further
            if (batch["step"], batch["micro"]) == (stop - 1, accum - 1):
                break
        record.close()


def test_layouts_are_put_back_together_and_repeats_are_named(tmp_path):
    _train(tmp_path, world=2, accum=1, start=0, stop=2)
    _train(tmp_path, world=1, accum=2, start=2, stop=9, iters=3)  # resumed on one process; a 3-step epoch
    assert global_batches(tmp_path) == {(0, s): [f"{s}-{i}" for i in range(8)] for s in range(3)}
    _train(tmp_path, world=2, accum=2, start=2, stop=3)  # step 2 again
    with pytest.raises(ValueError, match="epoch 0 step 2.*more than once"):
        global_batches(tmp_path)
    _train(tmp_path / "same", world=1, accum=1, start=0, stop=2)
    _train(tmp_path / "same", world=1, accum=1, start=1, stop=2)  # step 1 again, in the same layout
    with pytest.raises(ValueError, match="epoch 0 step 1 was trained more than once"):
        global_batches(tmp_path / "same")


def test_a_missing_slice_is_named(tmp_path):
    _train(tmp_path, world=2, accum=1, start=0, stop=1)
    path = tmp_path / "batches" / "rank1-of-2.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match="epoch 0 step 0: recorded in part"):
        global_batches(tmp_path)
    path.write_text(json.dumps({"epoch": 0}) + "\n")
    with pytest.raises(ValueError, match="rank1-of-2.jsonl:1: not a batch record line"):
        global_batches(tmp_path)


def test_a_step_missing_its_last_micro_batch_is_incomplete(tmp_path):
    _train(tmp_path, world=1, accum=2, start=0, stop=2)
    path = tmp_path / "batches" / "rank0-of-1.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # killed after step 1's first micro-batch, never resumed
    with pytest.raises(ValueError, match="epoch 0 step 1: recorded in part"):
        global_batches(tmp_path)
