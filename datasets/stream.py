"""Streaming loaders over the tar shards: identity-aware training batches and exactly-once evaluation.

Design (training). Identity-aware batching needs to know every sample's label before it sees the image, so
the epoch is *planned* from the manifest's per-sample label list (``datasets.samplers.plan_epoch``): the
shards are dealt to ranks (a seeded shuffle that rotates every epoch: the node split), each rank cuts its
shards' samples into P x K / class-balanced / random batches, and all ranks keep the same number of batches,
so DDP never waits on a rank that ran dry. Within a rank, whole batches are dealt to the DataLoader workers
round-robin (batch ``b`` to worker ``b % W``); each worker streams the rank's shards once with webdataset's tar
iterators (sha256 and sample counts checked), keeps in memory the JPEG bytes of the samples of *its* batches
(about split size / (ranks x workers)), then decodes and augments each of its batches
(``datasets.transforms.BatchAugment``) straight into one of its shared-memory buffers, reused round-robin
(``_BatchRing``). The DataLoader returns worker outputs round-robin, which is plan order, so the main process
forwards each batch without copying it; a buffer is rewritten only once the consumer has dropped the batch.
Decoding and augmentation, the expensive work, are split exactly by rank and worker.

Evaluation. The split's shards go to ranks (``rank::world_size``) and then to workers; with fewer shards than
ranks every rank reads all shards and keeps the samples with ``index % world_size == rank``. Each sample
comes exactly once, unaugmented, with its ``index`` so consumers can restore the split order.
"""

from __future__ import annotations

import atexit
import bisect
import itertools
import json
import logging
import os
import signal
import time
import weakref
from collections.abc import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from configs import ExperimentConfig
from datasets.samplers import EpochPlan, plan_epoch
from datasets.shards import iter_shard, read_manifest, split_entry
from datasets.transforms import BatchAugment, decode, eval_transform

log = logging.getLogger(__name__)

META_KEYS = ("label", "identity", "camera", "index")
PREFETCH = 2  # batches each worker prepares ahead (the DataLoader's prefetch_factor)
TRAIN_KEYS = ("image", "label", "identity", "camera")


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR2 to the trainer, which saves its state before stopping.

    SLURM signals every process of a job step on preemption; a worker that died of it would crash the
    training loop before the trainer could write its resumable state. Orphaned workers still exit: torch's
    worker watchdog stops them when the main process is gone.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def _expand(urls: dict[str, dict], shards_dir: str) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """webdataset stage: shard urls -> verified samples with decoded json metadata."""

    def stage(src: Iterator[dict]) -> Iterator[dict]:
        for item in src:
            for sample in iter_shard(shards_dir, urls[item["url"]]):
                yield {"jpg": sample["jpg"], "meta": json.loads(sample["json"])}

    return stage


def _metadata(metas: list[dict]) -> dict:
    return {k: torch.tensor([m[k] for m in metas], dtype=torch.long) for k in META_KEYS}


def _collate(images: list[torch.Tensor], metas: list[dict], height: int, width: int) -> dict:
    batch = _metadata(metas)
    batch["image"] = torch.stack(images) if images else torch.zeros(0, 3, height, width)
    return batch


def _shared_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """A float tensor in shared memory, untouched until written (what torch's collate makes in workers)."""
    numel = 1
    for n in shape:
        numel *= n
    storage = torch.empty(0)._typed_storage()._new_shared(numel)
    return torch.empty(0).new(storage).view(shape)


def _use_count(tensor: torch.Tensor) -> int:
    """How many tensors (views included) hold ``tensor``'s memory."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


FREE, FILLED, KEPT = 0, 1, 2


class _BatchRing:
    """Shared-memory batch buffers, ``depth`` per worker, reused round-robin.

    Batch ``b`` is written by worker ``b % W`` into its slot ``(b // W) % depth``. A fresh shared-memory tensor
    per batch (what a DataLoader's collate makes) costs a page fault per 4 KiB page on first touch, which on
    these VMs is more than the augmentation of a 256x128 crop; reusing the buffers removes that. The main
    process frees the slot of batch ``b`` when the consumer asks for batch ``b + 2`` (by then a ``for`` loop's
    variable has moved on), unless the consumer still holds the image or a view of it: then the slot is KEPT
    for good and its batches go to fresh shared memory instead, so a batch never changes under a consumer
    that keeps it. With ``depth = prefetch + 2`` a worker never waits for a slot. Created before the workers
    fork: both sides share the buffers and the states.
    """

    def __init__(self, workers: int, depth: int, shape: tuple[int, ...]) -> None:
        self.workers, self.depth = max(workers, 1), depth
        self.slots = [[_shared_empty(shape) for _ in range(depth)] for _ in range(self.workers)]
        self.base = _use_count(self.slots[0][0])  # the ring's own references
        self.state = torch.zeros(self.workers, depth, dtype=torch.uint8).share_memory_()

    def slot(self, number: int) -> tuple[int, int]:
        return number % self.workers, (number // self.workers) % self.depth

    def acquire(self, number: int, size: int, control: torch.Tensor, generation: int) -> torch.Tensor | None:
        """(worker side) The slot of batch ``number``; a fresh tensor if the consumer kept the slot; None when
        the epoch this worker is writing for has ended (``control[1]`` moved past ``generation``)."""
        w, s = self.slot(number)
        parent = os.getppid()
        while self.state[w, s] == FILLED:
            if int(control[1]) != generation:
                return None
            if os.getppid() != parent:  # the main process died while we waited: stop as torch's watchdog does
                raise SystemExit(0)
            time.sleep(1e-4)
        if self.state[w, s] == KEPT:
            return _shared_empty((size, *self.slots[w][s].shape[1:]))
        self.state[w, s] = FILLED
        return self.slots[w][s][:size]

    def reset(self, worker: int) -> None:
        """(worker side, at the start of an epoch) Batches of an ended epoch no longer need their slots."""
        row = self.state[worker]
        row[row == FILLED] = FREE

    def keep_held(self) -> None:
        """(main side, before an epoch starts) Slots whose image the consumer still holds are KEPT."""
        for w in range(self.workers):
            for s in range(self.depth):
                if self.state[w, s] == FILLED and self._held(w, s):
                    self.state[w, s] = KEPT

    def view(self, number: int, size: int) -> torch.Tensor:
        w, s = self.slot(number)
        return self.slots[w][s][:size]

    def release(self, number: int) -> None:
        """(main side) The consumer moved past batch ``number``: free its slot unless it still holds the image."""
        if number < 0:
            return
        w, s = self.slot(number)
        if self.state[w, s] == FILLED:
            self.state[w, s] = KEPT if self._held(w, s) else FREE

    def _held(self, w: int, s: int) -> bool:
        """Does anyone beyond the ring itself still hold slot ``(w, s)`` (the batch tensor or a view of it)?"""
        return _use_count(self.slots[w][s]) > self.base


def _batch_seed(seed: int, epoch: int, rank: int, number: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, rank, number]).generate_state(1)[0])


def _plan(cfg: ExperimentConfig, entry: dict, rank: int, world_size: int, epoch: int) -> EpochPlan:
    d = cfg.data
    plans = plan_epoch(
        entry["labels"],
        entry["shards"],
        d.sampler,
        d.batch_size // world_size,
        world_size,
        cfg.train.seed,
        epoch,
        d.num_instances,
        d.balanced_cap,
    )
    return plans[rank]


class _TrainBatches(IterableDataset):
    """Per worker and epoch: plan the epoch (the same plan as the main process), fetch the samples of this
    worker's batches (every W-th) from its cache or from their shards, write each batch into the ring.

    The epoch comes from ``control[0]``, set by the main process before it starts the epoch. A batch's
    augmentation is seeded from (seed, epoch, rank, batch number) alone, so it does not depend on the worker's
    history: a run resumed with fresh workers gets the very same batches. Samples read from shards (sha256
    and counts verified on every read) stay cached in the worker up to ``data.cache_mb``; later epochs read
    only the shards that hold samples missing from the cache.
    """

    def __init__(self, cfg: ExperimentConfig, entry: dict, rank: int, world_size: int, ring, control) -> None:
        self.cfg, self.entry, self.rank, self.world_size = cfg, entry, rank, world_size
        self.ring, self.control = ring, control
        self.augment = BatchAugment(cfg)
        self.firsts = [s["first_index"] for s in entry["shards"]]
        self.cache: dict[int, tuple[bytes, dict]] = {}
        self.cache_left = cfg.data.cache_mb * 2**20

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch, generation = int(self.control[0]), int(self.control[1])
        self.ring.reset(worker)
        plan = _plan(self.cfg, self.entry, self.rank, self.world_size, epoch)
        mine = range(worker, len(plan.batches), workers)
        held = self._fetch({i for b in mine for i in plan.batches[b]})
        for number in mine:
            if int(self.control[1]) != generation:  # the consumer ended this epoch: skip its remaining batches
                return
            batch = [held[i] for i in plan.batches[number]]
            images = [decode(jpg) for jpg, _ in batch]
            out = self.ring.acquire(number, len(batch), self.control, generation)
            if out is None:
                return
            with torch.random.fork_rng(devices=[]):  # leaves the caller's RNG alone when there are no workers
                # the CPU generator only (what the augmentation draws from): torch.manual_seed would also
                # reseed the caller's CUDA generators, which fork_rng(devices=[]) does not restore
                torch.default_generator.manual_seed(_batch_seed(self.cfg.train.seed, epoch, self.rank, number))
                self.augment(images, out)
            item = {**_metadata([meta for _, meta in batch]), "batch": number, "size": len(batch)}
            if not _in_ring(self.ring, number, out):
                item["image"] = out
            del out  # (no workers) a reference held here would count as the consumer's
            yield item

    def _fetch(self, needed: set[int]) -> dict[int, tuple[bytes, dict]]:
        held = {i: self.cache[i] for i in needed if i in self.cache}
        shard_ids = sorted({bisect.bisect_right(self.firsts, i) - 1 for i in needed - held.keys()})
        for sid in shard_ids:
            for sample in iter_shard(self.cfg.data.shards, self.entry["shards"][sid]):
                index = int(sample["__key__"].rsplit("_", 1)[1])  # keys are datasets.shards.sample_key
                item = (sample["jpg"], json.loads(sample["json"]))
                if index in needed:
                    held[index] = item
                if index not in self.cache and len(item[0]) + 512 <= self.cache_left:
                    self.cache[index] = item
                    self.cache_left -= len(item[0]) + 512
        return held


def _in_ring(ring: _BatchRing, number: int, out: torch.Tensor) -> bool:
    w, s = ring.slot(number)
    return out.data_ptr() == ring.slots[w][s].data_ptr()


def _stop_workers(batches: Iterator | None) -> None:
    """Stop a DataLoader iterator's workers now: a traceback that holds the iterator would otherwise keep them
    until interpreter exit, where they (ignoring SIGTERM, see above) delay the exit by minutes."""
    stop = getattr(batches, "_shutdown_workers", None)  # torch's multiprocessing iterator; absent without workers
    if stop is not None:
        stop()


_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register  # registered after multiprocessing's own exit hook, so it runs before that one joins the workers
def _close_live_streams() -> None:
    for stream in list(_LIVE):
        stream.close()


class TrainStream:
    """Training batches of one rank for a whole run; the DataLoader workers persist across epochs.

    ``stream.epoch(e)`` is epoch ``e``'s iterable (``len()`` is the same on every rank). Workers start with the
    first epoch and keep the samples they read (``data.cache_mb`` each), so later epochs start without a fork
    and, when the cache holds the split, without reading a shard. ``close()`` stops them (also at exit).
    """

    def __init__(self, cfg: ExperimentConfig, rank: int, world_size: int) -> None:
        d = cfg.data
        if d.batch_size % world_size:
            raise ValueError(f"data.batch_size={d.batch_size} is not divisible by the world size {world_size}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.entry = split_entry(read_manifest(d.shards), d.train_split, d.shards)
        first = _plan(cfg, self.entry, rank, world_size, 0)  # P x K errors surface here, before any worker starts
        self.workers = min(d.num_workers, len(first.batches))  # more workers than batches would idle
        self.control = torch.zeros(2, dtype=torch.int64).share_memory_()  # [epoch, generation]
        self.ring = _BatchRing(self.workers, PREFETCH + 2, (d.batch_size // world_size, 3, d.height, d.width))
        self.dataset = _TrainBatches(cfg, self.entry, rank, world_size, self.ring, self.control)
        self.loader = self._make_loader()
        self._batches: Iterator | None = None
        _LIVE.add(self)

    def _make_loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.workers,
            worker_init_fn=_ignore_stop_signals,
            prefetch_factor=PREFETCH if self.workers else None,
            persistent_workers=self.workers > 0,
        )

    def epoch(self, epoch: int) -> TrainEpoch:
        return TrainEpoch(self, epoch)

    def start(self, epoch: int) -> Iterator[dict]:
        self.ring.keep_held()
        self.control[0] = epoch
        with torch.random.fork_rng(devices=[]):  # starting workers (or not) must not move the caller's RNG
            self._batches = iter(self.loader)  # the first call starts the workers, later ones restart them
        return self._batches

    def end_epoch(self) -> None:
        self.control[1] += 1  # a worker still busy with the ended epoch stops instead of waiting for a slot

    def close(self) -> None:
        """Stop the workers (a later epoch starts new ones)."""
        if self._batches is not None:
            _stop_workers(self._batches)
            self._batches = None
            self.loader = self._make_loader()  # the old one would try to restart the stopped workers


class TrainEpoch:
    """One epoch of a ``TrainStream``: batches in plan order, ``len()`` equal on every rank."""

    def __init__(self, stream: TrainStream, epoch: int, one_shot: bool = False) -> None:
        self.stream, self.epoch, self.one_shot = stream, epoch, one_shot
        self.plan = _plan(stream.cfg, stream.entry, stream.rank, stream.world_size, epoch)
        self.stats = self.plan.stats
        if self.stats.get("padded_identities"):
            log.warning(
                "rank %d epoch %d: %d identities have fewer than K=%d samples in this rank's shards; their groups "
                "are filled by sampling with replacement",
                stream.rank,
                epoch,
                self.stats["padded_identities"],
                stream.cfg.data.num_instances,
            )
        if self.stats.get("dropped_batches"):
            log.info(
                "rank %d epoch %d: %d of this rank's batches left out so every rank has %d (the shards' samples "
                "are dealt to ranks unevenly; smaller data.prepare.shard_size evens them)",
                stream.rank,
                epoch,
                self.stats["dropped_batches"],
                len(self.plan.batches),
            )

    def __len__(self) -> int:
        return len(self.plan.batches)

    def __iter__(self) -> Iterator[dict]:
        """Batches in plan order. A batch's image lives in a reused buffer that is rewritten only after the
        consumer has dropped it (see ``_BatchRing``)."""
        stream, ring, rank = self.stream, self.stream.ring, self.stream.rank
        batches, count = stream.start(self.epoch), 0
        try:
            for batch in batches:  # the DataLoader cycles over the workers: batch b comes from worker b % W, in order
                if batch["batch"] != count:
                    raise RuntimeError(f"train stream lost sync at batch {count} (rank {rank}, epoch {self.epoch})")
                if "image" not in batch:
                    batch["image"] = ring.view(count, batch["size"])
                item = {k: batch[k] for k in TRAIN_KEYS}
                del batch
                count += 1
                yield item
                del item
                ring.release(count - 2)  # the consumer asked for batch count: it is done with count - 2
        except GeneratorExit:  # the consumer stopped early: the workers stay for the next epoch
            raise
        except BaseException:
            stream.close()
            raise
        finally:
            stream.end_epoch()
            if self.one_shot:
                stream.close()
        if count != len(self):
            raise RuntimeError(f"train stream ended after {count} of {len(self)} batches (rank {rank})")


def train_loader(cfg: ExperimentConfig, rank: int, world_size: int, epoch: int) -> TrainEpoch:
    """One epoch of training batches of ``cfg.data.batch_size // world_size`` for ``rank``, with workers of its
    own (stopped at the end). A training run uses one ``TrainStream`` for all epochs instead."""
    return TrainEpoch(TrainStream(cfg, rank, world_size), epoch, one_shot=True)


class EvalLoader:
    """Iterable of evaluation batches of one split for one rank (each sample exactly once over all ranks)."""

    def __init__(self, cfg: ExperimentConfig, split: str, rank: int, world_size: int) -> None:
        d = cfg.data
        self.entry = split_entry(read_manifest(d.shards), split, d.shards)
        shards = self.entry["shards"]
        urls = {s["file"]: s for s in shards}
        by_shard = len(shards) >= world_size
        mine = shards[rank::world_size] if by_shard else shards
        self.count = sum(s["count"] for s in mine) if by_shard else len(range(rank, self.entry["count"], world_size))
        self.workers = min(d.num_workers, len(mine))
        transform, size = eval_transform(cfg), (d.height, d.width)

        def node_split(src: Iterator[dict]) -> Iterator[dict]:  # explicit: ranks need not run torch.distributed
            yield from (itertools.islice(src, rank, None, world_size) if by_shard else src)

        stages = [wds.SimpleShardList(list(urls)), node_split, wds.split_by_worker, _expand(urls, str(d.shards))]
        if not by_shard:
            stages.append(wds.select(lambda s: s["meta"]["index"] % world_size == rank))
        stages += [
            wds.map(lambda s: (transform(decode(s["jpg"])), s["meta"])),
            wds.batched(d.eval_batch_size, collation_fn=lambda b: _collate(*map(list, zip(*b)), *size), partial=True),
        ]
        self.dataset = wds.DataPipeline(*stages)

    def __iter__(self) -> Iterator[dict]:
        batches = iter(
            DataLoader(self.dataset, batch_size=None, num_workers=self.workers, worker_init_fn=_ignore_stop_signals)
        )
        try:
            yield from batches
        finally:
            _stop_workers(batches)


def eval_loader(cfg: ExperimentConfig, split: str, rank: int = 0, world_size: int = 1) -> EvalLoader:
    """Unaugmented batches of ``split`` with their ``index``; every sample once across ranks and workers."""
    return EvalLoader(cfg, split, rank, world_size)
