"""Training-stream throughput vs a map-style folder DataLoader and the in-memory decode+augment ceiling.

For each set (256x128 person crops from mars_mini, 224x224 product crops from grocery_store) the crops are
written once as shards (``datasets.prepare``) and as a folder of the same JPEG files; then, in one run and
alternating, it times (s) the training stream, (a) a map-style folder dataset with the same decode + per-image
torchvision transforms through a torch DataLoader, (b) the same decode + per-image torchvision transforms in a
tight single-process loop over the same JPEG bytes held in memory (the issue's ceiling), and (b') decode + the
stream's own batched augmentation (``BatchAugment``, same augmentation distribution) in the same tight loop:
the ceiling for the code the stream runs. The stream and (a) are timed two ways: as a training run uses them
(one ``datasets.stream.TrainStream`` / a DataLoader with ``persistent_workers``: workers start once, one epoch
per repeat, the first one's start-up included in the total) and as a single epoch with workers of its own
(a fresh ``TrainStream`` / a plain DataLoader). The stream hands over uint8 pixels and erasing boxes; the float
conversion, normalisation and erasing (``datasets.transforms.normalise``) run in the consumer, as in the trainer:
the stream's figures include that time (and report it), and (b') includes it too. Prints a table.

    python bench/bench_stream.py [--workers 1 2] [--repeats 5] [--limit 1600]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
import webdataset
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import load_config  # noqa: E402
from datasets.prepare import prepare_shards  # noqa: E402
from datasets.records import Record, assign_labels  # noqa: E402
from datasets.shards import iter_shard, read_manifest  # noqa: E402
from datasets.stream import TrainStream  # noqa: E402
from datasets.transforms import BatchAugment, decode, normalise, train_transform  # noqa: E402

SHARED = REPO.parent / "shared" / "data"


def person_records(limit: int) -> list[Record]:
    """mars_mini bbox_train: folder name = person id, camera from the file name (PPPPCc...)."""
    files = sorted((SHARED / "mars_mini" / "bbox_train").glob("*/*.jpg"))
    files = files[:: max(1, len(files) // limit)][:limit]  # spread over all 16 identities
    return [Record(path=str(p), identity=int(p.parent.name), camera=int(p.name[5]), split="train") for p in files]


def product_records(limit: int) -> list[Record]:
    """grocery_store train list: path, fine class id."""
    root = SHARED / "grocery_store" / "dataset"
    lines = [ln.split(",") for ln in (root / "train.txt").read_text().splitlines() if ln.strip()]
    step = max(1, len(lines) // limit)  # spread over all classes
    return [Record(path=str(root / p.strip()), identity=int(c), split="train") for p, c, _ in lines[::step][:limit]]


class FolderDataset(Dataset):
    """What reid-strong-baseline does: a list of (file, label); read, decode and transform per item."""

    def __init__(self, items: list[tuple[Path, int]], transform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        return self.transform(decode(path.read_bytes())), label


def export_folder(shards: Path, out: Path) -> list[tuple[Path, int]]:
    """Write the shard crops as plain files (same JPEG bytes) for the folder baseline."""
    items = []
    for shard in read_manifest(shards)["splits"]["train"]["shards"]:
        for sample in iter_shard(shards, shard):
            meta = json.loads(sample["json"])
            path = out / str(meta["label"]) / f"{meta['index']:06d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(sample["jpg"])
            items.append((path, meta["label"]))
    return items


def consume(batches, augment) -> tuple[int, float]:
    """Images of ``batches``, each micro-batch normalised here as the trainer does; and the seconds that took."""
    n, spent = 0, 0.0
    for b in batches:
        start = time.perf_counter()
        normalise(b["pixels"], b["erase"], augment)
        spent += time.perf_counter() - start
        n += len(b["label"])
    return n, spent


def time_stream(cfg, workers: int, epoch: int) -> tuple[int, float]:
    """One epoch of a fresh stream, its workers' start included (shards are verified once per process: not here)."""
    cfg.data.num_workers = workers
    start = time.perf_counter()
    stream = TrainStream(cfg, 0, 1)
    n, _ = consume(stream.epoch(epoch), cfg.data.augment)
    stream.close()
    return n, time.perf_counter() - start


def time_stream_run(stream: TrainStream, epoch: int) -> tuple[int, float, float]:
    """(images, seconds, of which normalising in the consumer) of one epoch of a running stream."""
    start = time.perf_counter()
    n, spent = consume(stream.epoch(epoch), stream.cfg.data.augment)
    return n, time.perf_counter() - start, spent


def folder_loader(items, cfg, workers: int, persistent: bool) -> DataLoader:
    return DataLoader(
        FolderDataset(items, train_transform(cfg)),
        batch_size=cfg.data.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        persistent_workers=persistent,
    )


def time_folder(items, cfg, workers: int, loader: DataLoader | None = None) -> tuple[int, float]:
    """One epoch of ``loader``; without one, of a fresh (non-persistent) DataLoader, its start included."""
    start = time.perf_counter()
    loader = loader or folder_loader(items, cfg, workers, persistent=False)
    n = sum(len(labels) for _, labels in loader)
    return n, time.perf_counter() - start


def time_ceiling(blobs: list[bytes], cfg) -> tuple[int, float]:
    transform = train_transform(cfg)
    start = time.perf_counter()
    for blob in blobs:
        transform(decode(blob))
    return len(blobs), time.perf_counter() - start


def time_batched_ceiling(blobs: list[bytes], cfg) -> tuple[int, float]:
    augment, size = BatchAugment(cfg), cfg.data.batch_size
    start = time.perf_counter()
    for i in range(0, len(blobs), size):
        normalise(*augment([decode(b) for b in blobs[i : i + size]]), cfg.data.augment)
    return len(blobs), time.perf_counter() - start


def bench_set(name: str, config: str, records: list[Record], args, tmp: Path, *overrides: str) -> list[dict]:
    cfg = load_config(config, [f"data.shards={tmp / name}", "train.seed=0", *overrides])
    records, _ = assign_labels(records)
    prep = cfg.data.prepare
    prep.max_side, prep.shard_size, prep.workers, prep.gallery_views = 0, 200, 2, 0
    prepare_shards({"train": records}, tmp / name, prep, progress=False)
    items = export_folder(tmp / name, tmp / f"{name}_folder")
    blobs = [p.read_bytes() for p, _ in items]
    torch.set_num_threads(1)  # DataLoader workers run single-threaded too
    rates: dict[str, list[float]] = {}
    runs: dict[str, list[tuple]] = {}  # (images, seconds[, normalising]) per epoch of the persistent loaders
    streams, folders = {}, {}
    for w in args.workers:
        cfg.data.num_workers = w
        streams[w] = TrainStream(cfg, 0, 1)  # workers start with its first epoch
        folders[w] = folder_loader(items, cfg, w, persistent=w > 0)
    for rep in range(args.repeats):
        n, dt = time_ceiling(blobs, cfg)
        rates.setdefault("ceiling", []).append(n / dt)
        n, dt = time_batched_ceiling(blobs, cfg)
        rates.setdefault("batched", []).append(n / dt)
        for w in args.workers:
            runs.setdefault(f"stream{w}", []).append(time_stream_run(streams[w], rep))
            n, dt = time_stream(cfg, w, epoch=rep)
            rates.setdefault(f"stream{w}", []).append(n / dt / w)
            runs.setdefault(f"folder{w}", []).append(time_folder(items, cfg, w, folders[w]))
            n, dt = time_folder(items, cfg, w)
            rates.setdefault(f"folder{w}", []).append(n / dt / w)
    for stream in streams.values():
        stream.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    run = {k: sum(r[0] for r in v) / sum(r[1] for r in v) for k, v in runs.items()}
    share = {k: sum(r[2] for r in v) / sum(r[1] for r in v) for k, v in runs.items() if k.startswith("stream")}
    rows = []
    for w in args.workers:
        s, f, c, cb = med[f"stream{w}"], med[f"folder{w}"], med["ceiling"], med["batched"]
        sr, fr = run[f"stream{w}"] / w, run[f"folder{w}"] / w
        rows.append(
            {
                "set": name,
                "size": f"{cfg.data.height}x{cfg.data.width}",
                "sampler": cfg.data.sampler,
                "images": len(items),
                "workers": w,
                "stream_run": sr,
                "normalise_share": share[f"stream{w}"],
                "folder_run": fr,
                "stream": s,
                "folder": f,
                "ceiling": c,
                "batched": cb,
                "run/ceiling": sr / c,
                "run/folder": sr / fr,
                "stream/ceiling": s / c,
                "stream/batched": s / cb,
                "stream/folder": s / f,
            }
        )
    return rows


def main(argv=None) -> list[dict]:
    # mars_mini has 16 training identities: P x K = 8 x 4 (the recipe's 16 x 4 would need every id in every batch)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="DataLoader workers per rank")
    parser.add_argument("--repeats", type=int, default=5, help="alternating repeats (epochs of the runs)")
    parser.add_argument("--limit", type=int, default=1600, help="images per set")
    args = parser.parse_args(argv)
    if not SHARED.is_dir():
        raise SystemExit(f"benchmark data {SHARED} is absent")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows += bench_set("mars_mini", "reid_r50ibn", person_records(args.limit), args, Path(tmp), "data.batch_size=32")
        rows += bench_set("grocery", "retr_swinb", product_records(args.limit), args, Path(tmp))
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"webdataset {webdataset.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch thread(s) in the ceiling loop"
    )
    print(
        "| set | input | sampler | images | workers | stream, run img/s/worker | folder, run img/s/worker "
        "| stream, 1 epoch | folder, 1 epoch | (b) per-image ceiling img/s | (b') batched ceiling img/s "
        "| run: stream / (b) | run: stream / folder | 1 epoch: stream / (b) | 1 epoch: stream / folder "
        "| run: normalising in the consumer |"
    )
    print("| --- | --- | --- |" + " ---: |" * 13)
    for r in rows:
        print(
            f"| {r['set']} | {r['size']} | {r['sampler']} | {r['images']} | {r['workers']} | {r['stream_run']:.0f} | "
            f"{r['folder_run']:.0f} | {r['stream']:.0f} | {r['folder']:.0f} | {r['ceiling']:.0f} | "
            f"{r['batched']:.0f} | {r['run/ceiling']:.2f} | {r['run/folder']:.2f} | {r['stream/ceiling']:.2f} | "
            f"{r['stream/folder']:.2f} | {100 * r['normalise_share']:.1f}% |"
        )
    return rows


if __name__ == "__main__":
    main()
