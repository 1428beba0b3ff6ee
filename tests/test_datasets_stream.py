"""Streaming loaders over real shards: exactly-once evaluation; the training stream's global plan, its slicing
over ranks, micro-batches and workers, direct starts, reading by index and bounded memory."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from configs import ExperimentConfig, PrepareConfig
from datasets.prepare import prepare_shards
from datasets.samplers import plan_epoch
from datasets.shards import iter_shard, read_manifest
from datasets.stream import TrainStream, eval_loader, train_loader
from datasets.transforms import decode, eval_transform, model_images
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


AUGMENT = ExperimentConfig().data.augment  # make_cfg's mean and std


def _keys(batches) -> list[list[str]]:
    return [b["key"] for b in batches]


def _global(batches_per_rank: list[list[dict]], accum: int = 1) -> list[tuple[list[str], torch.Tensor]]:
    """Global batches put back together from every rank's micro-batches (rank-major, then micro)."""
    out = []
    steps = len(batches_per_rank[0]) // accum
    for step in range(steps):
        parts = [b for rank in batches_per_rank for b in rank[step * accum : (step + 1) * accum]]
        assert {b["step"] for b in parts} == {parts[0]["step"]}
        out.append(([k for b in parts for k in b["key"]], torch.cat([model_images(b, AUGMENT) for b in parts])))
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(ka == kb and torch.equal(ia, ib) for (ka, ia), (kb, ib) in zip(a, b))


def test_pk_global_batches_hold_p_identities_x_k_and_ranks_take_whole_groups(shards):
    cfg = make_cfg(shards, batch_size=16, num_instances=2)  # P = 8 identities x K = 2 per global batch
    classes = read_manifest(shards)["splits"]["train"]["classes"]
    per_rank = [train_loader(cfg, rank, 2, epoch=3) for rank in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == TrainStream(cfg, 0, 2).num_steps(3) > 0
    for keys, images in _global(per_rank):
        assert len(keys) == 16 and images.shape == (16, 3, 32, 16) and images.dtype == torch.float32
    for rank in per_rank:
        for b in rank:
            counts = Counter(b["label"].tolist())
            assert len(counts) == 4 and set(counts.values()) == {2}  # P / 2 whole identities on each rank
            assert all(classes[lab]["identity"] == pid for lab, pid in zip(b["label"].tolist(), b["identity"].tolist()))
            assert b["camera"].min() >= 1 and b["epoch"] == 3 and b["micro"] == 0


@pytest.mark.parametrize("sampler", ["pk", "balanced", "random"])
def test_one_rank_and_two_ranks_see_the_same_global_batches_and_augmentation(shards, sampler):
    """Global batch B on 1 process == B/2 on each of 2 processes: same keys in the same order, same pixels."""
    cfg = make_cfg(shards, sampler=sampler, batch_size=8, num_workers=1)
    one = _global([train_loader(cfg, 0, 1, epoch=2)])
    two = _global([train_loader(cfg, rank, 2, epoch=2) for rank in range(2)])
    assert len(one) > 1 and _same(one, two)


def test_worker_count_and_grad_accum_do_not_change_the_batches(shards):
    reference = _global([train_loader(make_cfg(shards, num_workers=0), 0, 1, epoch=1)])
    assert _same(_global([train_loader(make_cfg(shards, num_workers=2), 0, 1, epoch=1)]), reference)
    accum = make_cfg(shards, num_workers=2)
    accum.optim.grad_accum = 2  # 2 ranks x 2 micro-batches of 2 samples
    micro = [train_loader(accum, rank, 2, epoch=1) for rank in range(2)]
    assert [b["micro"] for b in micro[0][:4]] == [0, 1, 0, 1] and micro[0][0]["pixels"].shape[0] == 2
    assert _same(_global(micro, accum=2), reference)


def test_start_yields_the_rest_of_the_epoch_and_reads_nothing_before_it(shards, monkeypatch):
    import datasets.shard_index as index_mod

    cfg = make_cfg(shards, num_workers=0)
    full = _global([train_loader(cfg, 0, 1, epoch=4)])
    read = []
    real = index_mod.SampleReader.read
    monkeypatch.setattr(index_mod.SampleReader, "read", lambda self, i: read.append(i) or real(self, i))
    rest = train_loader(cfg, 0, 1, epoch=4, start=2)
    assert [b["step"] for b in rest] == list(range(2, len(full))) and _same(_global([rest]), full[2:])
    assert len(read) == 8 * (len(full) - 2)  # only the samples of steps 2.. were read (and decoded)
    with pytest.raises(ValueError, match="cannot start at step 99"):
        TrainStream(cfg, 0, 1).epoch(4, 99)


def test_persistent_workers_serve_every_epoch(shards):
    import os

    import psutil

    cfg = make_cfg(shards, num_workers=2)
    stream = TrainStream(cfg, 1, 2)
    pids = []
    try:
        for epoch in range(3):
            got = []
            for b in stream.epoch(epoch):
                got.append(b)
                pids.append(sorted(p.pid for p in psutil.Process(os.getpid()).children()))
            assert _same(_global([got]), _global([train_loader(make_cfg(shards, num_workers=0), 1, 2, epoch)]))
        it = stream.epoch(3)
        next(it)
        it.close()  # an epoch left early does not disturb the next one
        assert _same(_global([list(stream.epoch(4))]), _global([train_loader(cfg, 1, 2, 4)]))
    finally:
        stream.close()
    assert len(pids[0]) == 2 and all(p == pids[0] for p in pids)  # the same two workers in every epoch


def test_epochs_differ_and_images_are_normalised_and_augmented(shards):
    cfg = make_cfg(shards, sampler="random", batch_size=8, num_workers=1)
    a, b = train_loader(cfg, 0, 1, epoch=0), train_loader(cfg, 0, 1, epoch=1)
    assert a[0]["pixels"].dtype == torch.uint8 and a[0]["erase"].shape == (8, 4)
    assert len(a) == 4 and -3 < model_images(a[0], AUGMENT).mean() < 3 and _keys(a) != _keys(b)
    plain = make_cfg(shards, sampler="random", batch_size=8, num_workers=0)
    aug = plain.data.augment
    aug.flip_p, aug.pad, aug.erasing_p, aug.color_jitter = 0.0, 0, 0.0, 0.0
    unaugmented = train_loader(plain, 0, 1, epoch=0)
    assert _keys(unaugmented) == _keys(a) and not torch.equal(unaugmented[0]["pixels"], a[0]["pixels"])


def test_balanced_batches_respect_the_cap():
    labels = [0] * 40 + [1] * 12 + [2] * 6 + [3] * 5 + [4] * 2
    for cap in (0, 4):
        plan = plan_epoch(labels, "balanced", 3, seed=1, epoch=2, balanced_cap=cap)
        expected_cap = cap or 6  # median class count
        taken = Counter(labels[i] for i in plan.batches.ravel())
        assert max(taken.values()) <= expected_cap and plan.stats["cap"] == expected_cap
        assert plan.batches.shape[1] == 3 and len(set(plan.batches.ravel().tolist())) == plan.batches.size


def test_pk_plan_is_a_pure_function_of_labels_seed_and_epoch():
    labels = [i // 5 for i in range(103)] + [-1] * 4  # unlabelled samples never enter a P x K batch
    a = plan_epoch(labels, "pk", 8, seed=0, epoch=1, num_instances=4)
    assert np.array_equal(a.batches, plan_epoch(labels, "pk", 8, seed=0, epoch=1, num_instances=4).batches)
    assert not np.array_equal(a.batches, plan_epoch(labels, "pk", 8, seed=0, epoch=2, num_instances=4).batches)
    assert not np.array_equal(a.batches, plan_epoch(labels, "pk", 8, seed=1, epoch=1, num_instances=4).batches)
    for batch in a.batches:
        groups = [batch[j : j + 4] for j in range(0, 8, 4)]
        assert all(len({labels[i] for i in g}) == 1 for g in groups) and len({labels[g[0]] for g in groups}) == 2
    assert len(set(a.batches.ravel().tolist())) == a.batches.size  # no sample twice (none needs padding)
    assert len(a.batches) == 10  # 20 identities x 1 group of 4 (the 5th sample waits), 2 groups per batch


def test_large_pk_plan_is_fast():
    """500k samples over 60k identities: planning an epoch must stay well under a second or two."""
    import time

    labels = np.random.default_rng(0).integers(0, 60_000, 500_000)
    start = time.perf_counter()
    plan = plan_epoch(labels, "pk", 64, seed=0, epoch=0, num_instances=4)
    assert time.perf_counter() - start < 10 and plan.batches.shape[1] == 64 and len(plan.batches) > 5000


def test_classes_with_fewer_than_k_samples_are_filled_and_reported(shards, caplog):
    cfg = make_cfg(shards, batch_size=8, num_instances=4)  # market mini has 2 images per identity
    with caplog.at_level(logging.WARNING, logger="datasets.stream"):
        stream = TrainStream(cfg, 0, 1)
    assert stream.plan(0).stats["padded_identities"] == 16 and "fewer than K=4" in caplog.text
    batch = next(stream.epoch(0))
    stream.close()
    assert set(Counter(batch["label"].tolist()).values()) == {4}


def test_batch_sizes_that_cannot_be_met_are_clear_errors(shards):
    with pytest.raises(ValueError, match="P=32 identities per batch but the split holds only 16"):
        TrainStream(make_cfg(shards, batch_size=64, num_instances=2), 0, 1)
    with pytest.raises(ValueError, match=r"data.batch_size=8 .* not divisible by 3 process\(es\) x optim.grad_accum=1"):
        TrainStream(make_cfg(shards), 0, 3)


def test_shards_stay_webdataset_tars_and_the_index_reads_the_same_bytes(shards):
    import webdataset as wds

    from datasets.shard_index import SampleReader, member_table

    entry = read_manifest(shards)["splits"]["train"]
    urls = [str(shards / s["file"]) for s in entry["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"train_{i:08d}" for i in range(entry["count"])]
    reader = SampleReader(shards, entry["shards"], member_table(entry, "train", shards))
    for i in (0, 7, entry["count"] - 1):
        jpg, meta = reader.read(i)
        assert jpg == samples[i]["jpg"] and meta == json.loads(samples[i]["json"]) and meta["index"] == i
    reader.close()


def test_reader_cache_is_bounded(shards):
    from datasets.shard_index import SampleReader, member_table

    entry = read_manifest(shards)["splits"]["train"]
    reader = SampleReader(shards, entry["shards"], member_table(entry, "train", shards), cache_mb=0)
    reader.cache_left = reader.cache_limit = 3 * (max(len(reader.read(i)[0]) for i in range(32)) + 512)
    for _ in range(2):
        for i in range(32):
            reader.read(i)
            held = sum(len(jpg) + 512 for jpg, _ in reader.cache.values())
            assert held <= reader.cache_limit and held + reader.cache_left == reader.cache_limit
            assert list(reader.cache)[-1] == i and len(reader.cache) <= 5  # the most recently read
        assert len(reader.cache) >= 3
    reader.close()


def test_an_old_manifest_without_the_index_is_a_clear_error_and_can_be_indexed(shards, tmp_path):
    import shutil

    from datasets.shard_index import main as index_main
    from datasets.shards import MANIFEST

    copy = tmp_path / "old"
    shutil.copytree(shards, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            del shard["members"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"no sample index .*python -m datasets.prepare.*datasets.shard_index"):
        TrainStream(make_cfg(copy), 0, 1)
    assert index_main([str(copy)]) == sum(len(e["shards"]) for e in manifest["splits"].values())
    assert read_manifest(copy) == read_manifest(shards)


def test_each_shard_is_verified_once_per_process(shards, tmp_path, monkeypatch):
    import shutil

    import datasets.shard_index as index_mod

    copy = tmp_path / "copy"  # a folder no other test of this process has verified
    shutil.copytree(shards, copy)
    hashed = []
    real = index_mod.sha256_file
    monkeypatch.setattr(index_mod, "sha256_file", lambda path: hashed.append(path) or real(path))
    cfg = make_cfg(copy, num_workers=2)
    for _ in range(2):
        stream = TrainStream(cfg, 0, 1)
        for epoch in range(2):
            assert len(list(stream.epoch(epoch))) > 0
        stream.close()
    assert len(hashed) == len(read_manifest(copy)["splits"]["train"]["shards"])


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_train_shard_fails_the_training_stream_naming_it(shards, tmp_path, workers):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    shard = read_manifest(copy)["splits"]["train"]["shards"][1]
    path = copy / shard["file"]
    path.write_bytes(path.read_bytes()[:1500])
    with pytest.raises(ValueError, match=f"shard {path} is corrupt or truncated"):
        TrainStream(make_cfg(copy, num_workers=workers, sampler="random", batch_size=4), 0, 1)


def test_a_sample_changed_after_verification_is_an_error_naming_the_shard(shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    cfg = make_cfg(copy, num_workers=0, sampler="random", batch_size=4)
    stream = TrainStream(cfg, 0, 1)  # verified now
    shard = read_manifest(copy)["splits"]["train"]["shards"][0]
    (copy / shard["file"]).write_bytes(b"\0" * 20000)  # rewritten afterwards (a re-prepare while training)
    with pytest.raises(ValueError, match=f"{shard['file']}: sample .* is not where the manifest says"):
        list(stream.epoch(0))
    stream.close()


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
    stream = TrainStream(cfg, 0, 1)
    batches = stream.epoch(0)
    first = next(batches)
    workers = psutil.Process(os.getpid()).children()
    assert workers, "the loader should run worker processes"
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)
        os.kill(w.pid, signal.SIGUSR2)
    rest = list(batches)  # a worker killed by the signal would raise here
    stream.close()
    assert rest and all(b["pixels"].shape[0] == 8 for b in [first, *rest])


@pytest.mark.parametrize("where", ["consumer", "worker"])
def test_live_workers_never_block_the_exit_after_an_error(shards, where):
    """Workers ignore SIGTERM (SLURM); after an error in the consumer or in a worker (whose traceback keeps the
    DataLoader alive) the interpreter still exits promptly."""
    import subprocess
    import sys
    import textwrap

    from tests.conftest import REPO

    code = textwrap.dedent(
        f"""
        import datasets.stream as stream_mod
        from tests.test_datasets_stream import make_cfg
        if {where!r} == "worker":
            def broken(jpg):
                raise OSError("cannot identify image file")
            stream_mod.decode = broken
        stream = stream_mod.TrainStream(make_cfg({str(shards)!r}, num_workers=2), 0, 1)
        for batch in stream.epoch(0):
            raise RuntimeError("consumer failed")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    expected = "consumer failed" if where == "consumer" else "is not a readable JPEG: cannot identify image file"
    assert proc.returncode == 1 and expected in proc.stderr, proc.stderr[-2000:]


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
