"""The embedded sample set: layout and counts, byte-identical regeneration, usable boxes, marker semantics."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import DataConfig
from datasets import sample
from datasets.readers import read_records
from tests.conftest import REPO


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory):
    return sample.ensure_sample(tmp_path_factory.mktemp("sample") / "data" / "sample")


def test_sample_reader_counts_and_boxes(sample_root):
    splits = read_records(DataConfig(reader="sample", root=str(sample_root)))
    skus = sample.NUM_DESIGNS * sample.VARIANTS
    assert len(splits["gallery"]) == skus * sample.LIBRARY_VIEWS
    assert all(len({r.identity for r in recs}) == skus for recs in splits.values())
    scenes = json.loads((sample_root / "query.json").read_text())
    test_ids = {im["id"] for im in scenes["images"] if im["split"] == "test"}
    assert len(scenes["images"]) == sample.NUM_SCENES and len(test_ids) == sample.NUM_SCENES // sample.TEST_EVERY
    assert {r.meta["image_id"] for r in splits["query"]} == test_ids
    per_scene = np.bincount([a["image_id"] for a in scenes["annotations"]])[1:]
    assert per_scene.min() >= 3 and per_scene.max() <= 8 and per_scene.mean() > 5
    assert len(splits["train"]) == len(scenes["annotations"]) - len(splits["query"]) + len(splits["gallery"])
    for r in splits["train"] + splits["query"]:
        x, y, w, h = r.box
        size = Image.open(r.path).size
        assert w > 4 and h > 4 and x >= 0 and y >= 0 and x + w <= size[0] and y + h <= size[1]
        assert not r.meta["clipped"]


def test_sample_is_byte_identical_for_a_seed(sample_root, tmp_path):
    marker = json.loads((sample_root / sample.MARKER).read_text())
    assert marker["files"] == sample.file_hashes(sample_root)  # the marker lists every file's sha256
    env = {**os.environ, "PYTHONHASHSEED": "123"}  # another process, another hash seed: same bytes
    cmd = [sys.executable, "-m", "datasets.sample", "--out", str(tmp_path / "again"), "--seed", "0"]
    subprocess.run(cmd, check=True, env=env, cwd=REPO, capture_output=True)
    assert sample.file_hashes(tmp_path / "again") == marker["files"]
    sample.generate(tmp_path / "other", seed=1)
    other = sample.file_hashes(tmp_path / "other")
    assert other.keys() == marker["files"].keys() and other["query.json"] != marker["files"]["query.json"]


def thumb(record) -> np.ndarray:
    x, y, w, h = record.box
    im = Image.open(record.path).convert("RGB").crop((x, y, x + w, y + h)).resize((12, 20))
    a = np.asarray(im, dtype=np.float32).ravel()
    a -= a.mean()
    return a / np.linalg.norm(a)


def test_sample_boxes_show_their_product(sample_root):
    """A raw-pixel nearest neighbour already finds the right SKU: boxes and categories line up."""
    splits = read_records(DataConfig(reader="sample", root=str(sample_root)))
    gallery = np.stack([thumb(r) for r in splits["gallery"]])
    g_ids = np.array([r.identity for r in splits["gallery"]])
    query = np.stack([thumb(r) for r in splits["query"]])
    q_ids = np.array([r.identity for r in splits["query"]])
    assert (g_ids[(query @ gallery.T).argmax(1)] == q_ids).mean() > 0.8
    sim = gallery @ gallery.T
    np.fill_diagonal(sim, -1)
    assert (g_ids[sim.argmax(1)] == g_ids).mean() > 0.85  # views of one SKU look alike, SKUs differ


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_ensure_sample_reuses_complete_and_redoes_killed(sample_root, tmp_path):
    marker = sample_root / sample.MARKER
    stamp = marker.stat().st_mtime_ns
    assert sample.ensure_sample(sample_root) == sample_root and marker.stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="made with seed 0, not 3"):
        sample.ensure_sample(sample_root, seed=3)
    # a killed generation: a partial folder without the marker and a stale temporary folder
    root = tmp_path / "killed"
    (root / "images").mkdir(parents=True)
    (root / "query.json").write_text('{"images": [')
    stale = tmp_path / f".killed.tmp-{dead_pid()}"
    stale.mkdir()
    assert sample.ensure_sample(root) == root
    assert not stale.exists() and json.loads((root / sample.MARKER).read_text())["seed"] == 0
    assert sample.file_hashes(root) == sample.file_hashes(sample_root)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="is not a generated sample set"):
        sample.ensure_sample(foreign)


def test_sample_cli(sample_root, caplog):
    with caplog.at_level(logging.INFO):
        sample.main(["--out", str(sample_root), "--seed", "0"])
    assert "Dataset statistics" in caplog.text and "gallery  |    24 |       72" in caplog.text
