"""Streaming loaders over real shards: exactly-once evaluation, P x K / balanced batches, equal rank lengths."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest
import torch

from configs import ExperimentConfig, PrepareConfig
from datasets.prepare import prepare_shards
from datasets.samplers import plan_epoch
from datasets.shards import iter_shard, read_manifest
from datasets.stream import eval_loader, train_loader
from datasets.transforms import decode, eval_transform
from tests.conftest import shared_dataset
from tests.test_datasets_shards import market_records


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = shared_dataset("market1501_mini")
    out = tmp_path_factory.mktemp("stream") / "shards"
    prep = PrepareConfig(shard_size=6, workers=1, gallery_views=1)
    prepare_shards(market_records(root), out, prep, root=str(root), progress=False)
    return out


def make_cfg(shards: Path, **data) -> ExperimentConfig:
    cfg = ExperimentConfig()
    d = cfg.data
    d.shards, d.height, d.width, d.num_workers, d.batch_size, d.num_instances = str(shards), 32, 16, 2, 8, 2
    for key, value in data.items():
        setattr(d, key, value)
    return cfg


@pytest.mark.parametrize("split,shard_size", [("gallery", 6), ("query", 6), ("query", 100)])
def test_eval_every_sample_exactly_once_over_2_ranks_x_2_workers(shards, tmp_path, split, shard_size):
    if shard_size != 6:  # one shard for two ranks: the sample-level split
        root = shared_dataset("market1501_mini")
        prepare_shards(market_records(root), tmp_path, PrepareConfig(shard_size=shard_size), str(root), progress=False)
        shards = tmp_path
    cfg = make_cfg(shards, eval_batch_size=5)
    count = read_manifest(shards)["splits"][split]["count"]
    seen, per_rank = [], []
    for rank in range(2):
        loader = eval_loader(cfg, split, rank, 2)
        idx = [i for b in loader for i in b["index"].tolist()]
        assert len(idx) == loader.count
        per_rank.append(len(idx))
        seen += idx
    assert sorted(seen) == list(range(count)) and min(per_rank) > 0


def test_eval_batches_are_unaugmented_crops_with_their_metadata(shards):
    cfg = make_cfg(shards, num_workers=0, eval_batch_size=4)
    entry = read_manifest(shards)["splits"]["gallery"]
    batch = next(iter(eval_loader(cfg, "gallery", 0, 1)))
    assert batch["image"].shape == (4, 3, 32, 16) and batch["index"].tolist() == [0, 1, 2, 3]
    first = next(iter_shard(shards, entry["shards"][0]))
    assert torch.equal(batch["image"][0], eval_transform(cfg)(decode(first["jpg"])))
    assert batch["identity"][0].item() == int(entry["classes"][0]["identity"]) and batch["camera"][0].item() >= 1


def test_pk_batches_hold_p_identities_x_k_and_ranks_have_equal_length(shards):
    cfg = make_cfg(shards, batch_size=16, num_instances=2)  # 2 ranks: P = 4 per rank, K = 2
    classes = read_manifest(shards)["splits"]["train"]["classes"]
    lengths = []
    for rank in range(2):
        loader = train_loader(cfg, rank, 2, epoch=3)
        batches = list(loader)
        lengths.append(len(loader))
        assert len(batches) == len(loader) > 0
        for b in batches:
            assert b["image"].shape == (8, 3, 32, 16) and b["image"].dtype == torch.float32
            counts = Counter(b["label"].tolist())
            assert len(counts) == 4 and set(counts.values()) == {2}
            assert all(classes[lab]["identity"] == pid for lab, pid in zip(b["label"].tolist(), b["identity"].tolist()))
    assert lengths[0] == lengths[1]


def test_train_stream_is_normalised_augmented_and_epochs_differ(shards):
    cfg = make_cfg(shards, sampler="random", batch_size=8, num_workers=1)
    a = list(train_loader(cfg, 0, 1, epoch=0))
    b = list(train_loader(cfg, 0, 1, epoch=1))
    assert a[0]["image"].shape == (8, 3, 32, 16) and -3 < a[0]["image"].mean() < 3
    assert len(a) == 4 and len(set(torch.cat([x["label"] for x in a]).tolist())) > 8  # 32 samples / 8
    assert [x["label"].tolist() for x in a] != [x["label"].tolist() for x in b]


def test_balanced_batches_respect_the_cap_on_every_rank():
    labels = [0] * 40 + [1] * 12 + [2] * 6 + [3] * 5 + [4] * 2
    shards = [{"first_index": i, "count": min(10, len(labels) - i)} for i in range(0, len(labels), 10)]
    for cap in (0, 4):
        plans = plan_epoch(labels, shards, "balanced", 3, 2, seed=1, epoch=2, balanced_cap=cap)
        expected_cap = cap or 6  # median class count
        taken = Counter(labels[i] for p in plans for batch in p.batches for i in batch)
        assert max(taken.values()) <= expected_cap and plans[0].stats["cap"] == expected_cap
        assert len(plans[0].batches) == len(plans[1].batches) > 0
        assert all(len(batch) == 3 for p in plans for batch in p.batches)


def test_balanced_train_loader_runs(shards):
    cfg = make_cfg(shards, sampler="balanced", balanced_cap=1, batch_size=4)
    batches = list(train_loader(cfg, 0, 1, epoch=0))
    labels = torch.cat([b["label"] for b in batches]).tolist()
    assert len(batches) == 4 and max(Counter(labels).values()) == 1  # 16 classes, one sample each


def test_plans_are_deterministic_and_equal_length_with_uneven_shards():
    labels = [i // 5 for i in range(103)]
    shards = [{"first_index": i, "count": min(17, 103 - i)} for i in range(0, 103, 17)]
    a = plan_epoch(labels, shards, "pk", 8, 3, seed=0, epoch=1, num_instances=4)
    b = plan_epoch(labels, shards, "pk", 8, 3, seed=0, epoch=1, num_instances=4)
    assert [p.batches for p in a] == [p.batches for p in b]
    assert len({len(p.batches) for p in a}) == 1
    assert sorted(s for p in a for s in p.shards) == list(range(len(shards)))  # every shard to exactly one rank
    c = plan_epoch(labels, shards, "pk", 8, 3, seed=0, epoch=2, num_instances=4)
    assert [p.shards for p in a] != [p.shards for p in c] or [p.batches for p in a] != [p.batches for p in c]


def test_classes_with_fewer_than_k_samples_are_filled_and_reported(shards, caplog):
    cfg = make_cfg(shards, batch_size=8, num_instances=4)  # market mini has 2 images per identity
    with caplog.at_level(logging.WARNING, logger="datasets.stream"):
        loader = train_loader(cfg, 0, 1, epoch=0)
    assert loader.stats["padded_identities"] == 16 and "fewer than K=4" in caplog.text
    batch = next(iter(loader))
    assert set(Counter(batch["label"].tolist()).values()) == {4}


def test_fewer_identities_than_p_is_a_clear_error(shards):
    cfg = make_cfg(shards, batch_size=64, num_instances=2)  # P = 32 > 16 identities
    with pytest.raises(ValueError, match="P=32 identities per batch but the pool holds only 16"):
        train_loader(cfg, 0, 1, epoch=0)
    with pytest.raises(ValueError, match="6 shards but there are 8 ranks"):
        train_loader(make_cfg(shards, batch_size=16), 0, 8, epoch=0)


def test_corrupt_shard_fails_the_stream_naming_the_shard(shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    shard = read_manifest(copy)["splits"]["query"]["shards"][2]
    path = copy / shard["file"]
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"shard {path} is corrupt or truncated"):
        list(eval_loader(make_cfg(copy, num_workers=0), "query", 0, 1))
    with pytest.raises(Exception, match=shard["file"]):
        list(eval_loader(make_cfg(copy, num_workers=2), "query", 0, 1))


def test_workers_survive_the_preemption_signal(shards):
    """SLURM sends SIGTERM to every process of a job: workers must leave it to the trainer, not die."""
    import os
    import signal

    import psutil

    cfg = make_cfg(shards, num_workers=2)
    batches = iter(train_loader(cfg, 0, 1, 0))
    first = next(batches)
    workers = psutil.Process(os.getpid()).children()
    assert workers, "the loader should run worker processes"
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)
        os.kill(w.pid, signal.SIGUSR2)
    rest = list(batches)  # a worker killed by the signal would raise here
    assert rest and all(b["image"].shape[0] == 8 for b in [first, *rest])


def _epoch(loader) -> list[tuple[list[int], torch.Tensor]]:
    """A consumer that drops each batch before asking for the next (as a training loop does)."""
    return [(b["label"].tolist(), b["image"].clone()) for b in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(la == lb and torch.equal(ia, ib) for (la, ia), (lb, ib) in zip(a, b))


def test_persistent_workers_give_the_batches_of_fresh_ones(shards):
    """One TrainStream for three epochs (workers started once, samples cached) yields exactly the batches of a
    fresh one-shot loader per epoch, with 0 or 2 workers: a batch depends on (seed, epoch, rank, number) only,
    which is what exact resume with fresh workers needs."""
    import os

    import psutil

    from datasets.stream import TrainStream

    cfg = make_cfg(shards, num_workers=2)
    stream = TrainStream(cfg, 1, 2)
    pids = []
    try:
        for epoch in range(3):
            got = []
            for b in stream.epoch(epoch):
                got.append((b["label"].tolist(), b["image"].clone()))
                pids.append(sorted(p.pid for p in psutil.Process(os.getpid()).children()))
            del b  # a loop variable still holding the last batch would (rightly) make its slot KEPT
            assert _same(got, _epoch(train_loader(cfg, 1, 2, epoch))), f"epoch {epoch}"
            assert _same(got, _epoch(train_loader(make_cfg(shards, num_workers=0), 1, 2, epoch))), f"epoch {epoch}"
        assert (stream.ring.state == 2).sum() == 0  # a dropping consumer never makes the ring keep a slot
    finally:
        stream.close()
    assert len(pids[0]) == 2 and all(p == pids[0] for p in pids)  # the same two workers in every epoch


def test_later_epochs_read_no_shard_when_the_cache_holds_the_split(shards, monkeypatch):
    import datasets.stream as stream_mod

    reads = []
    real = stream_mod.iter_shard

    def counting(shards_dir, shard, verify=True):
        reads.append(shard["file"])
        return real(shards_dir, shard, verify)

    monkeypatch.setattr(stream_mod, "iter_shard", counting)
    for cache_mb, later in ((64, 0), (0, None)):
        stream = stream_mod.TrainStream(make_cfg(shards, num_workers=0, cache_mb=cache_mb), 0, 1)
        per_epoch = []
        for epoch in range(3):
            reads.clear()
            assert sum(len(b["label"]) for b in stream.epoch(epoch)) > 0
            per_epoch.append(len(reads))
        assert per_epoch[0] > 0 and per_epoch[1:] == ([later] * 2 if later is not None else per_epoch[1:])
        if cache_mb == 0:
            assert min(per_epoch[1:]) > 0  # nothing cached: the shards are read (and verified) every epoch


def test_kept_batches_are_never_overwritten_and_early_stops_do_not_hang(shards):
    """list(loader) keeps every batch: the ring must switch those slots to fresh memory, not rewrite them.
    An epoch left after two batches must not block the next one."""
    from datasets.stream import TrainStream

    cfg = make_cfg(shards, num_workers=2, sampler="random", batch_size=2)
    reference = _epoch(train_loader(cfg, 0, 1, 0))
    assert len(reference) >= 4 * 2 * 2  # as many batches as ring slots: the later ones reuse slots
    kept = list(train_loader(cfg, 0, 1, 0))
    assert _same([(b["label"].tolist(), b["image"]) for b in kept], reference)
    stream = TrainStream(cfg, 0, 1)
    try:
        it = iter(stream.epoch(0))
        first = [next(it), next(it)]
        it.close()
        assert _same(_epoch(stream.epoch(1)), _epoch(train_loader(cfg, 0, 1, 1)))
        assert _same([(b["label"].tolist(), b["image"]) for b in first], reference[:2])  # still intact
    finally:
        stream.close()


def test_live_workers_never_block_the_exit_after_a_consumer_error(shards):
    """Workers ignore SIGTERM (SLURM); a persistent stream left open by an error is closed at exit."""
    import subprocess
    import sys
    import textwrap

    from tests.conftest import REPO

    code = textwrap.dedent(
        f"""
        from tests.test_datasets_stream import make_cfg
        from datasets.stream import TrainStream
        stream = TrainStream(make_cfg({str(shards)!r}, num_workers=2), 0, 1)
        for batch in stream.epoch(0):
            raise RuntimeError("consumer failed")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "consumer failed" in proc.stderr, proc.stderr[-2000:]


def test_uneven_shards_are_dealt_to_even_out_the_ranks_pools():
    """Shards of 200, 200 and 36 samples over 2 ranks: 236 / 200, not 400 / 36 (which would cut every rank
    to the small one's batch count and leave out most of the data)."""
    labels = [i % 24 for i in range(436)]
    shards = [{"first_index": 0, "count": 200}, {"first_index": 200, "count": 200}, {"first_index": 400, "count": 36}]
    for epoch in range(4):
        plans = plan_epoch(labels, shards, "pk", 16, 2, seed=0, epoch=epoch, num_instances=4)
        pools = sorted(p.stats["pool"] for p in plans)
        assert pools == [200, 236], pools
        assert len(plans[0].batches) >= 10 and sum(p.stats["dropped_batches"] for p in plans) <= 3
    equal = [{"first_index": 10 * i, "count": 10} for i in range(7)]
    for epoch in range(3):
        owned = [p.shards for p in plan_epoch(list(range(70)), equal, "random", 2, 3, seed=1, epoch=epoch)]
        assert sorted(len(o) for o in owned) == [2, 2, 3] and sorted(sum(owned, [])) == list(range(7))


def test_in_process_stream_leaves_the_callers_generators_alone(shards, monkeypatch):
    """Without workers the augmentation runs in the trainer's process: it must neither move the trainer's CPU
    RNG nor reseed its CUDA generators (torch.manual_seed would, and fork_rng(devices=[]) does not undo that)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    torch.manual_seed(123)
    calls.clear()
    before = torch.get_rng_state()
    assert len(list(train_loader(make_cfg(shards, num_workers=0), 0, 1, epoch=0))) > 0
    assert torch.equal(torch.get_rng_state(), before) and calls == []


def test_a_train_loader_can_be_iterated_twice(shards):
    loader = train_loader(make_cfg(shards, num_workers=2), 0, 1, epoch=0)
    assert _same(_epoch(loader), _epoch(loader))


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_train_shard_fails_the_training_stream_naming_it(shards, tmp_path, workers):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    shard = read_manifest(copy)["splits"]["train"]["shards"][1]
    path = copy / shard["file"]
    path.write_bytes(path.read_bytes()[:1500])
    cfg = make_cfg(copy, num_workers=workers, sampler="random", batch_size=4)
    with pytest.raises(Exception, match=shard["file"]):
        for epoch in range(3):  # every epoch plan reads every train shard of this single rank
            list(train_loader(cfg, 0, 1, epoch))
