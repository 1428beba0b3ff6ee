"""Re-ranking a query batch against a large gallery bank: the whole bank against a per-query shortlist.

``python bench/bench_rerank_shortlist.py [--sizes 5000,20000] [--shortlist-only 100000,500000] [--queries 64]``

Synthetic clustered embeddings (SKUs of 20 views, 256-d, L2-normalised), the recogniser's matcher
(``inference.match``) with k-reciprocal re-ranking: ``rerank_exact_max`` at least the bank (exact: the batch and
the whole bank) against 0 (per query, among its ``--shortlist`` nearest rows, default 1000). Prints seconds per query
batch, their ratio measured side by side, the top-1 SKU agreement of the two and the top-1 accuracy of each.
Banks in ``--shortlist-only`` run the shortlist alone (exact re-ranking needs (Q+G)^2 distances there).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from inference.bank import GalleryBank  # noqa: E402
from inference.match import MatchOptions, match  # noqa: E402


def bank_and_queries(size: int, num_query: int, dim: int = 256, views: int = 20, noise: float = 0.15):
    gen = torch.Generator().manual_seed(size)
    skus = max(size // views, 1)
    centres = torch.nn.functional.normalize(torch.randn(skus, dim, generator=gen), dim=1)
    ids = torch.arange(size) % skus
    feats = centres[ids] + noise * torch.randn(size, dim, generator=gen)
    truth = torch.randint(0, skus, (num_query,), generator=gen)
    queries = centres[truth] + noise * torch.randn(num_query, dim, generator=gen)
    return GalleryBank.build(feats, identities=ids.tolist()), queries, truth.tolist()


def timed(bank, queries, opts):
    start = time.perf_counter()
    out = match(bank, queries, opts)
    return time.perf_counter() - start, [r["category_id"] for r in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="5000,20000")
    parser.add_argument("--shortlist-only", default="100000,500000")
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--shortlist", type=int, default=1000)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.queries} queries per batch")
    print("| bank rows | exact s/batch | shortlist s/batch | ratio | top-1 agreement | top-1 exact | top-1 shortlist |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size in [int(s) for s in args.sizes.split(",") if s]:
        bank, queries, truth = bank_and_queries(size, args.queries)
        t_short, short = timed(
            bank, queries, MatchOptions(rerank=True, rerank_exact_max=0, rerank_shortlist=args.shortlist)
        )
        t_exact, exact = timed(bank, queries, MatchOptions(rerank=True, rerank_exact_max=size))
        agree = sum(a == b for a, b in zip(exact, short)) / len(truth)
        acc_e = sum(a == t for a, t in zip(exact, truth)) / len(truth)
        acc_s = sum(a == t for a, t in zip(short, truth)) / len(truth)
        print(f"| {size} | {t_exact:.2f} | {t_short:.2f} | {t_exact / t_short:.1f}x | {agree:.3f} | {acc_e:.3f} "
              f"| {acc_s:.3f} |", flush=True)  # fmt: skip
    for size in [int(s) for s in args.shortlist_only.split(",") if s]:
        bank, queries, truth = bank_and_queries(size, args.queries)
        t_short, short = timed(
            bank, queries, MatchOptions(rerank=True, rerank_exact_max=0, rerank_shortlist=args.shortlist)
        )
        acc_s = sum(a == t for a, t in zip(short, truth)) / len(truth)
        print(f"| {size} | - | {t_short:.2f} | - | - | - | {acc_s:.3f} |", flush=True)


if __name__ == "__main__":
    main()
