"""End-to-end scores of recognition against COCO ground truth (pycocotools bbox mAP / AP50), one table:

  (a) class-agnostic boxes: does the detector find the products at all;
  (b) the detector's own classes, when it was trained per class;
  (c) detector boxes relabelled by retrieval;
  (d) ground-truth boxes relabelled by retrieval: retrieval errors without detection errors.

Plus the relabelling accuracy on matched boxes (detector boxes matched one-to-one to ground truth at IoU >= 0.5,
by score), the unknown rate, and the most-confused SKU pairs.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from inference.match import UNKNOWN

MATCH_IOU = 0.5


def ground_truth(coco: dict, image_ids, path: str | Path, bank_skus: dict[int, str]) -> dict:
    """The COCO ground truth restricted to ``image_ids``; ValueError naming ``path`` when it holds categories
    the bank does not know (their boxes could never be relabelled correctly)."""
    ids = set(image_ids)
    anns = [dict(a, id=i + 1) for i, a in enumerate(a for a in coco["annotations"] if a["image_id"] in ids)]
    unknown = sorted({a["category_id"] for a in anns} - set(bank_skus))
    if unknown:
        names = {c["id"]: c.get("name", "") for c in coco["categories"]}
        raise ValueError(
            f"{path}: ground truth has categories the gallery bank does not know: "
            f"{[(c, names.get(c, '')) for c in unknown][:10]} ({len(unknown)} in all); add them to the bank "
            "(python -m inference.gallery add) or evaluate without them"
        )
    for a in anns:
        a.setdefault("area", float(a["bbox"][2] * a["bbox"][3]))
        a.setdefault("iscrowd", 0)
    images = [im for im in coco["images"] if im["id"] in ids]
    return {"images": images, "annotations": anns, "categories": coco["categories"]}


def coco_map(gt: dict, dets: list[dict]) -> tuple[float, float]:
    """(bbox mAP@[.5:.95], AP50) through pycocotools; no detections -> (0, 0)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not dets or not gt["annotations"]:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes([{k: d[k] for k in ("image_id", "category_id", "bbox", "score")} for d in dets])
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(max(ev.stats[0], 0.0)), float(max(ev.stats[1], 0.0))


def agnostic(gt: dict, dets: list[dict]) -> tuple[dict, list[dict]]:
    """Ground truth and detections with one category, detections ranked by the detector's own score (row (a)
    judges the boxes; the combined score would let retrieval reorder them)."""
    gt1 = dict(gt, annotations=[dict(a, category_id=1) for a in gt["annotations"]],
               categories=[{"id": 1, "name": "object"}])  # fmt: skip
    return gt1, [dict(d, category_id=1, score=d.get("det_score", d["score"])) for d in dets]


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of [x, y, w, h] boxes a [N, 4] x b [M, 4]."""
    a1, b1 = a[:, None, :2], b[None, :, :2]
    a2, b2 = a1 + a[:, None, 2:], b1 + b[None, :, 2:]
    inter = np.clip(np.minimum(a2, b2) - np.maximum(a1, b1), 0, None).prod(-1)
    union = a[:, None, 2:].prod(-1) + b[None, :, 2:].prod(-1) - inter
    return inter / np.maximum(union, 1e-9)


def matched_pairs(gt: dict, dets: list[dict], iou: float = MATCH_IOU) -> list[tuple[int, int]]:
    """(ground-truth category, predicted category) of detections matched one-to-one to ground truth boxes at
    IoU >= ``iou``, highest-scored detection first (the COCO matching rule, class-agnostic)."""
    by_image: dict[int, list] = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], [[], []])[0].append(a)
    for d in dets:
        by_image.setdefault(d["image_id"], [[], []])[1].append(d)
    pairs = []
    for anns, ds in by_image.values():
        if not anns or not ds:
            continue
        ds = sorted(ds, key=lambda d: -d["score"])
        ious = iou_matrix(np.array([d["bbox"] for d in ds]), np.array([a["bbox"] for a in anns]))
        taken = np.zeros(len(anns), bool)
        for i, d in enumerate(ds):
            cand = np.where(~taken & (ious[i] >= iou))[0]
            if len(cand):
                j = cand[np.argmax(ious[i, cand])]
                taken[j] = True
                pairs.append((anns[j]["category_id"], d["category_id"]))
    return pairs


@dataclass
class Table:
    """The four rows (name -> (mAP, AP50) or None = not applicable) and the relabelling figures."""

    rows: dict[str, tuple[float, float] | None]
    accuracy: dict[str, float | None] = field(default_factory=dict)
    unknown_rate: dict[str, float | None] = field(default_factory=dict)
    confused: list[tuple[str, str, int]] = field(default_factory=list)

    def format(self) -> str:
        lines = ["| row | boxes | labels | bbox mAP | AP50 |", "| --- | --- | --- | ---: | ---: |"]
        what = {"a": ("detector", "one class"), "b": ("detector", "detector's classes"),
                "c": ("detector", "retrieval"), "d": ("ground truth", "retrieval")}  # fmt: skip
        for key, value in self.rows.items():
            figs = "n/a | n/a" if value is None else f"{value[0]:.3f} | {value[1]:.3f}"
            lines.append(f"| ({key}) | {what[key][0]} | {what[key][1]} | {figs} |")
        for name in self.accuracy:
            acc, unk = self.accuracy[name], self.unknown_rate.get(name)
            lines.append(f"relabel accuracy on {name} boxes: {_pct(acc)}; unknown rate {_pct(unk)}")
        if self.confused:
            lines.append("most confused (truth -> predicted: boxes): " +
                         "; ".join(f"{t} -> {p}: {n}" for t, p, n in self.confused))  # fmt: skip
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"rows": self.rows, "accuracy": self.accuracy, "unknown_rate": self.unknown_rate,
                "confused": self.confused}  # fmt: skip


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def relabel_figures(gt: dict, dets: list[dict]) -> tuple[float | None, float | None, Counter]:
    """(accuracy on matched boxes, unknown rate over all boxes, Counter of wrong (truth, predicted) pairs)."""
    pairs = matched_pairs(gt, dets)
    acc = sum(t == p for t, p in pairs) / len(pairs) if pairs else None
    unknown = sum(d["category_id"] == UNKNOWN for d in dets) / len(dets) if dets else None
    return acc, unknown, Counter((t, p) for t, p in pairs if t != p)


def evaluate(gt: dict, det_results: list[dict] | None, gt_results: list[dict] | None,
             det_classes: dict[int, int] | None = None, top_confused: int = 5) -> Table:  # fmt: skip
    """Rows (a)-(d). ``det_results``: recognition on detector boxes (None = no detector run);
    ``gt_results``: on ground-truth boxes; ``det_classes``: detector class index -> category id (per-class
    detectors only)."""
    rows: dict[str, tuple[float, float] | None] = dict.fromkeys("abcd")
    table = Table(rows)
    confused: Counter = Counter()
    if det_results is not None:
        rows["a"] = coco_map(*agnostic(gt, det_results))
        if det_classes:
            own = [dict(d, category_id=det_classes[d["det_label"]], score=d["det_score"]) for d in det_results]
            rows["b"] = coco_map(gt, own)
        rows["c"] = coco_map(gt, [d for d in det_results if d["category_id"] != UNKNOWN])
        acc, unk, wrong = relabel_figures(gt, det_results)
        table.accuracy["detector"], table.unknown_rate["detector"] = acc, unk
        confused = wrong
    if gt_results is not None:
        rows["d"] = coco_map(gt, [d for d in gt_results if d["category_id"] != UNKNOWN])
        acc, unk, wrong = relabel_figures(gt, gt_results)
        table.accuracy["ground-truth"], table.unknown_rate["ground-truth"] = acc, unk
        confused = wrong  # ground-truth boxes isolate retrieval's own confusions
    names = {c["id"]: str(c.get("name", c["id"])) for c in gt["categories"]} | {UNKNOWN: "unknown"}
    table.confused = [
        (names.get(t, str(t)), names.get(p, str(p)), n) for (t, p), n in confused.most_common(top_confused)
    ]
    return table
