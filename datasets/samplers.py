"""Epoch plans for the training stream: which shards each rank reads and which samples form each batch.

Plans are pure functions of the manifest's per-sample label list, the seed and the epoch, so every rank
computes every rank's plan and keeps the shortest length: all ranks get the same number of batches.
"""

from __future__ import annotations

import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


@dataclass
class EpochPlan:
    """One rank's epoch: its shards, its batches (lists of sample indices) and what the sampler had to do."""

    shards: list[int]
    batches: list[list[int]]
    stats: dict = field(default_factory=dict)


def assign_shards(counts: Sequence[int], world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shards of each rank this epoch (the node split, rotating per epoch): a seeded shuffle, then each shard to
    the rank holding the fewest samples so far (largest shards first), so ranks get nearly equal pools and the
    equal-length cut drops little. ``counts`` are the shards' sample counts."""
    num_shards = len(counts)
    if num_shards < world_size:
        raise ValueError(
            f"the training split has {num_shards} shards but there are {world_size} ranks; every rank needs at "
            "least one shard: re-run datasets.prepare with a smaller data.prepare.shard_size"
        )
    order = list(range(num_shards))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    order.sort(key=lambda i: -counts[i])  # stable: equal-size shards keep the shuffled order
    owned: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for position, i in enumerate(order):
        # the least-loaded rank; among equals, rotate with the position so equal shards are dealt round-robin
        rank = min(range(world_size), key=lambda r: (load[r], (r - position) % world_size))
        owned[rank].append(i)
        load[rank] += counts[i]
    return [sorted(o) for o in owned]


def shard_indices(shards: Sequence[dict], ids: Sequence[int]) -> list[int]:
    """Sample indices held by the given shards (shards store contiguous index ranges)."""
    out: list[int] = []
    for i in ids:
        first = shards[i]["first_index"]
        out.extend(range(first, first + shards[i]["count"]))
    return out


def balanced_selection(labels: Sequence[int], cap: int, seed: int, epoch: int) -> tuple[np.ndarray, int]:
    """Global under-sampling: a seeded random subset keeping at most ``cap`` samples per class (0 = median)."""
    lab = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(lab[lab >= 0]) if (lab >= 0).any() else np.zeros(0, dtype=np.int64)
    present = counts[counts > 0]
    if cap <= 0:
        cap = max(1, int(np.median(present))) if len(present) else 1
    rng = np.random.default_rng([seed, epoch, 7])
    order = np.lexsort((rng.random(len(lab)), lab))  # by label, random within a label
    sorted_lab = lab[order]
    starts = np.searchsorted(sorted_lab, sorted_lab, side="left")
    rank_in_class = np.arange(len(lab)) - starts
    keep = order[(rank_in_class < cap) & (sorted_lab >= 0)]
    return np.sort(keep), cap


def pk_batches(
    indices: Sequence[int], labels: Sequence[int], p: int, k: int, rng: random.Random
) -> tuple[list[list[int]], dict]:
    """P x K batches from a pool: each identity cut into groups of K; P distinct identities per batch.

    Identities with fewer than K samples are filled up by sampling their own samples with replacement (as
    reid-strong-baseline's RandomIdentitySampler does); how many is returned in the stats, never silent.
    """
    by_label: dict[int, list[int]] = defaultdict(list)
    for i in indices:
        if labels[i] >= 0:
            by_label[labels[i]].append(i)
    if len(by_label) < p:
        raise ValueError(f"P x K batching needs P={p} identities per batch but the pool holds only {len(by_label)}")
    groups: dict[int, list[list[int]]] = {}
    padded = 0
    for lab in sorted(by_label):
        idx = by_label[lab]
        rng.shuffle(idx)
        if len(idx) < k:
            idx = idx + [rng.choice(idx) for _ in range(k - len(idx))]
            padded += 1
        groups[lab] = [idx[j : j + k] for j in range(0, len(idx) - k + 1, k)]
    avail = sorted(groups)
    batches: list[list[int]] = []
    while len(avail) >= p:
        chosen = rng.sample(avail, p)
        batches.append([i for lab in chosen for i in groups[lab].pop()])
        avail = [lab for lab in avail if groups[lab]]
    return batches, {"identities": len(by_label), "padded_identities": padded}


def chunk_batches(indices: Sequence[int], batch: int, rng: random.Random) -> list[list[int]]:
    """Shuffled pool cut into full batches (the remainder waits for another epoch)."""
    pool = list(indices)
    rng.shuffle(pool)
    return [pool[j : j + batch] for j in range(0, len(pool) - batch + 1, batch)]


def plan_epoch(
    labels: Sequence[int],
    shards: Sequence[dict],
    sampler: str,
    rank_batch: int,
    world_size: int,
    seed: int,
    epoch: int,
    num_instances: int = 4,
    balanced_cap: int = 0,
) -> list[EpochPlan]:
    """Every rank's plan for ``epoch``, all cut to the same number of batches."""
    owned = assign_shards([s["count"] for s in shards], world_size, seed, epoch)
    selected, cap = None, None
    if sampler == "balanced":
        keep, cap = balanced_selection(labels, balanced_cap, seed, epoch)
        selected = np.zeros(len(labels), dtype=bool)
        selected[keep] = True
    plans = []
    for rank, ids in enumerate(owned):
        rng = random.Random(seed * 1_000_003 + epoch * 1009 + rank)
        pool = shard_indices(shards, ids)
        stats: dict = {"pool": len(pool)}
        if sampler == "pk":
            if rank_batch % num_instances:
                raise ValueError(f"per-rank batch {rank_batch} is not a multiple of data.num_instances={num_instances}")
            try:
                batches, stats_pk = pk_batches(pool, labels, rank_batch // num_instances, num_instances, rng)
            except ValueError as exc:
                raise ValueError(f"rank {rank} (shards {ids}): {exc}; lower data.batch_size or shard_size") from None
            stats.update(stats_pk)
        elif sampler == "balanced":
            pool = [i for i in pool if selected[i]]
            batches, stats = chunk_batches(pool, rank_batch, rng), {"pool": len(pool), "cap": cap}
        elif sampler == "random":
            batches = chunk_batches(pool, rank_batch, rng)
        else:
            raise ValueError(f"data.sampler={sampler!r} is not valid; choose one of ['balanced', 'pk', 'random']")
        plans.append(EpochPlan(ids, batches, stats))
    n = min(len(p.batches) for p in plans)
    if n == 0:
        raise ValueError(
            f"epoch {epoch}: some rank gets no full batch of {rank_batch} ({[p.stats for p in plans]}); "
            "lower data.batch_size or use more data"
        )
    for p in plans:
        p.stats["dropped_batches"] = len(p.batches) - n
        p.batches = p.batches[:n]
    return plans
