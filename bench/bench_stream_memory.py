"""Peak memory of a training epoch against the size of the split: the training stream vs. the previous one.

Generates sets of small synthetic crops (default 10k and 200k; random-noise source images cropped and written
into shards by ``datasets.prepare.prepare_shards``, the real prepare path; cached under ``--work``), then, for
each set and stream, runs training epochs in a child process of its own and samples, every 0.1 s, the memory
of that process and its DataLoader workers: the summed RSS and the summed PSS (shared pages split between the
processes that map them, so forked workers are not counted twice). Streams compared in the same run:

- ``new``: ``datasets.stream.TrainStream`` of this checkout (reads samples by index, ``data.cache_mb`` default);
- ``old``: the stream of commit adbbeaa (workers stream the rank's shards and hold the samples of their
  batches for the epoch, plus a cache of ``data.cache_mb`` = 512 MiB per worker, its default), run from
  ``git show`` in a temporary package; ``old0`` is the same with ``data.cache_mb=0``.

    python bench/bench_stream_memory.py [--sizes 10000 200000] [--streams new old old0] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OLD_COMMIT = "adbbeaa"
OLD_MODULES = ("stream", "samplers", "transforms")
log = logging.getLogger("bench_stream_memory")


def make_set(size: int, work: Path) -> Path:
    """``size`` crops of 32x16 px from 16 noise images (4 samples per identity, 6 cameras); reused if present."""
    from PIL import Image

    from configs import PrepareConfig
    from datasets.prepare import prepare_shards
    from datasets.records import Record, assign_labels
    from datasets.shards import MANIFEST, read_manifest

    out = work / f"set{size}"
    if (out / "shards" / MANIFEST).is_file() and read_manifest(out / "shards")["splits"]["train"]["count"] == size:
        return out / "shards"
    (out / "src").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(16):
        pixels = rng.integers(0, 256, (96, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(out / "src" / f"{i}.jpg", quality=90)
    boxes = rng.integers(0, 48, (size, 2))
    records = [
        Record(path=f"{i % 16}.jpg", identity=i // 4, camera=i % 6, box=(int(x), int(y), 16.0, 32.0), split="train")
        for i, (x, y) in enumerate(boxes)
    ]
    records, _ = assign_labels(records)
    prep = PrepareConfig(shard_size=1000, workers=2, quality=90, min_size=8)
    prepare_shards({"train": records}, out / "shards", prep, root=str(out / "src"), progress=False)
    return out / "shards"


def old_package(work: Path) -> Path:
    """The stream of ``OLD_COMMIT`` as package ``oldstream`` (its own samplers and transforms) under ``work``."""
    pkg = work / "old" / "oldstream"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    for name in OLD_MODULES:
        text = subprocess.run(
            ["git", "show", f"{OLD_COMMIT}:datasets/{name}.py"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
        for other in OLD_MODULES:
            text = text.replace(f"from datasets.{other} import", f"from oldstream.{other} import")
        (pkg / f"{name}.py").write_text(text)
    return pkg.parent


class Sampler(threading.Thread):
    """Peak summed RSS and PSS of this process and its children."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_rss = self.peak_pss = 0
        self.stop = threading.Event()

    def run(self) -> None:
        me = psutil.Process()
        while not self.stop.is_set():
            rss = pss = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    info = proc.memory_full_info()
                except psutil.NoSuchProcess:
                    continue
                rss, pss = rss + info.rss, pss + info.pss
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            time.sleep(0.1)


def child(args) -> None:
    """One stream on one set: ``args.epochs`` epochs, batches consumed and dropped; prints a JSON line."""
    import torch

    from configs import ExperimentConfig

    torch.set_num_threads(1)
    cfg = ExperimentConfig()
    d = cfg.data
    d.shards, d.height, d.width, d.batch_size, d.num_instances = args.shards, 32, 16, 64, 4
    d.num_workers = args.workers
    if args.stream == "new":
        from datasets.stream import TrainStream
    else:
        sys.path.insert(0, args.old)
        from oldstream.stream import TrainStream

        d.cache_mb = 512 if args.stream == "old" else 0
    base = psutil.Process().memory_info().rss
    sampler = Sampler()
    sampler.start()
    start = time.perf_counter()
    stream = TrainStream(cfg, 0, 1)
    images = 0
    for epoch in range(args.epochs):
        for batch in stream.epoch(epoch):
            images += len(batch["label"])
            del batch
    seconds = time.perf_counter() - start
    time.sleep(0.3)  # one more sample with the workers still alive
    stream.close()
    sampler.stop.set()
    sampler.join()
    mb = 2**20
    result = {"base_rss_mb": base / mb, "peak_rss_mb": sampler.peak_rss / mb, "peak_pss_mb": sampler.peak_pss / mb}
    print(json.dumps({**result, "images": images, "seconds": seconds, "cache_mb": d.cache_mb}))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 200_000], help="crops per generated set")
    parser.add_argument("--streams", nargs="+", default=["new", "old", "old0"], choices=["new", "old", "old0"])
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per measurement")
    parser.add_argument("--work", default="/tmp/bench_stream_memory", help="where the generated sets are kept")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stream", default="new", help=argparse.SUPPRESS)
    parser.add_argument("--shards", default="", help=argparse.SUPPRESS)
    parser.add_argument("--old", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = Path(args.work)
    old = old_package(work)
    rows = []
    for size in args.sizes:
        shards = make_set(size, work)
        for stream in args.streams:
            cmd = [sys.executable, __file__, "--child", "--stream", stream, "--shards", str(shards), "--old", str(old)]
            cmd += ["--workers", str(args.workers), "--epochs", str(args.epochs)]
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{stream} on {size} crops failed:\n{proc.stderr[-3000:]}")
            row = {"size": size, "stream": stream, **json.loads(proc.stdout.strip().splitlines()[-1])}
            log.info("%s", row)
            rows.append(row)
    import torch

    print(
        f"python {platform.python_version()}, torch {torch.__version__}, {platform.machine()}, "
        f"{psutil.cpu_count()} cores, {args.workers} workers, {args.epochs} epoch(s), batch 64 (P x K = 16 x 4), "
        "input 32x16"
    )
    print(
        "| crops | stream | cache_mb / worker | images | s | RSS after imports MB | peak RSS sum MB | peak PSS sum MB |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['size']} | {r['stream']} | {r['cache_mb']} | {r['images']} | {r['seconds']:.0f} | "
            f"{r['base_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_pss_mb']:.0f} |"
        )
    return rows


if __name__ == "__main__":
    main()
