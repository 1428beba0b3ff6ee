"""The gallery bank as a versioned artefact: build, add, remove, info, killed writers, model fingerprints."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inference import gallery
from inference.bankstore import CURRENT, current_version, list_versions, read_version
from inference.crops import ViewConfig
from inference.retriever import load_retriever
from tests.recognition_helpers import library, make_retriever_run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    from datasets.sample import ensure_sample

    return Path(ensure_sample(tmp_path_factory.mktemp("sample") / "retail"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, sample_root) -> Path:
    return make_retriever_run(tmp_path_factory.mktemp("retr"), sample_root)


@pytest.fixture(scope="module")
def retriever(checkpoint):
    return load_retriever(checkpoint)


@pytest.fixture
def bank(tmp_path, sample_root, retriever) -> Path:
    records = [r for r in library(sample_root) if r.identity <= 8]  # a few SKUs keep it fast; 21-24 are added later
    gallery.build(records, retriever, tmp_path / "bank", ViewConfig(flip=True), progress=False)
    return tmp_path / "bank"


def test_build_crops_views_and_records_the_model(bank, retriever, sample_root):
    entry = read_version(bank)
    assert entry.version == 1 and len(entry.bank) == 16  # 8 library images x (crop + flip view)
    assert [it["view"] for it in entry.items[:2]] == ["orig", "flip"]
    assert entry.fingerprint == retriever.fingerprint
    assert entry.meta["crop"]["padding"] == retriever.cfg.data.prepare.padding  # training's crop settings
    # a library crop embedded again finds its own row with similarity 1
    feats, items, skipped = gallery.embed_records(library(sample_root)[:1], retriever, _settings(entry), ViewConfig())
    scores, idx = entry.bank.search(feats, 1)
    assert int(idx[0, 0]) == 0 and float(scores[0, 0]) == pytest.approx(1.0, abs=1e-5) and not skipped


def _settings(entry):
    from datasets.crop import CropSettings

    return CropSettings(**entry.meta["crop"])


def test_add_embeds_only_the_new_images_and_keeps_the_old_version(bank, retriever, sample_root, monkeypatch):
    before = read_version(bank)
    new = [r for r in library(sample_root) if r.identity > 20]
    calls = []
    original = retriever.embed
    monkeypatch.setattr(retriever, "embed", lambda crops: calls.append(len(crops)) or original(crops))
    after = gallery.add(bank, new, retriever, progress=False)
    assert sum(calls) == 2 * len(new)  # the new images and their flip views, nothing else re-embedded
    assert after.version == 2 and len(after.bank) == len(before.bank) + 2 * len(new)
    assert torch.equal(after.bank.features[: len(before.bank)], before.bank.features)
    assert set(after.skus()) == set(range(1, 9)) | set(range(21, 25))
    assert read_version(bank, 1).meta["count"] == len(before.bank)  # the previous version stays readable
    scores, idx = after.bank.search(after.bank.features[-2:], 1, raw=False)
    assert after.items[int(idx[0, 0])]["identity"] > 20


def test_add_crops_as_the_bank_was_cropped(bank, retriever, sample_root, monkeypatch):
    import copy

    other_crops = copy.copy(retriever)  # same model (same fingerprint), another config's data.prepare
    other_crops.cfg = copy.deepcopy(retriever.cfg)
    other_crops.cfg.data.prepare.padding, other_crops.cfg.data.prepare.max_side = 0.3, 512
    seen = []
    real = gallery.embed_records
    monkeypatch.setattr(gallery, "embed_records", lambda recs, r, settings, *a: seen.append(settings) or
                        real(recs, r, settings, *a))  # fmt: skip
    gallery.add(bank, library(sample_root)[-1:], other_crops, progress=False)
    crop = read_version(bank).meta["crop"]
    assert (seen[0].padding, seen[0].max_side) == (crop["padding"], crop["max_side"]) == (0.05, 128)


@pytest.mark.parametrize("index", ["flat", "ivf", "hnsw"])
def test_remove_a_sku_or_an_image_for_every_index(tmp_path, sample_root, retriever, index):
    records = [r for r in library(sample_root, per_sku=2) if r.identity <= 8]
    gallery.build(records, retriever, tmp_path / "b", index=index, progress=False)
    entry = gallery.remove(tmp_path / "b", skus=[3])
    assert 3 not in entry.skus() and len(entry.bank) == len(records) - 2
    one = records[0].path
    entry = gallery.remove(tmp_path / "b", sources=[one])
    assert one not in {it["source"] for it in entry.items}
    loaded = read_version(tmp_path / "b")
    assert loaded.bank.index.ntotal == len(loaded.bank) == len(records) - 3
    _, idx = loaded.bank.search(loaded.bank.features, 1, raw=False)  # every row still finds itself
    assert (idx[:, 0] == torch.arange(len(loaded.bank))).float().mean() > 0.95
    if index == "hnsw":
        assert "cannot delete" in gallery.info(tmp_path / "b")


def test_remove_errors_name_what_is_wrong(bank):
    with pytest.raises(ValueError, match=r"\[99\] not in gallery bank"):
        gallery.remove(bank, skus=[99])
    with pytest.raises(ValueError, match="empty"):
        gallery.remove(bank, skus=list(range(1, 9)))
    assert current_version(bank) == 1  # failed changes write nothing


def test_empty_bank_is_an_error(tmp_path, retriever):
    with pytest.raises(ValueError, match="empty"):
        gallery.build([], retriever, tmp_path / "b", progress=False)
    with pytest.raises(FileNotFoundError, match="not a gallery bank"):
        read_version(tmp_path / "b")


def test_a_bank_refuses_another_model(bank, tmp_path, sample_root):
    other = load_retriever(make_retriever_run(tmp_path / "other", sample_root, seed=1))
    with pytest.raises(ValueError, match="built by another model"):
        gallery.add(bank, library(sample_root)[-1:], other, progress=False)
    wider = load_retriever(make_retriever_run(tmp_path / "wide", sample_root, overrides=("model.embed_dim=32",)))
    with pytest.raises(ValueError, match="dim 32"):
        read_version(bank).check_retriever(wider.fingerprint)


KILLED_ADD = """
import os, signal, sys
import inference.bankstore as store
from inference import gallery
real_rename = os.rename
def rename_then_die(src, dst):
    if "tmp-v" in str(src):
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 after the new version's files are written, before publishing
    real_rename(src, dst)
store.os.rename = rename_then_die
sys.exit(gallery.main(sys.argv[1:]))
"""


def test_killed_add_leaves_the_previous_version_usable(bank, checkpoint, sample_root, tmp_path):
    folder = tmp_path / "new_sku"
    folder.mkdir()
    Image.open(library(sample_root)[-1].path).save(folder / "a.jpg")
    args = ["add", "--bank", str(bank), "--retriever", str(checkpoint), "--images", str(folder),
            "--sku", "77", "--name", "new", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED_ADD), *args], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert list(bank.glob(".tmp-v*")), "the killed writer left its unfinished version"
    assert (bank / CURRENT).read_text().strip() == "v000001"
    entry = read_version(bank)
    assert entry.version == 1 and 77 not in entry.skus()
    # the next writer cleans up and publishes normally
    assert gallery.main(args) == 0
    assert not list(bank.glob(".tmp-v*")) and list_versions(bank) == [1, 2] and 77 in read_version(bank).skus()


def test_cli_build_info_and_errors(tmp_path, sample_root, capsys):
    ckpt = make_retriever_run(tmp_path / "run", sample_root)
    bank = tmp_path / "bank"
    code = gallery.main(["build", "--bank", str(bank), "--retriever", str(ckpt), "--views", "scale=0.9,light=1",
                         "--pca", "16", "--index", "hnsw", "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "PCA to 16" in out and "cannot delete" in out and "'scale0.9': 72" in out
    assert read_version(bank).bank.features.shape[1] == 16
    assert gallery.main(["remove", "--bank", str(bank), "--sku", "1234"]) == 2
    assert gallery.main(["info", "--bank", str(tmp_path / "nothing")]) == 2
    with pytest.raises(ValueError, match="flip,scale"):
        ViewConfig.parse("rotate=5")
    assert np.isclose(read_version(bank).bank.features.norm(dim=1), 1, atol=1e-5).all()


def test_writers_take_turns(bank):
    from inference.bankstore import writer_lock

    with writer_lock(bank):  # another process changing the bank holds this lock
        with pytest.raises(ValueError, match="being changed by another process"):
            gallery.remove(bank, skus=[1])
    assert gallery.remove(bank, skus=[1]).version == 2


def test_the_trainers_config_json_with_resolved_values_is_read(tmp_path, sample_root):
    import json

    ckpt = make_retriever_run(tmp_path / "run", sample_root)
    data = json.loads((ckpt.parent / "config.json").read_text())
    (ckpt.parent / "config.json").write_text(json.dumps({**data, "resolved": {"lr": 0.001, "global_batch": 32}}))
    assert load_retriever(ckpt).cfg.model.backbone == "test_resnet"
    (ckpt.parent / "config.json").write_text(json.dumps({**data, "surprise": 1}))
    with pytest.raises(ValueError, match="config.json: not a readable experiment config.*--config NAME"):
        load_retriever(ckpt)
