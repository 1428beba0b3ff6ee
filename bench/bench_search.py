"""Gallery search benchmark: queries/s of a GalleryBank's exact (flat) and IVF faiss indexes, recall@1 vs exact.

python bench/bench_search.py [--bank 1000000 --dim 512 --queries 1000 --nlist 1024 --nprobe 8,32]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.bank import GalleryBank  # noqa: E402


def make_bank(n: int, dim: int, num_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered gallery embeddings (n / 100 products, 100 views each) and queries near random gallery items."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, n // 100), dim), dtype=np.float32)
    feats = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 100_000):  # in blocks: bounded temporaries
        e = min(s + 100_000, n)
        feats[s:e] = centers[rng.integers(0, len(centers), e - s)] + rng.standard_normal((e - s, dim), np.float32)
    picks = rng.integers(0, n, num_queries)
    queries = feats[picks] + 0.5 * rng.standard_normal((num_queries, dim), dtype=np.float32)
    return feats, queries


def timed_search(bank: GalleryBank, queries: np.ndarray, k: int, exact: bool = False):
    t0 = time.perf_counter()
    _, idx = bank.search(queries, k, exact=exact)
    return idx, len(queries) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", default="8,32")
    args = parser.parse_args()
    t0 = time.perf_counter()
    feats, queries = make_bank(args.bank, args.dim, args.queries)
    bank = GalleryBank.build(feats, labels=np.arange(args.bank) % 1000)
    del feats
    print(f"bank of {args.bank} x {args.dim} built in {time.perf_counter() - t0:.1f} s")
    rows = []
    t0 = time.perf_counter()
    bank.build_index("flat")
    exact, qps = timed_search(bank, queries, 10)
    rows.append(("exact (IndexFlatIP)", time.perf_counter() - t0 - args.queries / qps, qps, 1.0, 1.0))
    t0 = time.perf_counter()
    index = bank.build_index("ivf", nlist=args.nlist)
    build = time.perf_counter() - t0
    for nprobe in (int(p) for p in args.nprobe.split(",")):
        index.nprobe = nprobe
        idx, qps = timed_search(bank, queries, 10)
        r1 = float((idx[:, 0] == exact[:, 0]).float().mean())
        r10 = float((idx == exact[:, :1]).any(1).float().mean())
        rows.append((f"IVF-Flat nlist={args.nlist} nprobe={nprobe}", build, qps, r1, r10))
    head = f"{args.bank} x {args.dim}-d bank, {args.queries} queries, top-10"
    versions = f"faiss {faiss.__version__} ({faiss.omp_get_max_threads()} threads), torch {torch.__version__}"
    print(f"\n{head}; {platform.machine()}, {versions}\n")
    print("| index | build (s) | queries/s | recall@1 vs exact | exact top-1 in top-10 |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, build, qps, r1, r10 in rows:
        print(f"| {name} | {build:.1f} | {qps:.0f} | {r1:.3f} | {r10:.3f} |")


if __name__ == "__main__":
    main()
