"""The recogniser: detector boxes (a stand-in detector object) or ground-truth boxes -> crops -> bank -> relabel,
the (a)-(d) evaluation table, open set, QE / re-ranking, pictures, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from inference import gallery, recognize
from inference.bankstore import read_version
from inference.crops import ViewConfig
from inference.e2e_eval import evaluate, ground_truth, matched_pairs
from inference.match import UNKNOWN, MatchOptions, combined_score
from inference.retriever import load_retriever
from tests.recognition_helpers import library, make_retriever_run

pytest.importorskip("pycocotools")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from datasets.sample import ensure_sample

    root = Path(ensure_sample(tmp_path_factory.mktemp("sample") / "retail"))
    folder = tmp_path_factory.mktemp("recog")
    ckpt = make_retriever_run(folder / "run", root)
    retriever = load_retriever(ckpt)
    gallery.build(library(root), retriever, folder / "bank", ViewConfig(flip=True), progress=False)
    queries, coco = recognize.read_queries(root / "query.json", split="test")
    return {"root": root, "ckpt": ckpt, "retriever": retriever, "bank": read_version(folder / "bank"),
            "queries": queries[:6], "coco": coco, "folder": folder}  # fmt: skip


class TruthDetector:
    """Stand-in for a trained per-class detector: the ground-truth boxes of each image, in call order."""

    def __init__(self, queries, coco) -> None:
        self.boxes = [q.boxes for q in queries]
        cats = sorted(coco["categories"], key=lambda c: c["id"])
        self.classes = [c["name"] for c in cats]
        self.label = {q.image_id: [] for q in queries}
        for ann in coco["annotations"]:
            if ann["image_id"] in self.label:
                self.label[ann["image_id"]].append([c["id"] for c in cats].index(ann["category_id"]))
        self.order = [q.image_id for q in queries]
        self.calls = []

    def __call__(self, images):
        self.calls.append(len(images))
        out = []
        for _ in images:
            image_id = self.order.pop(0)
            xywh = np.array(self.boxes.pop(0), dtype=float).reshape(-1, 4)
            xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
            out.append(recognize.Detections(xyxy, np.full(len(xyxy), 0.9), np.array(self.label[image_id])))
        return out


def test_detector_boxes_are_relabelled_and_scored(setup):
    s = setup
    det = TruthDetector(s["queries"], s["coco"])
    run = recognize.recognize(s["queries"], s["retriever"], s["bank"], MatchOptions(topk=3), "detector", det,
                              batch_images=4, progress=False)  # fmt: skip
    assert det.calls == [4, 2]  # batched detection
    assert run.images == 6 and len(run.results) == sum(len(q.boxes) for q in s["queries"])
    r = run.results[0]
    assert r["score"] == pytest.approx(combined_score(0.9, r["similarity"]), abs=1e-4)
    assert len(r["alternatives"]) == 3 and len({a["category_id"] for a in r["alternatives"]}) == 3
    assert r["alternatives"][0]["similarity"] >= r["alternatives"][-1]["similarity"]
    gt = ground_truth(s["coco"], run.image_ids, "query.json", s["bank"].skus())
    gt_run = recognize.recognize(s["queries"], s["retriever"], s["bank"], MatchOptions(), "gt", progress=False)
    table = evaluate(gt, run.results, gt_run.results, {i: i + 1 for i in range(24)})
    assert table.rows["a"] == pytest.approx((1.0, 1.0))  # the truth's own boxes, whatever their labels
    assert table.rows["b"] == pytest.approx((1.0, 1.0))  # ... and the truth's own classes
    acc = table.accuracy["ground-truth"]
    assert table.accuracy["detector"] == pytest.approx(acc)  # same boxes, same crops, same labels
    assert table.rows["c"][1] <= 1.0 and 0.0 < acc <= 1.0
    pairs = matched_pairs(gt, gt_run.results)
    assert sum(t != p for t, p in pairs) == sum(n for _, _, n in table.confused) or len(table.confused) == 5
    assert "| (d) | ground truth | retrieval |" in table.format()


def test_open_set_threshold_qe_and_rerank(setup):
    s = setup
    closed = recognize.recognize(s["queries"], s["retriever"], s["bank"], MatchOptions(), "gt", progress=False)
    opts = MatchOptions(unknown_threshold=1.0)  # nothing is that similar: all unknown
    run = recognize.recognize(s["queries"], s["retriever"], s["bank"], opts, "gt", progress=False)
    assert {r["category_id"] for r in run.results} == {UNKNOWN}
    assert [r["alternatives"][0] for r in run.results] == [r["alternatives"][0] for r in closed.results]
    for opts in (MatchOptions(query_expansion=3), MatchOptions(rerank=True)):
        other = recognize.recognize(s["queries"], s["retriever"], s["bank"], opts, "gt", progress=False)
        agree = np.mean([a["category_id"] == b["category_id"] for a, b in zip(closed.results, other.results)])
        assert len(other.results) == len(closed.results) and agree > 0.5
    with pytest.raises(ValueError, match="cosine similarity in"):
        MatchOptions(unknown_threshold=1.5)


def test_query_expansion_and_rerank_do_not_inflate_the_open_set_similarity():
    import torch

    from inference.bank import GalleryBank
    from inference.match import match

    eye = torch.eye(8)
    bank = GalleryBank.build(eye[:3].repeat(3, 1), identities=[1, 2, 3] * 3)  # 3 SKUs, 3 rows each
    query = torch.tensor([[0.5, 0.0, 0.0, 0.866, 0.0, 0.0, 0.0, 0.0]])  # cosine 0.5 to SKU 1, a new product
    for opts in (MatchOptions(unknown_threshold=0.55, query_expansion=3),
                 MatchOptions(unknown_threshold=0.55, query_expansion=3, rerank=True)):  # fmt: skip
        (m,) = match(bank, query, opts)
        assert m["similarity"] == pytest.approx(0.5, abs=1e-3)  # the crop's own cosine, as the docs say
        assert m["category_id"] == UNKNOWN and m["alternatives"][0]["category_id"] == 1


def _count_reranks(monkeypatch) -> list[int]:
    """The gallery size of every re-ranking ``inference.match`` runs from now on (it still runs them)."""
    import inference.match as matching

    galleries, real = [], matching.k_reciprocal_rerank
    monkeypatch.setattr(
        matching, "k_reciprocal_rerank", lambda q, g, **kw: galleries.append(len(g)) or real(q, g, **kw)
    )
    return galleries


def test_a_large_bank_is_reranked_per_query_among_its_shortlist(monkeypatch):
    import torch

    import inference.match as matching
    from inference.bank import GalleryBank

    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(40, 32, generator=gen)
    views = centres.repeat_interleave(15, 0) + 0.35 * torch.randn(600, 32, generator=gen)  # 40 SKUs x 15 views
    skus = torch.arange(40).repeat_interleave(15).tolist()
    truth = torch.randint(0, 40, (24,), generator=gen)
    queries = centres[truth] + 0.35 * torch.randn(24, 32, generator=gen)
    bank = GalleryBank.build(views, identities=skus)
    whole = matching.match(bank, queries, MatchOptions(rerank=True))  # 600 rows: re-ranked whole
    galleries = _count_reranks(monkeypatch)
    per_query = MatchOptions(rerank=True, rerank_exact_max=599, rerank_shortlist=150)
    short = matching.match(bank, queries, per_query)
    assert galleries == [150] * 24  # one re-ranking per query, among its 150 nearest rows, not the 600
    nearest = set(bank.search(queries[:1], 150)[1][0].tolist())
    assert {a["index"] for a in short[0]["alternatives"]} <= nearest
    agree = np.mean([a["category_id"] == b["category_id"] for a, b in zip(whole, short)])
    assert agree >= 0.9, agree  # the k1=20 neighbourhoods lie inside the shortlist: the same answers, nearly all
    assert np.mean([r["category_id"] == t for r, t in zip(short, truth.tolist())]) >= 0.9
    alone = [matching.match(bank, queries[i : i + 1], per_query)[0] for i in range(4)]
    assert alone == short[:4]  # a query's answer does not depend on the other crops of its batch
    with pytest.raises(ValueError, match="rerank shortlist=0"):
        MatchOptions(rerank_shortlist=0)
    with pytest.raises(ValueError, match="rerank exact max=-1"):
        MatchOptions(rerank_exact_max=-1)


def test_a_query_the_index_finds_nothing_for_falls_back_to_exact_search(monkeypatch):
    import torch

    import inference.match as matching
    from inference.bank import GalleryBank

    eye = torch.eye(8)
    bank = GalleryBank.build(eye[:3].repeat(3, 1), identities=[1, 2, 3] * 3)
    search = bank.search

    def approximate(query, k=10, raw=True, exact=False):  # an IVF list probe that found no row
        return search(query, k, raw, exact) if exact else (torch.zeros(len(query), k), torch.full((len(query), k), -1))

    monkeypatch.setattr(bank, "search", approximate)
    galleries = _count_reranks(monkeypatch)
    for opts in (MatchOptions(), MatchOptions(rerank=True, rerank_exact_max=0, rerank_shortlist=4)):
        assert [m["category_id"] for m in matching.match(bank, eye[:3], opts)] == [1, 2, 3]
    assert galleries == [9, 9, 9]  # still re-ranked, each among the exact search's rows (k = all 9 of them)


def test_class_agnostic_row_ranks_boxes_by_the_detector_score():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}], "categories": [{"id": 1}, {"id": 2}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900,
                           "iscrowd": 0}]}  # fmt: skip
    hit = {"image_id": 1, "bbox": [10, 10, 30, 30], "category_id": 2, "det_score": 0.9, "det_label": 0}
    miss = {"image_id": 1, "bbox": [60, 60, 30, 30], "category_id": 1, "det_score": 0.5, "det_label": 0}
    # a poor match lowers the combined score of the detector's best box below its false positive's
    dets = [dict(hit, score=combined_score(0.9, -0.2)), dict(miss, score=combined_score(0.5, 0.9))]
    table = evaluate(gt, dets, None)
    assert table.rows["a"] == pytest.approx((1.0, 1.0))  # (a) judges the detector's boxes, not retrieval


def test_boxes_that_give_no_crop_are_counted_and_reported(setup):
    s = setup

    def detector(images):
        boxes = np.array([[10, 10, 60, 60], [5, 5, 7, 7], [5000, 5000, 5100, 5100]], dtype=float)  # 2 give no crop
        return [recognize.Detections(boxes, np.full(3, 0.9), np.zeros(3, int)) for _ in images]

    run = recognize.recognize(s["queries"][:1], s["retriever"], s["bank"], MatchOptions(), "detector", detector,
                              progress=False)  # fmt: skip
    assert len(run.results) == 1 and len(run.dropped_boxes) == 2
    assert "2 boxes too small or outside the image dropped" in run.summary()


def test_unreadable_images_are_counted_and_reported(setup, tmp_path):
    folder = tmp_path / "queries"
    folder.mkdir()
    (folder / "a_broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    good = setup["queries"][0].path
    (folder / "b_good.jpg").write_bytes(good.read_bytes())
    queries, _ = recognize.read_queries(folder)
    run = recognize.recognize(queries, setup["retriever"], setup["bank"], MatchOptions(), "whole", progress=False)
    assert run.images == 1 and len(run.skipped) == 1 and "a_broken.jpg" in run.skipped[0]
    assert "1 skipped" in run.summary() and "images/s" in run.summary()


def test_ground_truth_with_categories_the_bank_does_not_know(setup):
    coco = json.loads(json.dumps(setup["coco"]))
    coco["annotations"][0]["category_id"] = 999
    coco["categories"].append({"id": 999, "name": "new-product"})
    ids = [coco["annotations"][0]["image_id"]]
    with pytest.raises(ValueError, match=r"gt.json: ground truth has categories the gallery bank does not know.*999"):
        ground_truth(coco, ids, "gt.json", setup["bank"].skus())


def test_cli_writes_results_table_and_pictures(setup, tmp_path, capsys):
    s = setup
    out = tmp_path / "results.json"
    query = str(s["root"] / "query.json")
    args = ["--retriever", str(s["ckpt"]), "--bank", str(s["folder"] / "bank"), "--images", query,
            "--split", "test", "--boxes", "gt", "--eval", query, "--out", str(out), "--pictures", "2",
            "--no-progress"]  # fmt: skip
    assert recognize.main(args) == 0
    printed = capsys.readouterr().out
    assert "images/s" in printed and "| (d) | ground truth | retrieval |" in printed
    results = json.loads(out.read_text())
    from pycocotools.coco import COCO

    coco = COCO(query)
    assert len(coco.loadRes([r for r in results if r["category_id"] != UNKNOWN]).anns) > 0
    assert len(list((tmp_path / "results_pictures").glob("*.png"))) == 2
    assert list((tmp_path / "results_tb").glob("events.out.tfevents.*"))
    assert json.loads((tmp_path / "results_eval.json").read_text())["rows"]["d"][1] >= 0.0
    # a detector needs the module that can load one; another model's bank is refused
    assert recognize.main([*args, "--detector", "x.pth"]) == 2
    assert recognize.main([*args, "--images", str(tmp_path)]) == 2  # ground truth needs the COCO file's ids
    other = make_retriever_run(tmp_path / "other", s["root"], seed=3)
    assert recognize.main([*args[:1], str(other), *args[2:]]) == 2


@pytest.mark.gpu
def test_recognition_on_gpu_matches_cpu(setup):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    s = setup
    gpu = load_retriever(s["ckpt"], device="cuda")
    cpu_run = recognize.recognize(s["queries"], s["retriever"], s["bank"], MatchOptions(), "gt", progress=False)
    gpu_run = recognize.recognize(s["queries"], gpu, s["bank"], MatchOptions(), "gt", progress=False)
    assert [r["category_id"] for r in gpu_run.results] == [r["category_id"] for r in cpu_run.results]
    assert max(abs(a["similarity"] - b["similarity"]) for a, b in zip(gpu_run.results, cpu_run.results)) < 1e-3
