"""The training loop on a synthetic stream (no shards): skipped steps, how a run ends, run directories, threads."""

from __future__ import annotations

import pytest
import torch

from configs import load_config
from trainers import checkpoint as ckpt
from trainers.retrieval import exit_code, run

BASE = [
    "model.backbone=test_resnet",
    "data.height=32",
    "data.width=32",
    "data.batch_size=16",
    "data.num_instances=4",
    "data.num_workers=0",
    "loss.center_weight=5e-4",
    "optim.grad_accum=2",
    "schedule.epochs=1",
    "schedule.warmup_epochs=0",
    "eval.enabled=false",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=10",
    "train.log_every=1",
]


class Stream:
    """``data.batch_size`` random images of 8 identities per step; ``poison`` = {(step, micro)} gets nan images."""

    steps = 4

    def __init__(self, poison=()):
        self.poison = set(poison)

    def __call__(self, cfg, rank, world):
        self.cfg, self.rank, self.world = cfg, rank, world
        return self

    def num_steps(self, epoch):
        return self.steps

    def epoch(self, epoch, start=0):
        size, accum = self.cfg.data.batch_size, self.cfg.optim.grad_accum
        per = size // (self.world * accum)
        for step in range(start, self.steps):
            g = torch.Generator().manual_seed(1000 * epoch + step)
            images = torch.randn(size, 3, 32, 32, generator=g)
            labels = torch.arange(size // 4).repeat_interleave(4) % 8
            for micro in range(accum):
                part = slice((self.rank * accum + micro) * per, (self.rank * accum + micro + 1) * per)
                batch = {"image": images[part].clone(), "label": labels[part]}
                if (step, micro) in self.poison:
                    batch["image"].fill_(float("nan"))
                yield batch

    def close(self):
        pass


def _state(run_dir, step):
    return ckpt.load_state(ckpt.state_path(run_dir / "checkpoints", step))


def _equal(a: dict, b: dict) -> bool:
    flat_a, flat_b = ckpt.flatten(a), ckpt.flatten(b)
    return flat_a.keys() == flat_b.keys() and all(
        torch.equal(v, flat_b[k]) if torch.is_tensor(v) else v == flat_b[k] for k, v in flat_a.items()
    )


def test_a_skipped_step_leaves_weights_statistics_and_optimizer_untouched(tmp_path, caplog):
    """Step 2's second micro-batch has a nan loss: after step 2 the weights, the BatchNorm statistics, the
    optimizers' state and the center-loss centers are those after step 1; step 3 trains again."""
    result = run(load_config("retr_demo", BASE), str(tmp_path), stream_fn=Stream({(1, 1)}), num_classes=8)
    assert result["ended"] == "finished" and result["global_step"] == 4
    one, two, three = (_state(tmp_path, s) for s in (1, 2, 3))
    assert any("running_mean" in k for k in one["model"])
    for key in ("model", "optimizer", "criterion", "aux_optimizer"):
        assert _equal(one[key], two[key]), key
    for key in ("model", "optimizer", "criterion"):  # (plain SGD, the centers' optimizer, keeps no state)
        assert not _equal(two[key], three[key]), key
    assert two["scheduler"]["last_epoch"] == one["scheduler"]["last_epoch"] + 1  # the lr follows the step count
    assert "non-finite loss: 1 step(s) skipped before global step 2 (at most 1 in a row)" in caplog.text


def test_non_finite_steps_in_a_row_stop_the_run(tmp_path):
    cfg = load_config("retr_demo", [*BASE, "loss.max_nan_steps=2"])
    with pytest.raises(FloatingPointError, match=r"non-finite 2 steps in a row \(loss.max_nan_steps=2\)"):
        run(cfg, str(tmp_path), stream_fn=Stream({(1, 0), (2, 0)}), num_classes=8)


def test_run_returns_how_it_ended_and_main_maps_it_to_the_exit_code(tmp_path):
    cut = run(load_config("retr_demo", BASE), str(tmp_path), stream_fn=Stream(), num_classes=8, max_steps=2)
    assert (cut["ended"], cut["global_step"], exit_code(cut)) == ("max_steps", 2, 0)
    assert exit_code({"ended": "signal", "signal": 12}) == 128 + 12
    assert exit_code({"ended": "finished", "signal": 0}) == 0
    done = run(load_config("retr_demo", BASE), str(tmp_path), resume="auto", stream_fn=Stream(), num_classes=8)
    assert (done["ended"], done["global_step"]) == ("finished", 4)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    import time

    from trainers.setup import new_run_dir

    monkeypatch.setattr(time, "strftime", lambda fmt: "20260101-000000")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    dirs = [new_run_dir(tmp_path / "exp") for _ in range(3)]
    assert [d.name for d in dirs] == ["20260101-000000", "20260101-000000-2", "20260101-000000-3"]
    cfg = load_config("retr_demo", [*BASE, f"output_dir={tmp_path}", "name=twice"])
    first = run(cfg, stream_fn=Stream(), num_classes=8, max_steps=1)["run_dir"]
    second = run(cfg, stream_fn=Stream(), num_classes=8, max_steps=1)["run_dir"]
    assert first != second and sorted(p.name for p in (tmp_path / "twice").iterdir()) == [
        "20260101-000000",
        "20260101-000000-2",
    ]


def test_threads_follow_the_cores_this_process_may_use(monkeypatch):
    import os

    from trainers.setup import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        cores = len(os.sched_getaffinity(0))
        cfg = load_config("retr_demo", ["data.num_workers=1"])
        assert set_threads(cfg).startswith(f"{max(cores - 1, 1)} ({cores} usable cores")
        assert torch.get_num_threads() == max(cores - 1, 1)
        assert set_threads(load_config("retr_demo", ["train.threads=3"])) == "3 (train.threads)"
        assert torch.get_num_threads() == 3
        # set after torch started with 3 threads, as in a SLURM task (the job wrapper sets it after unpickling):
        # it must still win
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(cfg) == "1 (OMP_NUM_THREADS)" and torch.get_num_threads() == 1
        for bad in ("0", "-1", "4,2", "\u00b2", "100000000000"):  # nested-level list, a digit int() refuses
            monkeypatch.setenv("OMP_NUM_THREADS", bad)
            said = set_threads(cfg)
            assert said.startswith(f"{max(cores - 1, 1)} ({cores} usable cores") and f"{bad!r} ignored" in said
    finally:
        torch.set_num_threads(before)


def test_trainer_names_come_from_the_registry():
    from trainers.registry import TRAINERS

    assert "retrieval" in TRAINERS
    with pytest.raises(ValueError, match=r"trainer='no_such' is not valid; choose one of"):
        load_config("retr_demo", ["trainer=no_such"])
    for name in ("distill", "detection"):  # accepted only once a trainer is registered under the name
        if name not in TRAINERS:
            with pytest.raises(ValueError, match=f"trainer='{name}' is not valid"):
                load_config("retr_demo", [f"trainer={name}"])
