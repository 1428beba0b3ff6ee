"""Streaming loaders over the tar shards: identity-aware training batches and exactly-once evaluation.

Design (training). Identity-aware batching needs to know every sample's label before it sees the image, so
the epoch is *planned* from the manifest's per-sample label list (``datasets.samplers.plan_epoch``): the
shards are dealt to ranks (a seeded shuffle that rotates every epoch: the node split), each rank cuts its
shards' samples into P x K / class-balanced / random batches, and all ranks keep the same number of batches,
so DDP never waits on a rank that ran dry. Within a rank, the rank's shards are split over the DataLoader
workers (``webdataset.split_by_worker``); each worker streams its shards once with webdataset's tar
iterators (sha256 and sample counts checked), keeps their JPEG bytes in memory (about split size / (ranks x
workers)), then, for every planned batch, decodes and augments the samples *it* holds and yields that part.
The DataLoader returns worker outputs round-robin, so the main process joins each batch's W parts and puts
them back in plan order. Decoding and augmentation, the expensive work, are split exactly by rank and worker.

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
from torch.utils.data import DataLoader, IterableDataset

from configs import ExperimentConfig
from datasets.samplers import plan_epoch
from datasets.shards import iter_shard, read_manifest, split_entry
from datasets.transforms import decode, eval_transform, train_transform

log = logging.getLogger(__name__)

META_KEYS = ("label", "identity", "camera", "index")


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


def _collate(images: list[torch.Tensor], metas: list[dict], height: int, width: int) -> dict:
    batch = {k: torch.tensor([m[k] for m in metas], dtype=torch.long) for k in META_KEYS}
    batch["image"] = torch.stack(images) if images else torch.zeros(0, 3, height, width)
    return batch


class _TrainParts(IterableDataset):
    """Per worker: stream its shards into memory, then yield its part of every planned batch."""

    def __init__(self, shards_dir: str, shards: list[dict], batches: list[list[int]], cfg: ExperimentConfig):
        self.shards_dir, self.shards, self.batches = shards_dir, shards, batches
        self.transform = train_transform(cfg)
        self.size = (cfg.data.height, cfg.data.width)

    def __iter__(self) -> Iterator[dict]:
        urls = {s["file"]: s for s in self.shards}
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(list(urls)), wds.split_by_worker, _expand(urls, self.shards_dir)
        )
        held = {s["meta"]["index"]: s for s in pipeline}
        for number, batch in enumerate(self.batches):
            positions = [p for p, i in enumerate(batch) if i in held]
            images = [self.transform(decode(held[batch[p]]["jpg"])) for p in positions]
            part = _collate(images, [held[batch[p]]["meta"] for p in positions], *self.size)
            part["position"], part["batch"] = torch.tensor(positions, dtype=torch.long), number
            yield part


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
        self.workers = min(d.num_workers, len(shards))  # more workers than shards would idle: cap them
        self.dataset = _TrainParts(str(d.shards), shards, self.plan.batches, cfg)
        self.epoch, self.rank = epoch, rank

    def __len__(self) -> int:
        return len(self.plan.batches)

    def __iter__(self) -> Iterator[dict]:
        loader = DataLoader(
            self.dataset, batch_size=None, num_workers=self.workers, worker_init_fn=_ignore_stop_signals
        )
        parts_per_batch = max(1, self.workers)
        parts = iter(loader)
        for number in range(len(self)):
            group = list(itertools.islice(parts, parts_per_batch))
            if len(group) != parts_per_batch or any(p["batch"] != number for p in group):
                raise RuntimeError(f"train stream lost sync at batch {number} (rank {self.rank}, epoch {self.epoch})")
            yield _join(group)


def _join(parts: list[dict]) -> dict:
    """Assemble the workers' parts of one batch in plan order (one copy per part)."""
    keys = ("image", *[k for k in META_KEYS if k != "index"])
    if len(parts) == 1:  # a single worker already yields the batch in plan order
        return {k: parts[0][k] for k in keys}
    size = sum(len(p["position"]) for p in parts)
    out = {k: parts[0][k].new_empty((size, *parts[0][k].shape[1:])) for k in keys}
    for p in parts:
        for k in keys:
            out[k][p["position"]] = p[k]
    return out


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
        yield from DataLoader(
            self.dataset, batch_size=None, num_workers=self.workers, worker_init_fn=_ignore_stop_signals
        )


def eval_loader(cfg: ExperimentConfig, split: str, rank: int = 0, world_size: int = 1) -> EvalLoader:
    """Unaugmented batches of ``split`` with their ``index``; every sample once across ranks and workers."""
    return EvalLoader(cfg, split, rank, world_size)
