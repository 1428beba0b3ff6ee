"""Streaming loaders over the tar shards: the training stream of one rank, and exactly-once evaluation.

Training. Each epoch's plan (``datasets.samplers.plan_epoch``) is a list of global batches of sample indices, a
pure function of (manifest, seed, epoch). Rank ``r`` takes its slice of every global batch, cut into
``optim.grad_accum`` micro-batches (``rank_slice``). A stock ``torch.utils.data.DataLoader`` with persistent
workers runs ``MicroBatches``: the main process hands each worker whole micro-batches (their sample indices);
the worker reads each sample with one ``pread`` at the offset the manifest records
(``datasets.shard_index.SampleReader``), decodes it and augments the micro-batch at once
(``datasets.transforms.BatchAugment``), each image seeded by (seed, epoch, step, position in the global batch),
and hands over uint8 pixels with each image's erasing box: the consumer finishes them on its device
(``datasets.transforms.model_images``), so a quarter of float32's bytes crosses the process boundary (each
micro-batch lands in fresh shared memory, a page fault per 4 KiB on first touch) and the copy to the device.
So a micro-batch depends on nothing but its key: any world size, any worker count and a resume that starts at
(epoch, step) directly all see the same samples and augmentation. Memory stays bounded whatever the size of the
split: the plan, an int64 index table and the micro-batches in flight (the OS page cache does the caching).

Evaluation. The split's shards go to ranks (``rank::world_size``) and then to workers; with fewer shards than
ranks every rank reads all shards and keeps the samples with ``index % world_size == rank``. Each sample
comes exactly once, unaugmented, with its ``index`` so consumers can restore the split order.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import logging
import multiprocessing
import os
import signal
from collections.abc import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from configs import ExperimentConfig
from datasets.samplers import EpochPlan, micro_batch_size, plan_epoch, rank_slice
from datasets.shard_index import SampleReader, member_table, verify_once
from datasets.shards import iter_shard, read_manifest, sample_key, split_entry
from datasets.transforms import BatchAugment, decode, eval_transform

log = logging.getLogger(__name__)

META_KEYS = ("label", "identity", "camera", "index")
PREFETCH = 2  # micro-batches each worker prepares ahead (the DataLoader's prefetch_factor)

_EXITING = multiprocessing.RawValue("b", 0)  # set when this interpreter exits: workers may then stop on SIGTERM


@atexit.register  # registered after multiprocessing's exit hook, so it runs first: before that hook's terminate()
def _exiting() -> None:
    _EXITING.value = 1


def _on_sigterm(exiting, signum, frame) -> None:
    if exiting.value:  # the trainer is exiting and multiprocessing terminates its workers
        os._exit(0)


def _worker_init(exiting, _worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR2 to the trainer, which saves its state before stopping.

    SLURM signals every process of a job step on preemption; a worker that died of it would crash the
    training loop before the trainer could write its resumable state. At interpreter exit (``exiting`` set),
    SIGTERM stops a worker again, so workers left alive by an error never block the exit; orphaned workers
    exit through torch's watchdog.
    """
    signal.signal(signal.SIGTERM, functools.partial(_on_sigterm, exiting))
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


_WORKER_INIT = functools.partial(_worker_init, _EXITING)


def _expand(urls: dict[str, dict], shards_dir: str) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """webdataset stage: shard urls -> verified samples with decoded json metadata."""

    def stage(src: Iterator[dict]) -> Iterator[dict]:
        for item in src:
            for sample in iter_shard(shards_dir, urls[item["url"]]):
                yield {"jpg": sample["jpg"], "meta": json.loads(sample["json"])}

    return stage


def _metadata(metas: list[dict], keys=META_KEYS) -> dict:
    return {k: torch.tensor([m[k] for m in metas], dtype=torch.long) for k in keys}


def _collate(images: list[torch.Tensor], metas: list[dict], height: int, width: int) -> dict:
    batch = _metadata(metas)
    batch["image"] = torch.stack(images) if images else torch.zeros(0, 3, height, width)
    return batch


class MicroBatches(Dataset):
    """Map-style dataset whose items are whole micro-batches: ``dataset[(epoch, step, micro, offset, indices)]``.

    ``offset`` is the position of the first sample in its global batch: sample ``b`` is augmented with the seed
    (seed, epoch, step, offset + b).
    """

    def __init__(self, cfg: ExperimentConfig, shards: list[dict], table: np.ndarray) -> None:
        d = cfg.data
        self.seed, self.split, self.shape = cfg.train.seed, d.train_split, (3, d.height, d.width)
        self.reader = SampleReader(d.shards, shards, table, d.cache_mb)
        self.augment = BatchAugment(cfg)

    def __getitem__(self, key: tuple) -> dict:
        epoch, step, micro, offset, indices = key
        samples = [self.reader.read(i) for i in indices]
        images = [self._decode(i, jpg) for i, (jpg, _) in zip(indices, samples)]
        seeds = [(self.seed, epoch, step, offset + b) for b in range(len(indices))]
        out = torch.empty((len(indices), *self.shape), dtype=torch.uint8)
        if get_worker_info() is not None:
            out.share_memory_()  # written once, in the shared memory the batch travels in (no copy on the way)
        pixels, erase = self.augment(images, seeds, out)
        batch = _metadata([meta for _, meta in samples], ("label", "identity", "camera"))
        batch.update(pixels=pixels, erase=erase, key=[sample_key(self.split, i) for i in indices])
        return {**batch, "epoch": epoch, "step": step, "micro": micro}

    def _decode(self, index: int, jpg: bytes):
        try:
            return decode(jpg)
        except Exception as exc:  # PIL's errors name neither the shard nor the sample
            path = self.reader.paths[int(self.reader.table[index, 0])]
            key = sample_key(self.split, index)
            raise ValueError(f"shard {path}: sample {key} is not a readable JPEG: {exc}") from None


class _PlanKeys(Sampler):
    """The micro-batch keys of this rank for steps ``start..`` of one epoch's plan (set before each epoch)."""

    def __init__(self, rank: int, world_size: int, grad_accum: int) -> None:
        self.rank, self.world_size, self.grad_accum = rank, world_size, grad_accum
        self.epoch, self.start, self.plan = 0, 0, EpochPlan(np.zeros((0, 0), dtype=np.int64))

    def __len__(self) -> int:
        return (len(self.plan.batches) - self.start) * self.grad_accum

    def __iter__(self) -> Iterator[tuple]:
        for step in range(self.start, len(self.plan.batches)):
            batch = self.plan.batches[step]
            for micro in range(self.grad_accum):
                part = rank_slice(batch, self.rank, self.world_size, self.grad_accum, micro)
                yield self.epoch, step, micro, part.start, tuple(batch[part].tolist())


class TrainStream:
    """The training micro-batches of one rank for a whole run; the DataLoader workers persist across epochs.

    ``num_steps(epoch)`` is the number of global batches of an epoch (the same on every rank); ``epoch(e, start)``
    iterates this rank's micro-batches of steps ``start..`` in order, each a dict with ``pixels`` (uint8 NCHW,
    augmented) and ``erase`` (int16 [B, 4] erasing boxes), which ``datasets.transforms.model_images`` turns into
    the normalised float images, ``label``, ``identity``, ``camera`` (int64), ``key`` (the samples' shard keys),
    ``epoch``, ``step`` and ``micro`` (0..grad_accum-1). ``close()`` stops the workers (a later epoch starts new
    ones).
    """

    def __init__(self, cfg: ExperimentConfig, rank: int, world_size: int) -> None:
        d = cfg.data
        self.cfg, self.rank, self.world_size, self.accum = cfg, rank, world_size, cfg.optim.grad_accum
        self.micro_size = micro_batch_size(d.batch_size, world_size, self.accum)
        entry = split_entry(read_manifest(d.shards, d.shards_wait_s), d.train_split, d.shards)
        table = member_table(entry, d.train_split, d.shards)
        self.labels = np.asarray(entry["labels"], dtype=np.int64)  # numpy, not a list: workers share its pages
        shards = [{k: s[k] for k in ("file", "count", "first_index", "sha256")} for s in entry["shards"]]
        del entry
        verify_once(d.shards, shards)  # once per process; forked workers inherit the result
        self._plans: dict[int, EpochPlan] = {}
        self.plan(0)  # P x K errors surface here, before any worker starts
        if d.sampler == "pk" and self.micro_size % d.num_instances:
            log.warning(
                "a micro-batch of %d samples (data.batch_size=%d / %d processes / optim.grad_accum=%d) splits the "
                "K=%d samples of some identities between micro-batches",
                self.micro_size, d.batch_size, world_size, self.accum, d.num_instances,
            )  # fmt: skip
        self.dataset = MicroBatches(cfg, shards, table)
        self.keys = _PlanKeys(rank, world_size, self.accum)
        self.loader = self._make_loader()

    def _make_loader(self) -> DataLoader:
        workers = self.cfg.data.num_workers
        return DataLoader(
            self.dataset,
            batch_size=None,  # items are whole micro-batches
            sampler=self.keys,
            num_workers=workers,
            worker_init_fn=_WORKER_INIT,
            prefetch_factor=PREFETCH if workers else None,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def plan(self, epoch: int) -> EpochPlan:
        """The global batches of ``epoch`` (the last two epochs' plans are kept)."""
        if epoch not in self._plans:
            d = self.cfg.data
            plan = plan_epoch(
                self.labels, d.sampler, d.batch_size, self.cfg.train.seed, epoch, d.num_instances, d.balanced_cap
            )
            if plan.stats.get("padded_identities"):
                log.warning(
                    "epoch %d: %d identities have fewer than K=%d samples; their groups are filled by sampling "
                    "with replacement", epoch, plan.stats["padded_identities"], d.num_instances,
                )  # fmt: skip
            self._plans = {e: p for e, p in self._plans.items() if e == epoch - 1}
            self._plans[epoch] = plan
        return self._plans[epoch]

    def num_steps(self, epoch: int) -> int:
        """Global batches (optimizer steps) in ``epoch``; the same on every rank."""
        return len(self.plan(epoch).batches)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """This rank's micro-batches of steps ``start..num_steps(epoch)-1``, in order; nothing before ``start``
        is read or decoded."""
        steps = self.num_steps(epoch)
        if not 0 <= start <= steps:
            raise ValueError(f"epoch {epoch} has {steps} steps: cannot start at step {start}")
        return self._iterate(epoch, start)

    def _iterate(self, epoch: int, start: int) -> Iterator[dict]:
        self.keys.epoch, self.keys.start, self.keys.plan = epoch, start, self.plan(epoch)
        with torch.random.fork_rng(devices=[]):  # starting workers draws a base seed: leave the caller's RNG alone
            batches = iter(self.loader)
        yield from batches  # the DataLoader returns the workers' results in key order

    def close(self) -> None:
        """Stop the workers (dropping the DataLoader shuts them down); a later epoch starts new ones."""
        self.loader = self._make_loader()
        self.dataset.reader.close()


def train_loader(cfg: ExperimentConfig, rank: int, world_size: int, epoch: int, start: int = 0) -> list[dict]:
    """All micro-batches of ``rank`` in ``epoch`` from step ``start`` on, from a stream of their own (tests and
    benchmarks; a training run keeps one ``TrainStream`` for all epochs)."""
    stream = TrainStream(cfg, rank, world_size)
    try:
        return list(stream.epoch(epoch, start))
    finally:
        stream.close()


class EvalLoader:
    """Iterable of evaluation batches of one split for one rank (each sample exactly once over all ranks)."""

    def __init__(self, cfg: ExperimentConfig, split: str, rank: int, world_size: int) -> None:
        d = cfg.data
        self.entry = split_entry(read_manifest(d.shards, d.shards_wait_s), split, d.shards)
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
        # the DataLoader and its workers go when this generator ends (workers left by an error stop at exit)
        yield from DataLoader(self.dataset, batch_size=None, num_workers=self.workers, worker_init_fn=_WORKER_INIT)


def eval_loader(cfg: ExperimentConfig, split: str, rank: int = 0, world_size: int = 1) -> EvalLoader:
    """Unaugmented batches of ``split`` with their ``index``; every sample once across ranks and workers."""
    return EvalLoader(cfg, split, rank, world_size)
