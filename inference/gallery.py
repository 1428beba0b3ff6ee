"""The gallery bank as a managed artefact: ``python -m inference.gallery build|add|remove|info ...``.

``build`` crops the product library by its annotations (training's padding and size), adds augmented views,
embeds in batches, fits the post-processing (L2, optional PCA-whitening) and indexes with faiss. ``add`` and
``remove`` change SKUs or single images without re-embedding the rest (the fitted post-processing is kept).
Every change is a new version (``inference.bankstore``); the bank records the model that made it.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from datasets.crop import CropError, CropSettings, load_image
from datasets.records import Record
from inference.bank import GalleryBank
from inference.bankstore import (
    BankVersion,
    add_rows,
    index_note,
    keep_rows,
    read_version,
    write_version,
    writer_lock,
)
from inference.crops import ViewConfig, crop_settings, gallery_views
from inference.postprocess import PostProcess
from inference.retriever import Retriever, load_retriever

log = logging.getLogger(__name__)

CHUNK = 64  # library records cropped per step: memory holds one chunk of crops, never the whole library


def embed_records(records: Sequence[Record], retriever: Retriever, settings: CropSettings, views: ViewConfig,
                  progress: bool = True) -> tuple[torch.Tensor, list[dict], list[str]]:  # fmt: skip
    """Raw embeddings [N, D] of every record's crop and views, their item dicts, and the skipped records
    (unreadable images, degenerate boxes: counted and reported, the rest goes on)."""
    feats, items, skipped = [], [], []
    bar = tqdm(total=len(records), desc="gallery", unit="img", disable=not progress)
    for s in range(0, len(records), CHUNK):
        crops = []
        for rec in records[s : s + CHUNK]:
            try:
                img = load_image(rec, settings.root)
                for view, crop in gallery_views(img, rec.box, settings, views, rec.path):
                    crops.append(crop)
                    box = None if rec.box is None else [float(v) for v in rec.box]
                    items.append({"identity": rec.identity, "name": rec.name, "source": rec.path, "box": box,
                                  "view": view})  # fmt: skip
            except CropError as exc:
                skipped.append(str(exc))
        if crops:
            feats.append(retriever.embed(crops))
        bar.update(min(CHUNK, len(records) - s))
    bar.close()
    if skipped:
        log.warning("skipped %d library record(s), e.g. %s", len(skipped), skipped[0])
    dim = retriever.fingerprint.dim
    return (torch.cat(feats) if feats else torch.zeros(0, dim)), items, skipped


def _bank_rows(feats: torch.Tensor, items: list[dict]) -> dict:
    ids = [int(it["identity"]) for it in items]
    return {"labels": ids, "identities": ids, "sources": [it["source"] for it in items]}


def build(
    records: Sequence[Record],
    retriever: Retriever,
    root: str | Path,
    views: ViewConfig = ViewConfig(),
    pca_dim: int = 0,
    whiten: bool = False,
    index: str = "auto",
    progress: bool = True,
) -> BankVersion:
    """Build a bank from library records and write it as the next version of ``root``."""
    if not records:
        raise ValueError("the library has no records: an empty gallery bank cannot recognise anything")
    settings = crop_settings(retriever.cfg.data.prepare)
    start = time.perf_counter()
    feats, items, skipped = embed_records(records, retriever, settings, views, progress)
    if not items:
        raise ValueError(f"all {len(records)} library records were skipped (e.g. {skipped[0]}): empty bank")
    post = PostProcess.fit(feats, normalize=True, pca_dim=pca_dim, whiten=whiten)
    bank = GalleryBank.build(feats, postprocess=post, **_bank_rows(feats, items))
    kind = index if index != "auto" else ("flat" if len(bank) <= 100_000 else "ivf")
    bank.build_index(kind)
    meta = {
        "fingerprint": asdict(retriever.fingerprint),
        "retriever": retriever.source,
        "postprocess": {"normalize": True, "pca_dim": pca_dim, "whiten": whiten, "fitted_on": len(items)},
        "index": kind,
        "views": asdict(views),
        "crop": asdict(settings),
        "history": [_event("build", len(items), skipped, start)],
    }
    entry = BankVersion(bank, items, meta)
    with writer_lock(root):
        write_version(root, entry)
    return entry


def _event(op: str, count: int, skipped: list[str], start: float, **extra) -> dict:
    return {"op": op, "items": count, "skipped": len(skipped), "seconds": round(time.perf_counter() - start, 2),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}  # fmt: skip


def add(root: str | Path, records: Sequence[Record], retriever: Retriever, progress: bool = True) -> BankVersion:
    """Embed only ``records`` (with the bank's views) and write bank + them as a new version."""
    with writer_lock(root):
        return _add(root, records, retriever, progress)


def _add(root, records, retriever, progress) -> BankVersion:
    old = read_version(root)
    old.check_retriever(retriever.fingerprint)
    if not records:
        raise ValueError("nothing to add: no library records were given")
    start = time.perf_counter()
    views = ViewConfig(**{**old.meta["views"], "scales": tuple(old.meta["views"]["scales"])})
    settings = CropSettings(**old.meta["crop"])  # the bank's own crops (data.prepare is not in the fingerprint)
    feats, items, skipped = embed_records(records, retriever, settings, views, progress)
    if not items:
        raise ValueError(f"all {len(records)} records to add were skipped (e.g. {skipped[0]})")
    rows = _bank_rows(feats, items)
    bank = add_rows(old.bank, feats, rows["labels"], rows["identities"], rows["sources"])
    meta = dict(old.meta, history=[*old.meta["history"], _event("add", len(items), skipped, start)])
    entry = BankVersion(bank, old.items + items, meta)
    write_version(root, entry)
    return entry


def remove(root: str | Path, skus: Iterable[int] = (), sources: Iterable[str] = ()) -> BankVersion:
    """Drop every row of the given SKUs and/or source images and write the rest as a new version."""
    with writer_lock(root):
        return _remove(root, skus, sources)


def _remove(root, skus, sources) -> BankVersion:
    old = read_version(root)
    skus, sources = [int(s) for s in skus], [str(s) for s in sources]
    if not skus and not sources:
        raise ValueError("remove: name at least one --sku or --source")
    known, known_src = old.skus(), {it["source"] for it in old.items}
    missing = [s for s in skus if s not in known] + [s for s in sources if s not in known_src]
    if missing:
        raise ValueError(f"remove: {missing} not in gallery bank {old.path} ({len(known)} SKUs: {sorted(known)[:20]})")
    drop_ids, drop_src = set(skus), set(sources)
    keep = np.array([it["identity"] not in drop_ids and it["source"] not in drop_src for it in old.items])
    if not keep.any():
        raise ValueError(f"remove: that would leave gallery bank {old.path} empty; build a new bank instead")
    start = time.perf_counter()
    bank = keep_rows(old.bank, keep, old.meta["index"])
    items = [it for it, k in zip(old.items, keep) if k]
    event = _event("remove", int((~keep).sum()), [], start, skus=skus, sources=sources)
    entry = BankVersion(bank, items, dict(old.meta, history=[*old.meta["history"], event]))
    write_version(root, entry)
    return entry


def info(root: str | Path, version: int | None = None) -> str:
    """A readable summary of a bank version."""
    entry = read_version(root, version)
    m, views = entry.meta, Counter(it["view"] for it in entry.items)
    post = m["postprocess"]
    pca = f"PCA to {post['pca_dim']}{' + whitening' if post['whiten'] else ''}" if post["pca_dim"] else "no PCA"
    lines = [
        f"gallery bank {root}: version {entry.version} ({entry.path.name}), {len(entry.bank)} items, "
        f"{len(entry.skus())} SKUs, {len({it['source'] for it in entry.items})} source images",
        f"  model: {entry.fingerprint.describe()} ({m['retriever']})",
        f"  post-processing: L2, {pca}, fitted on {post['fitted_on']} items at build (kept on add/remove)",
        f"  index: {m['index']}: {index_note(m['index'])}",
        f"  views: {dict(views)}",
        f"  crop: padding {m['crop']['padding']}, max side {m['crop']['max_side']}, min size {m['crop']['min_size']}",
    ]
    lines += [f"  history: {e['time']} {e['op']} {e['items']} items ({e['skipped']} skipped, {e['seconds']} s)"
              for e in m["history"]]  # fmt: skip
    return "\n".join(lines)


def library_records(args, retriever: Retriever) -> list[Record]:
    """Records from ``--ann`` (COCO boxes), ``--images DIR --sku ID`` (whole images) or the run's data config."""
    if args.ann:
        return coco_records(Path(args.ann), Path(args.image_root) if args.image_root else None)
    if args.images:
        if args.sku is None or len(args.sku) != 1:
            raise ValueError("--images DIR needs exactly one --sku ID (the SKU these whole images show)")
        from datasets.records import list_images

        folder = Path(args.images)
        if not folder.is_dir():
            raise FileNotFoundError(f"--images {folder} is not a directory")
        name = args.name or str(args.sku[0])
        return [Record(str(p), args.sku[0], name=name) for p in list_images(folder)]
    from datasets.readers import read_records

    data = retriever.cfg.data
    return read_records(data)[data.gallery_split]


def coco_records(ann: Path, image_root: Path | None) -> list[Record]:
    """One record per box of a COCO library file (``category_id`` = SKU), images under ``image_root``."""
    from datasets.coco import load_json, merge_categories, read_boxes

    coco = load_json(ann)
    root = image_root or (ann.parent / "images" if (ann.parent / "images").is_dir() else ann.parent)
    skipped: dict[str, list[str]] = defaultdict(list)
    records = [r for r, _ in read_boxes(ann, coco, root, merge_categories([(ann, coco)]), skipped)]
    for reason, items in skipped.items():
        log.warning("%s: skipped %d box(es): %s (e.g. %s)", ann, len(items), reason, items[0])
    return records


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.gallery", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("build", "add", "remove", "info"):
        p = sub.add_parser(name)
        p.add_argument("--bank", required=True, help="bank folder (versions + CURRENT)")
        if name in ("build", "add"):
            p.add_argument("--retriever", required=True, help="retrieval checkpoint (.pth) or exported .onnx")
            p.add_argument("--config", default=None, help="its config name (default: config.json beside it)")
            p.add_argument("--ann", default=None, help="COCO library file (boxes; category_id = SKU)")
            p.add_argument("--image-root", default=None, help="images of --ann (default: its images/ folder)")
            p.add_argument("--images", default=None, help="a folder of whole images of one SKU (with --sku)")
            p.add_argument("--name", default=None, help="SKU name for --images")
            p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
            p.add_argument("--batch-size", type=int, default=64)
        if name == "build":
            p.add_argument("--views", default="", help="augmented views, e.g. flip,scale=0.9:1.1,light=2")
            p.add_argument("--pca", type=int, default=0, help="PCA dimension fitted on the bank (0 = none)")
            p.add_argument("--whiten", action="store_true", help="PCA-whitening")
            p.add_argument("--index", default="auto", choices=["auto", "flat", "ivf", "hnsw"])
        if name in ("build", "add", "remove"):
            p.add_argument("--sku", type=int, action="append", help="SKU (category id); repeat for several")
        if name == "remove":
            p.add_argument("--source", action="append", default=[], help="a library image path to drop")
        if name == "info":
            p.add_argument("--version", type=int, default=None)
        p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (FileNotFoundError, ValueError, CropError) as exc:
        log.error("%s", exc)
        return 2


def _run(args) -> int:
    if args.command in ("build", "add"):
        retriever = load_retriever(args.retriever, args.config, device=args.device, batch_size=args.batch_size)
        records = library_records(args, retriever)
        start = time.perf_counter()
        if args.command == "build":
            views = ViewConfig.parse(args.views)
            build(records, retriever, args.bank, views, args.pca, args.whiten, args.index, not args.no_progress)
        else:
            add(args.bank, records, retriever, not args.no_progress)
        took = time.perf_counter() - start
        log.info("%s: %d library images in %.1f s (%.1f images/s)", args.command, len(records), took,
                 len(records) / max(took, 1e-9))  # fmt: skip
    elif args.command == "remove":
        remove(args.bank, args.sku or (), args.source)
    print(info(args.bank, getattr(args, "version", None)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
