"""Recognition end to end: detect (batched), crop each box as training did, embed, search the gallery bank,
relabel each box with its best match. Output: COCO results (one dict per box, plus top-k alternatives).

The library takes the detector as an object (``Detector``: RGB arrays in, boxes out), so it needs no
detection framework. ``python -m inference.recognize`` runs it on ground-truth boxes (``--boxes gt``) or
whole images (``--boxes whole``); ``python -m trainers.recognize`` is the same command with a trained
mmdetection detector (``--detector CKPT --det-config NAME``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from datasets.crop import CropError, CropSettings, UnsupportedImage, to_rgb
from inference.bankstore import BankVersion
from inference.crops import crop_box
from inference.match import MatchOptions, combined_score, match
from inference.retriever import Retriever

log = logging.getLogger(__name__)


@dataclass
class Detections:
    """Boxes of one image: ``boxes`` [N, 4] x1, y1, x2, y2 (pixels), ``scores`` [N], ``labels`` [N] (the
    detector's own class index)."""

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


Detector = Callable[[list[np.ndarray]], list[Detections]]
"""RGB uint8 images [H, W, 3] in, one Detections per image out. May carry ``classes`` (its class names)."""


@dataclass
class QueryImage:
    """One query image; ``boxes`` are its ground-truth [x, y, w, h] when known."""

    image_id: int
    path: Path
    boxes: list[list[float]] = field(default_factory=list)


@dataclass
class Run:
    """What a recognition pass returns: COCO results, skipped images, timings."""

    results: list[dict]
    image_ids: list[int]
    skipped: list[str]
    seconds: dict[str, float]
    dropped_boxes: list[str] = field(default_factory=list)
    """boxes that give no crop (under ``min_size`` or outside the image), one reason each"""

    @property
    def images(self) -> int:
        return len(self.image_ids)

    def summary(self) -> str:
        total = self.seconds["total"]
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items() if k != "total")
        return (f"recognised {self.images} images ({len(self.results)} boxes, {len(self.skipped)} skipped, "
                f"{len(self.dropped_boxes)} boxes too small or outside the image dropped) in "
                f"{total:.1f} s: {self.images / max(total, 1e-9):.2f} images/s ({parts})")  # fmt: skip


def read_queries(source: str | Path, image_root: str | Path | None = None, split: str | None = None):
    """Query images of a folder (ids 1..N by sorted name) or a COCO file (its ids and boxes; ``split`` 'test'
    or 'train' keeps the retail reader's held-out or training scenes). Returns (images, COCO dict or None)."""
    from datasets.coco import index_by_id, is_held_out, load_json
    from datasets.records import list_images

    src = Path(source)
    if src.is_dir():
        files = list_images(src)
        if not files:
            raise ValueError(f"--images {src}: no image files")
        return [QueryImage(i + 1, p) for i, p in enumerate(files)], None
    coco = load_json(src)
    root = (
        Path(image_root) if image_root else (src.parent / "images" if (src.parent / "images").is_dir() else src.parent)
    )
    images = index_by_id(coco["images"], "image", src)
    if split is not None:
        images = {i: im for i, im in images.items() if is_held_out(im, src) == (split == "test")}
    if not images:
        raise ValueError(f"{src}: no images (split {split!r})")
    out = {i: QueryImage(i, root / str(im.get("file_name", ""))) for i, im in images.items()}
    for ann in coco["annotations"]:
        if ann.get("image_id") in out:
            out[ann["image_id"]].boxes.append([float(v) for v in ann["bbox"]])
    return list(out.values()), coco


def load_rgb(path: Path) -> Image.Image:
    """Fully decoded RGB image as the gallery's and training's crops saw theirs (``datasets.crop.to_rgb``: EXIF
    orientation, 16-bit scaling, alpha); OSError-family problems become a ValueError naming the file."""
    try:
        with Image.open(path) as img:
            img.load()
            return to_rgb(img)
    except (OSError, SyntaxError, ValueError, UnsupportedImage, Image.DecompressionBombError) as exc:
        raise ValueError(f"query image {path} cannot be read: {exc}") from None


def _boxes(batch: list[tuple[QueryImage, Image.Image]], boxes: str, detector: Detector | None) -> list[Detections]:
    if boxes == "detector":
        return detector([np.asarray(img) for _, img in batch])
    out = []
    for q, img in batch:
        xywh = np.array(q.boxes if boxes == "gt" else [[0, 0, img.width, img.height]], dtype=np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        out.append(Detections(xyxy, np.ones(len(xyxy)), np.full(len(xyxy), -1)))
    return out


def recognize(
    queries: Sequence[QueryImage],
    retriever: Retriever,
    bank: BankVersion,
    opts: MatchOptions,
    boxes: str = "detector",
    detector: Detector | None = None,
    batch_images: int = 4,
    progress: bool = True,
) -> Run:
    """Relabel every box of ``queries`` (from ``detector``, the ground truth ``gt`` or the ``whole`` image)."""
    if boxes not in ("detector", "gt", "whole"):
        raise ValueError(f"boxes={boxes!r}: choose detector, gt or whole")
    if boxes == "detector" and detector is None:
        raise ValueError("boxes='detector' needs a detector")
    bank.check_retriever(retriever.fingerprint)
    settings = CropSettings(**bank.meta["crop"])
    results, done, skipped, dropped = [], [], [], []
    seconds = dict.fromkeys(("read", "detect", "embed", "match"), 0.0)
    start = time.perf_counter()
    bar = tqdm(total=len(queries), desc="recognise", unit="img", disable=not progress)
    for s in range(0, len(queries), batch_images):
        t = time.perf_counter()
        batch = []
        for q in queries[s : s + batch_images]:
            try:
                batch.append((q, load_rgb(q.path)))
                done.append(q.image_id)
            except ValueError as exc:
                skipped.append(str(exc))
                log.warning("skipped: %s", exc)
        seconds["read"] += time.perf_counter() - t
        if batch:
            results += _recognise_batch(batch, boxes, detector, retriever, bank, settings, opts, seconds, dropped)
        bar.update(len(queries[s : s + batch_images]))
    bar.close()
    seconds["total"] = time.perf_counter() - start
    if dropped:
        log.warning("dropped %d box(es) that give no crop, e.g. %s", len(dropped), dropped[0])
    return Run(results, done, skipped, seconds, dropped)


def _recognise_batch(batch, boxes, detector, retriever, bank, settings, opts, seconds, dropped) -> list[dict]:
    t = time.perf_counter()
    dets = _boxes(batch, boxes, detector)
    seconds["detect"] += time.perf_counter() - t
    t = time.perf_counter()
    crops, owners = [], []
    for (q, img), d in zip(batch, dets):
        for j, (x1, y1, x2, y2) in enumerate(np.asarray(d.boxes, dtype=np.float64).reshape(-1, 4)):
            box = [x1, y1, x2 - x1, y2 - y1]
            try:
                crops.append(crop_box(img, box, settings, name=str(q.path)))
            except CropError as exc:  # under min_size or outside the image: not a product crop (counted)
                dropped.append(f"image {q.image_id} box {[round(float(v), 1) for v in box]}: {exc}")
                continue
            owners.append((q.image_id, box, float(d.scores[j]), int(d.labels[j])))
    feats = retriever.embed(crops)
    seconds["embed"] += time.perf_counter() - t
    t = time.perf_counter()
    matches = match(bank.bank, feats, opts)
    seconds["match"] += time.perf_counter() - t
    out = []
    for (image_id, box, det_score, det_label), m in zip(owners, matches):
        best = bank.items[m["index"]]
        alts = [dict(a, name=bank.items[a.pop("index")]["name"]) for a in m["alternatives"]]
        out.append({
            "image_id": image_id,
            "bbox": [round(float(v), 2) for v in box],
            "category_id": m["category_id"],
            "score": round(combined_score(det_score, m["similarity"]), 5),
            "det_score": round(det_score, 5),
            "det_label": det_label,
            "similarity": m["similarity"],
            "match": {"source": best["source"], "box": best["box"], "view": best["view"], "name": best["name"]},
            "alternatives": alts,
        })  # fmt: skip
    return out


def write_results(results: list[dict], path: str | Path) -> None:
    """COCO results json, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(results))
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m inference.recognize", description=__doc__.splitlines()[0])
    parser.add_argument("--retriever", required=True, help="retrieval checkpoint (.pth) or exported .onnx")
    parser.add_argument("--config", default=None, help="retriever config name (default: config.json beside it)")
    parser.add_argument("--bank", required=True, help="gallery bank folder (python -m inference.gallery build)")
    parser.add_argument("--images", required=True, help="a folder of query images or a COCO file of them")
    parser.add_argument("--image-root", default=None, help="images of a COCO --images file (default: images/)")
    parser.add_argument("--split", default=None, choices=["train", "test"], help="COCO scenes: held-out or train")
    parser.add_argument("--out", required=True, help="COCO results json")
    parser.add_argument("--detector", default=None, help="detector checkpoint (python -m trainers.recognize)")
    parser.add_argument("--det-config", default=None, help="detector config name (det_demo, ...)")
    parser.add_argument("--det-score", type=float, default=0.3, help="detections below this score are dropped")
    parser.add_argument("--boxes", default=None, choices=["gt", "whole"], help="without a detector: which boxes")
    parser.add_argument("--eval", default=None, help="COCO ground truth: print the (a)-(d) table")
    parser.add_argument("--topk", type=int, default=5, help="alternatives kept per box (distinct SKUs)")
    parser.add_argument("--unknown-threshold", type=float, default=None, help="cosine below which a box is unknown")
    parser.add_argument("--qe", type=int, default=0, help="alpha query expansion with K bank neighbours (0 = off)")
    parser.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking against the bank")
    parser.add_argument(
        "--rerank-exact-max",
        type=int,
        default=10000,
        help="a bank of up to N rows is re-ranked whole with the batch, a larger one per query",
    )
    parser.add_argument("--rerank-shortlist", type=int, default=1000,
                        help="rows re-ranked per query (its nearest) in a bank above --rerank-exact-max")  # fmt: skip
    parser.add_argument("--pictures", type=int, default=8, help="draw the first N images (0 = none)")
    parser.add_argument("--tb", default=None, help="TensorBoard folder for the pictures (default: beside --out)")
    parser.add_argument("--batch-images", type=int, default=4, help="images per detector batch")
    parser.add_argument("--batch-size", type=int, default=64, help="crops per embedding batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None, detector_factory: Callable | None = None) -> int:
    """CLI; ``detector_factory(args)`` builds the detector for ``--detector`` (given by trainers.recognize)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_cli(args, detector_factory)
    except (FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2


def run_cli(args, detector_factory: Callable | None = None) -> int:
    from inference.bankstore import read_version
    from inference.retriever import load_retriever

    if args.detector and detector_factory is None:
        raise ValueError("--detector needs mmdetection: run `python -m trainers.recognize` with the same arguments")
    if not args.detector and not args.boxes:
        raise ValueError("give --detector CKPT --det-config NAME, or --boxes gt|whole")
    if (args.eval or args.boxes == "gt") and Path(args.images).is_dir():
        raise ValueError("--eval and --boxes gt need --images as the COCO file of the images (their ids and boxes)")
    retriever = load_retriever(args.retriever, args.config, device=args.device, batch_size=args.batch_size)
    bank = read_version(args.bank)
    queries, _ = read_queries(args.images, args.image_root, args.split)
    opts = MatchOptions(args.topk, args.unknown_threshold, args.qe, args.rerank, args.rerank_exact_max,
                        args.rerank_shortlist)  # fmt: skip
    detector = detector_factory(args) if args.detector else None
    boxes = "detector" if detector is not None else args.boxes
    run = recognize(queries, retriever, bank, opts, boxes, detector, args.batch_images, not args.no_progress)
    write_results(run.results, args.out)
    log.info("%s", run.summary())
    print(run.summary())
    out = Path(args.out)
    if args.pictures:
        from inference.draw import write_pictures

        tb = args.tb or out.with_name(out.stem + "_tb")
        write_pictures(queries, run.results, CropSettings(**bank.meta["crop"]), out.with_name(out.stem + "_pictures"),
                       tb, args.pictures)  # fmt: skip
    if args.eval:
        table = evaluate_cli(args, run, boxes, detector, retriever, bank, opts)
        print(table.format())
        write_results(table.as_dict(), out.with_name(out.stem + "_eval.json"))
    return 0


def evaluate_cli(args, run: Run, boxes: str, detector, retriever, bank, opts):
    """The (a)-(d) table: this run's boxes, plus a ground-truth-box pass for row (d) when needed."""
    from inference.e2e_eval import evaluate, ground_truth

    gt_queries, gt_coco = read_queries(args.eval, args.image_root, None)
    if gt_coco is None:
        raise ValueError(f"--eval {args.eval}: expected a COCO annotation file")
    gt = ground_truth(gt_coco, run.image_ids, args.eval, bank.skus())
    det_results = run.results if boxes == "detector" else None
    if boxes == "gt":
        gt_results = run.results
    else:
        ids = set(run.image_ids)
        subset = [q for q in gt_queries if q.image_id in ids]
        gt_results = recognize(subset, retriever, bank, opts, "gt", None, args.batch_images, False).results
    det_classes = None
    classes = list(getattr(detector, "classes", None) or [])
    if len(classes) > 1:
        by_name = {str(c["name"]): c["id"] for c in gt["categories"]}
        missing = [c for c in classes if c not in by_name]
        if missing:
            raise ValueError(f"--eval {args.eval}: detector classes {missing[:5]} are not categories of the file")
        det_classes = {i: by_name[c] for i, c in enumerate(classes)}
    return evaluate(gt, det_results, gt_results, det_classes)


if __name__ == "__main__":
    raise SystemExit(main())
