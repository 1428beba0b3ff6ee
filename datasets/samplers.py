"""Epoch plans of the training stream: the global batches of an epoch, and each rank's share of them.

A plan is a pure function of the split's per-sample label list, the seed and the epoch, over the whole split: the
same global batches whatever the number of ranks and workers. Rank ``r`` of ``W`` takes the ``r``-th of ``W``
equal slices of every global batch, cut into ``grad_accum`` micro-batches; P x K batches hold their identities'
K samples next to each other, so the slices keep identity groups whole when the slice size is a multiple of K.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class EpochPlan:
    """One epoch: ``batches[step]`` holds the sample indices of global batch ``step``; what the sampler did."""

    batches: np.ndarray
    stats: dict = field(default_factory=dict)


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


def pk_batches(labels: np.ndarray, p: int, k: int, rng: random.Random) -> tuple[list[list[int]], dict]:
    """P x K batches over all labelled samples: each identity cut into groups of K; P distinct identities a batch.

    Identities with fewer than K samples are filled up by sampling their own samples with replacement (as
    reid-strong-baseline's RandomIdentitySampler does); how many is returned in the stats, never silent. Each
    batch draws P identities uniformly among those with groups left; an exhausted identity leaves the pool by
    a swap with the last one, so an epoch costs O(samples), not O(batches x identities).
    """
    order = np.argsort(labels, kind="stable")
    order = order[labels[order] >= 0]
    ids, starts = np.unique(labels[order], return_index=True)
    if len(ids) < p:
        raise ValueError(f"P x K batching needs P={p} identities per batch but the split holds only {len(ids)}")
    groups: list[list[list[int]]] = []
    padded = 0
    for members in np.split(order, starts[1:]):
        idx = members.tolist()
        rng.shuffle(idx)
        if len(idx) < k:
            idx += [rng.choice(idx) for _ in range(k - len(idx))]
            padded += 1
        groups.append([idx[j : j + k] for j in range(0, len(idx) - k + 1, k)])
    avail = list(range(len(groups)))
    batches: list[list[int]] = []
    while len(avail) >= p:
        chosen = sorted(rng.sample(range(len(avail)), p), reverse=True)
        batch = []
        for position in chosen:  # descending, so a swap-removal never moves a position still to visit
            g = avail[position]
            batch.extend(groups[g].pop())
            if not groups[g]:
                avail[position] = avail[-1]
                avail.pop()
        batches.append(batch)
    return batches, {"identities": len(ids), "padded_identities": padded}


def _pk(lab: np.ndarray, batch_size: int, rng: np.random.Generator, d: dict, stats: dict) -> np.ndarray:
    k = d["num_instances"]
    if batch_size % k:
        raise ValueError(f"data.batch_size={batch_size} is not a multiple of data.num_instances={k}")
    batches, pk_stats = pk_batches(lab, batch_size // k, k, random.Random(int(rng.integers(2**62))))
    stats.update(pk_stats)
    return np.asarray(batches, dtype=np.int64).reshape(len(batches), batch_size)


def _shuffled(pool: np.ndarray, batch_size: int, rng: np.random.Generator) -> np.ndarray:
    pool = rng.permutation(pool)
    steps = len(pool) // batch_size
    return pool[: steps * batch_size].reshape(steps, batch_size)


def _balanced(lab: np.ndarray, batch_size: int, rng: np.random.Generator, d: dict, stats: dict) -> np.ndarray:
    pool, stats["cap"] = balanced_selection(lab, d["balanced_cap"], d["seed"], d["epoch"])
    return _shuffled(pool, batch_size, rng)


def _random(lab: np.ndarray, batch_size: int, rng: np.random.Generator, d: dict, stats: dict) -> np.ndarray:
    return _shuffled(np.arange(len(lab)), batch_size, rng)


SAMPLERS = {"pk": _pk, "balanced": _balanced, "random": _random}
"""``data.sampler`` name -> planner ``(labels, batch_size, rng, settings, stats) -> batches [steps, batch_size]``"""


def plan_epoch(
    labels: Sequence[int] | np.ndarray,
    sampler: str,
    batch_size: int,
    seed: int,
    epoch: int,
    num_instances: int = 4,
    balanced_cap: int = 0,
) -> EpochPlan:
    """The global batches of ``epoch`` (``batch_size`` samples each; the last partial batch waits for another
    epoch): P x K, class-balanced (under-sampled to ``balanced_cap`` per class) or plain random."""
    if sampler not in SAMPLERS:
        raise ValueError(f"data.sampler={sampler!r} is not valid; choose one of {sorted(SAMPLERS)}")
    lab = np.asarray(labels, dtype=np.int64)
    stats: dict = {"samples": len(lab)}
    settings = {"num_instances": num_instances, "balanced_cap": balanced_cap, "seed": seed, "epoch": epoch}
    out = SAMPLERS[sampler](lab, batch_size, np.random.default_rng([seed, epoch, 11]), settings, stats)
    if len(out) == 0:
        raise ValueError(
            f"epoch {epoch}: the {sampler} sampler makes no full batch of data.batch_size={batch_size} from "
            f"{len(lab)} samples ({stats}); lower data.batch_size or use more data"
        )
    stats["pool"] = int(out.size)
    return EpochPlan(out, stats)


def micro_batch_size(batch_size: int, world_size: int, grad_accum: int) -> int:
    """Samples of one rank's micro-batch; a clear error when the global batch does not divide."""
    if batch_size % (world_size * grad_accum):
        raise ValueError(
            f"data.batch_size={batch_size} (the global batch per optimizer step) is not divisible by "
            f"{world_size} process(es) x optim.grad_accum={grad_accum}"
        )
    return batch_size // (world_size * grad_accum)


def rank_slice(batch: np.ndarray, rank: int, world_size: int, grad_accum: int, micro: int) -> slice:
    """Positions within a global batch of rank ``rank``'s micro-batch ``micro``."""
    size = micro_batch_size(len(batch), world_size, grad_accum)
    start = (rank * grad_accum + micro) * size
    return slice(start, start + size)
