"""Streaming loaders over the tar shards: identity-aware training batches and exactly-once evaluation.

Design (training). Identity-aware batching needs to know every sample's label before it sees the image, so
the epoch is *planned* from the manifest's per-sample label list (``datasets.samplers.plan_epoch``): the
shards are dealt to ranks (a seeded shuffle that rotates every epoch: the node split), each rank cuts its
shards' samples into P x K / class-balanced / random batches, and all ranks keep the same number of batches,
so DDP never waits on a rank that ran dry. Within a rank, whole batches are dealt to the DataLoader workers
round-robin (batch ``b`` to worker ``b % W``); each worker streams the rank's shards once with webdataset's tar
iterators (sha256 and sample counts checked), keeps in memory the JPEG bytes of the samples of *its* batches
(about split size / (ranks x workers)), then decodes and augments each of its batches
(``datasets.transforms.BatchAugment``) straight into a shared-memory tensor. The DataLoader returns worker
outputs round-robin, which is plan order, so the main process forwards each batch without copying it.
Decoding and augmentation, the expensive work, are split exactly by rank and worker.

Evaluation. The split's shards go to ranks (``rank::world_size``) and then to workers; with fewer shards than
ranks every rank reads all shards and keeps the samples with ``index % world_size == rank``. Each sample
comes exactly once, unaugmented, with its ``index`` so consumers can restore the split order.
"""

from __future__ import annotations

import itertools
import json
import logging
import signal
from collections.abc import Callable, Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from configs import ExperimentConfig
from datasets.samplers import plan_epoch
from datasets.shards import iter_shard, read_manifest, split_entry
from datasets.transforms import BatchAugment, decode, eval_transform

log = logging.getLogger(__name__)

META_KEYS = ("label", "identity", "camera", "index")
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
    """A float tensor in shared memory inside a DataLoader worker (sending it to the main process copies nothing)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    numel = 1
    for n in shape:
        numel *= n
    storage = torch.empty(0)._typed_storage()._new_shared(numel)  # what torch's default_collate does in workers
    return torch.empty(0).new(storage).view(shape)


class _TrainBatches(IterableDataset):
    """Per worker: stream the rank's shards, keep the samples of its batches (every W-th), yield those batches."""

    def __init__(self, shards_dir: str, shards: list[dict], batches: list[list[int]], cfg: ExperimentConfig):
        self.shards_dir, self.shards, self.batches = shards_dir, shards, batches
        self.augment = BatchAugment(cfg)
        self.size = (cfg.data.height, cfg.data.width)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = range(worker, len(self.batches), workers)
        needed = {i for b in mine for i in self.batches[b]}
        held = {}
        for shard in self.shards:  # every shard verified (sha256, count) in every worker that reads it
            for sample in iter_shard(self.shards_dir, shard):
                index = int(sample["__key__"].rsplit("_", 1)[1])  # keys are datasets.shards.sample_key
                if index in needed:
                    held[index] = (sample["jpg"], json.loads(sample["json"]))
        for number in mine:
            batch = [held[i] for i in self.batches[number]]
            out = self.augment([decode(jpg) for jpg, _ in batch], _shared_empty((len(batch), 3, *self.size)))
            yield {**_metadata([meta for _, meta in batch]), "image": out, "batch": number}


def _stop_workers(batches: Iterator) -> None:
    """Stop a DataLoader iterator's workers now: a traceback that holds the iterator would otherwise keep them
    until interpreter exit, where they (ignoring SIGTERM, see above) delay the exit by minutes."""
    stop = getattr(batches, "_shutdown_workers", None)  # torch's multiprocessing iterator; absent without workers
    if stop is not None:
        stop()


class TrainLoader:
    """Iterable of training batches for one rank and epoch; ``len()`` is the same on every rank."""

    def __init__(self, cfg: ExperimentConfig, rank: int, world_size: int, epoch: int) -> None:
        d = cfg.data
        if d.batch_size % world_size:
            raise ValueError(f"data.batch_size={d.batch_size} is not divisible by the world size {world_size}")
        manifest = read_manifest(d.shards)
        entry = split_entry(manifest, d.train_split, d.shards)
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
        self.plan = plans[rank]
        self.stats = self.plan.stats
        if self.stats.get("padded_identities"):
            log.warning(
                "rank %d epoch %d: %d identities have fewer than K=%d samples in this rank's shards; their groups "
                "are filled by sampling with replacement",
                rank,
                epoch,
                self.stats["padded_identities"],
                d.num_instances,
            )
        shards = [entry["shards"][i] for i in self.plan.shards]
        self.workers = min(d.num_workers, len(self.plan.batches))  # more workers than batches would idle
        self.dataset = _TrainBatches(str(d.shards), shards, self.plan.batches, cfg)
        self.epoch, self.rank = epoch, rank

    def __len__(self) -> int:
        return len(self.plan.batches)

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.workers, worker_init_fn=_ignore_stop_signals
        )
        batches, count = iter(loader), 0
        try:
            for batch in batches:  # the DataLoader cycles over the workers: batch b comes from worker b % W, in order
                if batch["batch"] != count:
                    raise RuntimeError(
                        f"train stream lost sync at batch {count} (rank {self.rank}, epoch {self.epoch})"
                    )
                count += 1
                yield {k: batch[k] for k in TRAIN_KEYS}
        finally:
            _stop_workers(batches)
        if count != len(self):
            raise RuntimeError(f"train stream ended after {count} of {len(self)} batches (rank {self.rank})")


def train_loader(cfg: ExperimentConfig, rank: int, world_size: int, epoch: int) -> TrainLoader:
    """Training batches of ``cfg.data.batch_size // world_size`` for ``rank`` in ``epoch`` (see module doc)."""
    return TrainLoader(cfg, rank, world_size, epoch)


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
