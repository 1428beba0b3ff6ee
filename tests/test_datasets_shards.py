"""Records -> ROI crops -> tar shards + manifest: contents, determinism, atomicity and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import datasets.prepare as prepare_mod
from configs import PrepareConfig
from datasets.prepare import prepare_shards
from datasets.records import Record, assign_labels
from datasets.shards import MANIFEST, iter_shard, read_manifest, sha256_file, verify_shards
from datasets.transforms import decode
from tests.conftest import shared_dataset


def market_records(root: Path) -> dict[str, list[Record]]:
    """Market-1501 records built directly from file names (independent of the readers under test elsewhere)."""

    def folder(name: str, split: str) -> list[Record]:
        return [
            Record(path=f"{name}/{p.name}", identity=int(p.name[:4]), camera=int(p.name[6]), split=split)
            for p in sorted((root / name).glob("*.jpg"))
        ]

    train, _ = assign_labels(folder("bounding_box_train", "train"))
    return {"train": train, "query": folder("query", "query"), "gallery": folder("bounding_box_test", "gallery")}


@pytest.fixture(scope="module")
def market() -> tuple[Path, dict[str, list[Record]]]:
    root = shared_dataset("market1501_mini")
    return root, market_records(root)


def cfg(**kw) -> PrepareConfig:
    return PrepareConfig(**{"shard_size": 10, "workers": 1, **kw})


def test_round_trip_manifest_and_views(market, tmp_path):
    root, splits = market
    manifest = prepare_shards(splits, tmp_path, cfg(gallery_views=2, padding=0.1), root=str(root), progress=False)
    assert read_manifest(tmp_path) == manifest
    train, gallery = manifest["splits"]["train"], manifest["splits"]["gallery"]
    assert train["count"] == 32 and gallery["count"] == 32 * 3
    assert [s["count"] for s in train["shards"]] == [10, 10, 10, 2]
    assert train["num_classes"] == 16 and [c["label"] for c in train["classes"]] == list(range(16))
    assert sum(gallery["class_counts"].values()) == 96 and manifest["settings"]["gallery_views"] == 2
    assert verify_shards(tmp_path) == len(train["shards"]) + len(gallery["shards"]) + 4
    samples = [s for shard in gallery["shards"] for s in iter_shard(tmp_path, shard)]
    metas = [json.loads(s["json"]) for s in samples]
    assert [m["index"] for m in metas] == list(range(96))
    assert [m["view"] for m in metas[:6]] == [0, 1, 2, 0, 1, 2]
    first = splits["gallery"][0]
    assert metas[0]["source"] == first.path and metas[0]["identity"] == first.identity
    assert metas[0]["camera"] == first.camera and metas[0]["split"] == "gallery" and metas[0]["box"] == [0, 0, 64, 128]
    assert metas[0]["label"] == gallery["labels"][0]
    original, view = decode(samples[0]["jpg"]), decode(samples[1]["jpg"])
    assert original.size == (64, 128) and samples[0]["jpg"] != samples[1]["jpg"] and view.mode == "RGB"


def test_shards_are_byte_identical_across_runs_and_worker_counts(market, tmp_path):
    root, splits = market
    a = prepare_shards(splits, tmp_path / "a", cfg(gallery_views=1, workers=1), root=str(root), progress=False)
    b = prepare_shards(splits, tmp_path / "b", cfg(gallery_views=1, workers=2), root=str(root), progress=False)
    assert a["splits"] == b["splits"]
    for split in a["splits"].values():
        for shard in split["shards"]:
            assert sha256_file(tmp_path / "a" / shard["file"]) == sha256_file(tmp_path / "b" / shard["file"])
            assert sha256_file(tmp_path / "a" / shard["file"]) == shard["sha256"]
    # re-running into the same folder with bigger shards replaces them and removes the stale ones
    c = prepare_shards(splits, tmp_path / "a", cfg(shard_size=20), root=str(root), progress=False)
    assert sorted(p.name for p in (tmp_path / "a").glob("train-*.tar")) == ["train-00000.tar", "train-00001.tar"]
    assert verify_shards(tmp_path / "a") == sum(len(s["shards"]) for s in c["splits"].values())


def test_interrupted_run_leaves_no_manifest(market, tmp_path, monkeypatch):
    root, splits = market
    prepare_shards(splits, tmp_path, cfg(), root=str(root), progress=False)
    assert (tmp_path / MANIFEST).is_file()
    real, calls = prepare_mod._crop_job, []

    def dying(job):
        calls.append(job)
        if len(calls) == 45:  # inside the query split, after train's shards are rewritten
            raise KeyboardInterrupt("killed")
        return real(job)

    monkeypatch.setattr(prepare_mod, "_crop_job", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare_shards(splits, tmp_path, cfg(), root=str(root), progress=False)
    assert not (tmp_path / MANIFEST).exists()
    with pytest.raises(FileNotFoundError, match="no shard manifest"):
        read_manifest(tmp_path)


def bad_image_records(root: Path, tmp: Path) -> list[Record]:
    good = sorted((root / "bounding_box_train").glob("*.jpg"))[:3]
    data = good[0].read_bytes()
    (tmp / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg" * 10)
    recs = [Record(path=str(p), identity=1, split="train", label=0) for p in good]
    recs += [Record(path=str(tmp / n), identity=2, split="train", label=1) for n in ("truncated.jpg", "corrupt.jpg")]
    return recs + [Record(path=str(tmp / "missing.jpg"), identity=3, split="train", label=2)]


def test_bad_images_are_skipped_counted_and_recorded(market, tmp_path):
    recs = bad_image_records(market[0], tmp_path)
    manifest = prepare_shards({"train": recs}, tmp_path / "out", cfg(skip_bad=True), progress=False)
    entry = manifest["splits"]["train"]
    assert entry["count"] == 3 and entry["records"] == 6
    reasons = {Path(s["file"]).name: s["reason"] for s in entry["skipped"]}
    assert reasons == {"truncated.jpg": "bad_image", "corrupt.jpg": "bad_image", "missing.jpg": "missing_image"}
    assert "3 (bad_image: 2, missing_image: 1)" in prepare_mod.summary(manifest)


@pytest.mark.parametrize("name", ["truncated.jpg", "corrupt.jpg", "missing.jpg"])
def test_bad_image_is_an_error_naming_the_file_without_skip_bad(market, tmp_path, name):
    recs = [r for r in bad_image_records(market[0], tmp_path) if r.path.endswith(name)]
    identity = 3 if name == "missing.jpg" else 2
    with pytest.raises(ValueError, match=rf"train: record '.*{name}' \(identity {identity}.*skip_bad=true"):
        prepare_shards({"train": recs}, tmp_path / "out", cfg(skip_bad=False), progress=False)


def test_boxes_are_clipped_or_rejected_with_the_record_named(market, tmp_path):
    path = str(sorted((market[0] / "query").glob("*.jpg"))[0])  # a 64x128 image
    recs = [
        Record(path=path, identity=5, box=(-10, 100, 40, 50), split="query"),  # partly outside: clipped
        Record(path=path, identity=6, box=(70, 10, 20, 20), split="query"),  # fully outside
        Record(path=path, identity=7, box=(5, 5, 0, 20), split="query"),  # zero width
        Record(path=path, identity=8, box=(5, 5, 20, -3), split="query"),  # negative height
        Record(path=path, identity=9, box=(5, 5, 4, 4), split="query"),  # below min_size
    ]
    manifest = prepare_shards({"query": recs}, tmp_path / "a", cfg(min_size=8), progress=False)
    entry = manifest["splits"]["query"]
    meta = json.loads(next(iter_shard(tmp_path / "a", entry["shards"][0]))["json"])
    assert entry["count"] == 1 and meta["box"] == [0, 100, 30, 28]
    assert [s["reason"] for s in entry["skipped"]] == ["box_outside", "degenerate_box", "degenerate_box", "too_small"]
    with pytest.raises(ValueError, match=r"identity 6.*box_outside"):
        prepare_shards({"query": recs}, tmp_path / "b", cfg(skip_bad=False), progress=False)
    with pytest.raises(ValueError, match=r"identity 7.*degenerate_box"):
        prepare_shards({"query": [recs[0], recs[2]]}, tmp_path / "c", cfg(skip_bad=False), progress=False)


def test_empty_split_and_all_skipped_are_errors(market, tmp_path):
    with pytest.raises(ValueError, match="split 'gallery' has no records"):
        prepare_shards({"train": market[1]["train"], "gallery": []}, tmp_path, cfg(), progress=False)
    gone = [Record(path=str(tmp_path / "nope.jpg"), identity=1, split="train")]
    with pytest.raises(ValueError, match=r"split 'train': all 1 records were skipped \(missing_image: 1\)"):
        prepare_shards({"train": gone}, tmp_path, cfg(), progress=False)
    assert not (tmp_path / MANIFEST).exists()


def test_sha_mismatch_and_truncated_shard_are_errors_naming_the_shard(market, tmp_path):
    root, splits = market
    manifest = prepare_shards({"train": splits["train"]}, tmp_path, cfg(), root=str(root), progress=False)
    shard = manifest["splits"]["train"]["shards"][1]
    path = tmp_path / shard["file"]
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one flipped bit in the end-of-archive padding
    with pytest.raises(ValueError, match=f"shard {path} is corrupt: sha256"):
        verify_shards(tmp_path)
    path.write_bytes(data[: len(data) // 2])  # truncated mid-member
    with pytest.raises(ValueError, match=f"shard {path} is corrupt or truncated"):
        list(iter_shard(tmp_path, shard))  # sha256 check on load
    with pytest.raises(ValueError, match=f"{path}.*(corrupt or truncated|truncated)"):
        list(iter_shard(tmp_path, shard, verify=False))  # the tar reader itself
    path.unlink()
    with pytest.raises(FileNotFoundError, match=str(path)):
        verify_shards(tmp_path)


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="datasets.prepare"):
        read_manifest(tmp_path)
    shutil.rmtree(tmp_path)


def test_prepare_cli_on_market_mini(tmp_path, capsys):
    root = shared_dataset("market1501_mini")
    out = tmp_path / "shards"
    argv = ["--config", "reid_r50ibn", f"data.root={root}", f"data.shards={out}", "data.prepare.shard_size=16"]
    manifest = prepare_mod.main([*argv, "--no-progress", "--data.prepare.workers", "1"])
    text = capsys.readouterr().out
    assert "# ids" in text and "gallery" in text and f"wrote {out}/{MANIFEST}" in text
    assert manifest["splits"]["train"]["count"] == 32 and verify_shards(out) == 6
    assert all(not e["skipped"] for e in manifest["splits"].values())


def test_ensure_shards_prepares_only_the_embedded_sample(tmp_path):
    from configs import load_config
    from datasets.prepare import ensure_shards

    cfg = load_config("retr_demo", [f"data.root={tmp_path}/sample", f"data.shards={tmp_path}/shards"])
    manifest = ensure_shards(cfg)
    assert (tmp_path / "shards" / MANIFEST).is_file() and manifest["splits"]["train"]["count"] > 0
    assert ensure_shards(cfg) == manifest  # present: read, not rewritten
    other = load_config("reid_demo", [f"data.shards={tmp_path}/none"])
    with pytest.raises(FileNotFoundError, match="datasets.prepare"):
        ensure_shards(other)


def test_boxes_the_reader_leaves_out_are_recorded_in_the_manifest(tmp_path, capsys):
    from datasets.sample import ensure_sample

    root = Path(ensure_sample(tmp_path / "sample"))
    coco = json.loads((root / "query.json").read_text())
    first = coco["annotations"][0]
    coco["annotations"].append({**first, "id": 999999, "bbox": [5, 5, 0, 10]})  # no area: skipped by the reader
    (root / "query.json").write_text(json.dumps(coco))
    out = tmp_path / "shards"
    manifest = prepare_mod.main(["--config", "retr_demo", "data.reader=coco", f"data.root={root}",
                                 f"data.shards={out}", "--no-progress"])  # fmt: skip
    (items,) = manifest["reader_skipped"].values()
    assert len(items) == 1 and "annotation 999999" in items[0]
    assert json.loads((out / MANIFEST).read_text())["reader_skipped"] == manifest["reader_skipped"]
    assert "left out by the reader: 1 x" in capsys.readouterr().out
