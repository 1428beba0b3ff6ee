"""``python -m datasets.prepare --config NAME [overrides]``: records -> ROI crops -> tar shards + manifest.json.

Crops run in a process pool but are written in record order, so re-running on the same input gives
byte-identical shards. The old manifest is removed first and the new one written last (atomically), so an
interrupted run never leaves a manifest that points at partial shards. One writer at a time holds the folder's
lock (``datasets.shardguard``; ``--wait`` to queue behind another), the set is re-verified once written, and
a complete set made from another reader or root is not overwritten without ``--replace``.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import multiprocessing as mp
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tqdm import tqdm

from configs import ExperimentConfig, PrepareConfig, load_config
from datasets.crop import CropError, CropSettings, crop_record
from datasets.records import Record, stats_table
from datasets.shardguard import ShardsBusy, check_source, describe, recorded_source, writer_lock
from datasets.shards import (
    FORMAT_VERSION,
    MANIFEST,
    ShardSink,
    read_manifest,
    remove_stale,
    verify_shards,
    write_json_atomic,
)

log = logging.getLogger(__name__)

ALWAYS_SKIPPED = ("too_small",)
"""reasons skipped whatever ``skip_bad`` says (``min_size`` is a filter, not an error)"""


def _crop_job(job: tuple[Record, CropSettings, int, int]) -> tuple:
    record, settings, views, position = job
    try:
        return ("ok", crop_record(record, settings, views, position))
    except CropError as exc:  # returned, not raised: custom exceptions do not cross the pool cleanly
        return ("err", exc.reason, exc.detail, str(exc))


def _crops(jobs: list[tuple], workers: int) -> Iterator[tuple]:
    """Crop results in job order, from a pool when ``workers > 1``."""
    if workers <= 1 or len(jobs) < 2:
        yield from map(_crop_job, jobs)
        return
    with mp.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(_crop_job, jobs, chunksize=max(1, min(32, len(jobs) // (workers * 8))))


def _json_safe(meta: Mapping) -> dict:
    return json.loads(json.dumps(dict(meta), default=str, sort_keys=True))


def _classes(records: Sequence[Record]) -> list[dict]:
    """Class table of a split: indexed by label when the split has labels, else one entry per identity."""
    names = {r.identity: r.name for r in records}
    by_label = {r.label: r.identity for r in records if r.label >= 0}
    if by_label:
        return [
            {"label": lab, "identity": by_label.get(lab, -1), "name": names.get(by_label.get(lab), "")}
            for lab in range(max(by_label) + 1)
        ]
    return [{"label": -1, "identity": pid, "name": names[pid]} for pid in sorted(names)]


def write_split(
    out_dir: Path, split: str, records: Sequence[Record], prepare: PrepareConfig, root: str, views: int, progress: bool
) -> dict:
    """Crop and shard one split; return its manifest entry."""
    if not records:
        raise ValueError(f"split {split!r} has no records: nothing to write (check the reader's root and split names)")
    settings = CropSettings(root, prepare.padding, prepare.min_size, prepare.max_side, prepare.quality)
    jobs = [(r, settings, views, pos) for pos, r in enumerate(records)]
    sink, labels, counts, skipped = ShardSink(out_dir, split, prepare.shard_size), [], Counter(), []
    bar = tqdm(total=len(jobs), desc=f"prepare {split}", unit="rec", disable=not progress)
    for record, result in zip(records, _crops(jobs, prepare.workers)):
        bar.update()
        if result[0] == "err":
            _, reason, detail, message = result
            if not (prepare.skip_bad or reason in ALWAYS_SKIPPED):
                raise ValueError(f"{split}: {message} (set data.prepare.skip_bad=true to skip and count such records)")
            skipped.append(
                {
                    "file": record.path,
                    "identity": record.identity,
                    "box": record.box,
                    "reason": reason,
                    "detail": detail,
                }
            )
            continue
        for crop in result[1]:
            meta = {
                "label": record.label,
                "identity": record.identity,
                "camera": record.camera,
                "source": record.path,
                "box": crop["box"],
                "crop_box": crop["crop_box"],
                "split": split,
                "view": crop["view"],
                "index": sink.count,
                "name": record.name,
                "meta": _json_safe(record.meta),
            }
            sink.write(crop["jpg"], meta)
            labels.append(record.label)
            counts[str(record.identity)] += 1
    bar.close()
    shards = sink.close()
    if not shards:
        raise ValueError(f"split {split!r}: all {len(records)} records were skipped ({_reasons(skipped)})")
    classes = _classes(records)
    return {
        "count": sink.count,
        "num_classes": len(classes),
        "classes": classes,
        "class_counts": dict(counts),
        "labels": labels,
        "shards": shards,
        "skipped": skipped,
        "records": len(records),
    }


def _reasons(skipped: list[dict]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(Counter(s["reason"] for s in skipped).items())) or "none"


@dataclasses.dataclass(frozen=True)
class Guard:
    """How ``prepare_shards`` treats a shards folder that another process writes or another source filled."""

    source: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """what the shards are made from (reader, absolute root), recorded in the manifest"""
    replace: bool = False
    """overwrite a complete set of another source"""
    wait_s: float = 0.0
    """how long to wait for another writer of the folder before failing"""


def prepare_shards(
    splits: Mapping[str, Sequence[Record]],
    out_dir: str | Path,
    prepare: PrepareConfig,
    root: str = "",
    gallery_split: str = "gallery",
    progress: bool = True,
    reader_skipped: Mapping[str, Sequence[str]] | None = None,
    guard: Guard | None = None,
) -> dict:
    """Write every split of ``splits`` into ``out_dir`` and return the manifest (also written, last).

    ``reader_skipped`` (reason -> records the reader left out) is recorded in the manifest as it is. The
    folder's writer lock is held throughout (``guard.wait_s``); ``guard.source`` is recorded, and a complete
    set of another source is not overwritten unless ``guard.replace``. The written set is re-verified.
    """
    out = Path(out_dir)
    guard = guard or Guard()
    for name, recs in splits.items():
        if not recs:
            raise ValueError(
                f"split {name!r} has no records: nothing to write (check the reader's root and split names)"
            )
    with writer_lock(out, guard.wait_s):
        check_source(out, complete_manifest(out), guard.source, guard.replace)
        (out / MANIFEST).unlink(missing_ok=True)  # from here on, no manifest until every shard is complete
        remove_partial(out)  # a killed writer's partial shards: on a full disk they hold the space needed now
        entries = {}
        try:
            for name, recs in splits.items():
                views = prepare.gallery_views if name == gallery_split else 0
                entries[name] = write_split(out, name, recs, prepare, root, views, progress)
        except BaseException as exc:
            remove_partial(out)  # this run's partial shard (the lock makes every temp file here ours or stale)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                free = shutil.disk_usage(out).free
                raise OSError(exc.errno, f"no space left on device while writing shards into {out} ({free:,} bytes "
                              "free there); free space and re-run datasets.prepare") from None  # fmt: skip
            raise
        keep = {s["file"] for e in entries.values() for s in e["shards"]}
        remove_stale(out, keep, list(entries))
        settings = dict(dataclasses.asdict(prepare), root=root, gallery_split=gallery_split)
        manifest = {"version": FORMAT_VERSION, "settings": settings, "splits": entries}
        if guard.source:
            manifest["source"] = dict(guard.source)
        if reader_skipped:
            manifest["reader_skipped"] = {reason: list(items) for reason, items in reader_skipped.items() if items}
        write_json_atomic(out / MANIFEST, manifest)
        reverify(out, manifest)
    return manifest


def remove_partial(out: Path) -> None:
    """Delete the temporary files of unfinished writes in ``out`` (only while holding its writer lock)."""
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def complete_manifest(out: Path) -> dict | None:
    """The folder's valid manifest, or None (none, unreadable, or being rewritten by another process)."""
    try:
        return read_manifest(out)
    except (FileNotFoundError, ValueError, ShardsBusy):
        return None


def reverify(out: Path, manifest: dict) -> None:
    """Check the manifest on disk and every shard's sha256 against what this run wrote; remove it on mismatch."""
    try:
        verify_shards(out)
        on_disk = {n: [s["sha256"] for s in e["shards"]] for n, e in read_manifest(out)["splits"].items()}
        if on_disk != {n: [s["sha256"] for s in e["shards"]] for n, e in manifest["splits"].items()}:
            raise ValueError("the manifest on disk is not the one this run wrote")
    except (FileNotFoundError, ValueError) as exc:
        (out / MANIFEST).unlink(missing_ok=True)
        raise ValueError(
            f"{out}: re-verification after writing failed ({exc}); the manifest was removed. "
            "Did another process write into this folder?"
        ) from None


def summary(manifest: dict) -> str:
    """Per-split table of what was written and skipped, plus the first skipped files."""
    lines = ["  split    | records | samples | shards | classes | skipped (reasons)"]
    for name, e in manifest["splits"].items():
        lines.append(
            f"  {name:<8} | {e['records']:7d} | {e['count']:7d} | {len(e['shards']):6d} | {e['num_classes']:7d} | "
            f"{len(e['skipped'])} ({_reasons(e['skipped'])})"
        )
    for reason, items in manifest.get("reader_skipped", {}).items():
        lines.append(f"  left out by the reader: {len(items)} x {reason} (e.g. {items[0]}; all in the manifest)")
    for name, e in manifest["splits"].items():
        for s in e["skipped"][:20]:
            lines.append(f"  skipped {name}: {s['file']} [{s['reason']}] {s['detail']}")
        if len(e["skipped"]) > 20:
            lines.append(f"  ... and {len(e['skipped']) - 20} more skipped in {name} (listed in the manifest)")
    return "\n".join(lines)


def prepare_from_config(
    cfg: ExperimentConfig,
    splits: Sequence[str] = (),
    progress: bool = True,
    show=None,
    replace: bool = False,
    wait_s: float = 0.0,
) -> dict:
    """Read ``cfg.data``'s records and write the chosen splits (default: train, query, gallery) as shards.

    ``show`` (the CLI's ``print``) receives the statistics table of what is written; the reader logs its own.
    ``replace`` allows overwriting a complete set of another source; ``wait_s`` waits for another writer.
    """
    from datasets.readers import read_records

    d = cfg.data
    guard = Guard({"reader": d.reader, "root": os.path.abspath(d.root)}, replace, wait_s)
    with writer_lock(d.shards, wait_s):  # held from before the slow reading until the manifest is verified
        check_source(d.shards, complete_manifest(Path(d.shards)), guard.source, replace)
        reader_skipped: dict[str, list[str]] = {}
        records = read_records(d, reader_skipped)
        wanted = list(splits) or [d.train_split, d.query_split, d.gallery_split]
        unknown = [s for s in wanted if s not in records]
        if unknown:
            raise ValueError(f"splits {unknown} are not produced by reader {d.reader!r} (it gives {sorted(records)})")
        chosen = {s: records[s] for s in dict.fromkeys(wanted)}
        if show is not None:
            show(stats_table(chosen, title=f"{d.reader} {d.root} (splits to write)"))
        return prepare_shards(chosen, d.shards, d.prepare, d.root, d.gallery_split, progress, reader_skipped, guard)


SAMPLE_WAIT_S = 600.0
"""how long a trainer waits for another process that prepares the embedded sample into the same folder"""


def ensure_shards(cfg: ExperimentConfig) -> dict:
    """The manifest of ``cfg.data.shards``; the embedded sample (``data.reader=sample``) is prepared when absent.

    Other readers are never prepared implicitly: a real dataset's crops take a while and belong in an
    explicit step, which the error names. Shards that another process is still writing are awaited up to
    ``data.shards_wait_s`` seconds, then an error (``ShardsBusy``) naming the folder and that process.
    """
    shards = Path(cfg.data.shards)
    if not (shards / MANIFEST).is_file() and cfg.data.reader == "sample":
        with writer_lock(shards, SAMPLE_WAIT_S, command="prepare the embedded sample"):
            if not (shards / MANIFEST).is_file():  # another process may have written it while this one waited
                log.info("no shards in %s yet: preparing the embedded sample", shards)
                manifest = prepare_from_config(cfg, progress=False)
                log.info("wrote %s/%s\n%s", shards, MANIFEST, summary(manifest))
    manifest = read_manifest(shards, cfg.data.shards_wait_s)
    warn_other_source(cfg, manifest)
    return manifest


def warn_other_source(cfg: ExperimentConfig, manifest: dict) -> None:
    """Say so when the shards were made from another reader or root than the config names (a forgotten
    ``data.shards``); not an error, because shards are often copied to where the raw data is not."""
    made = recorded_source(manifest)
    wanted = {"reader": cfg.data.reader, "root": os.path.abspath(cfg.data.root)}
    if any(made[k] != wanted[k] for k in made.keys() & wanted.keys()):
        log.warning("the shards in %s were made from %s, not from this config's %s: is data.shards right?",
                    cfg.data.shards, describe(made), describe(wanted))  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict:
    """CLI entry point; returns the manifest."""
    parser = argparse.ArgumentParser(prog="python -m datasets.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment config name (configs/NAME.py)")
    parser.add_argument("--splits", default="", help="comma-separated splits to write (default: train,query,gallery)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--replace",
        action="store_true",
        help="overwrite data.shards even when it holds a complete set made from another reader/root",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for another process writing data.shards (default: fail at once)",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, overrides)
    splits = [s for s in args.splits.split(",") if s]
    manifest = prepare_from_config(cfg, splits, not args.no_progress, print, args.replace, args.wait)
    print(f"wrote {cfg.data.shards}/{MANIFEST}\n{summary(manifest)}")
    return manifest


def cli(argv: Sequence[str] | None = None) -> int:
    """``main`` for the command line: a user error is one line on stderr and exit code 2 (``--debug``: raised)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        main(argv)
    except (ValueError, OSError, ShardsBusy) as exc:
        if "--debug" in argv:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
