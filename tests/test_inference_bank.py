"""Gallery bank: search and classification by hand, IVF/HNSW recall, one-file save/load, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from inference.bank import GalleryBank
from inference.postprocess import PostProcess

GALLERY = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6], [-1.0, 0.1]], dtype=np.float32)
LABELS = np.array([0, 1, 1, 2])


def _bank(**kw) -> GalleryBank:
    return GalleryBank.build(GALLERY, labels=LABELS, identities=LABELS + 100, sources=list("abcd"), **kw)


def test_search_best_match_knn_vote_and_open_set():
    bank = _bank()
    scores, idx = bank.search(np.array([[0.9, 0.1]]), k=3)
    assert idx[0].tolist() == [0, 2, 1]
    assert scores[0, 0].item() == pytest.approx(0.9 / np.hypot(0.9, 0.1), rel=1e-6)
    best = bank.classify(np.array([[0.9, 0.1], [0.1, 1.0]]))
    assert best["labels"].tolist() == [0, 1] and best["identities"].tolist() == [100, 101]
    # the best match is item 0 (label 0), but the two label-1 items among the top 3 outvote it
    query = np.array([[0.95, 0.3]])
    assert bank.classify(query)["labels"].tolist() == [0]
    knn = bank.classify(query, k=3, vote="knn")
    assert knn["labels"].tolist() == [1] and knn["indices"][0].tolist() == [0, 2, 1]
    assert knn["scores"][0].item() == pytest.approx(float(np.dot([0.8, 0.6], query[0]) / np.linalg.norm(query)))
    rejected = bank.classify(np.array([[0.9, 0.1], [-0.3, -1.0]]), threshold=0.5)
    assert rejected["labels"].tolist() == [0, -1] and rejected["identities"].tolist() == [100, -1]


def test_save_load_roundtrip_with_pca_and_index(tmp_path):
    rng = np.random.default_rng(0)
    raw = rng.standard_normal((300, 16)).astype(np.float32)
    post = PostProcess.fit(raw, pca_dim=8, whiten=True)
    bank = GalleryBank.build(raw, labels=np.arange(300) % 7, cameras=np.arange(300) % 3, postprocess=post)
    bank.build_index("ivf", nlist=8, nprobe=8)
    path = tmp_path / "bank.pt"
    bank.save(path)
    assert not list(tmp_path.glob(".*tmp*"))
    state = torch.load(path, weights_only=True)  # plain tensors and containers only
    assert state["features"].shape == (300, 8)
    again = GalleryBank.load(path)
    q = rng.standard_normal((20, 16)).astype(np.float32)
    s1, i1 = bank.search(q, k=5)
    s2, i2 = again.search(q, k=5)
    assert torch.equal(i1, i2) and torch.allclose(s1, s2)
    assert torch.equal(again.cameras, bank.cameras) and again.postprocess.output_dim == 8
    assert again.recall_vs_exact(q, k=1) == 1.0  # nprobe = nlist visits every list: exact


def test_approximate_indexes_report_recall():
    rng = np.random.default_rng(1)
    bank = GalleryBank.build(rng.standard_normal((3000, 32)).astype(np.float32))
    q = rng.standard_normal((100, 32)).astype(np.float32)
    for kind in ("ivf", "hnsw"):
        bank.build_index(kind, nlist=16, nprobe=4)
        recall = bank.recall_vs_exact(q, k=1)
        assert 0.3 < recall <= 1.0
    bank.build_index("flat")
    assert bank.recall_vs_exact(q, k=1) == 1.0


def test_l2_bank_scores_are_negative_distances():
    bank = GalleryBank.build(GALLERY, postprocess=PostProcess(normalize=False))
    scores, idx = bank.search(np.array([[1.0, 0.0]]), k=2)
    assert idx[0].tolist() == [0, 2] and scores[0].tolist() == pytest.approx([0.0, -0.4])


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="gallery labels has 3 entries"):
        GalleryBank.build(GALLERY, labels=[0, 1, 2])
    with pytest.raises(ValueError, match="NaN/inf"):
        GalleryBank.build(np.array([[np.inf, 0.0]]))
    with pytest.raises(ValueError, match="empty"):
        GalleryBank.build(np.ones((0, 2)))
    bank = _bank()
    with pytest.raises(ValueError, match="dimension 3 but the gallery bank expects 2"):
        bank.search(np.ones((1, 3)))
    with pytest.raises(ValueError, match="empty"):
        bank.search(np.ones((0, 2)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GalleryBank.load(tmp_path / "missing.pt")
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a gallery bank"):
        GalleryBank.load(tmp_path / "other.pt")


def test_a_new_version_is_on_disk_before_it_is_published(tmp_path, monkeypatch):
    import os

    from inference import bankstore

    synced, real_fsync = [], os.fsync

    def recording_fsync(fd):
        synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    bank = GalleryBank.build(torch.eye(4), identities=[1, 2, 3, 4])
    items = [{"identity": i, "name": str(i), "source": f"{i}.jpg", "box": None, "view": "orig"} for i in range(1, 5)]
    bankstore.write_version(tmp_path / "bank", bankstore.BankVersion(bank, items, {"fingerprint": {}}))
    # every file of the version is synced before the folder is renamed and CURRENT points at it
    assert any(name.startswith(".bank.pt.tmp") for name in synced), synced
    assert {"items.json", "meta.json"} <= set(synced)
