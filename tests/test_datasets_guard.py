"""A shards folder under concurrent writers and readers, and against being overwritten by another dataset."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import datasets.prepare as prepare_mod
from configs import DataConfig, PrepareConfig, load_config
from datasets.folders import read_grocery
from datasets.prepare import Guard, prepare_shards
from datasets.readers import read_records
from datasets.records import Record
from datasets.shardguard import LOCK_NAME, ShardsBusy
from datasets.shards import MANIFEST, read_manifest, sha256_file, verify_shards
from tests.conftest import shared_dataset
from tests.test_datasets_readers import make_grocery

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def tiny_records(folder: Path) -> dict[str, list[Record]]:
    folder.mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(3):
        Image.new("RGB", (24, 24), (40 * i, 90, 30)).save(folder / f"{i}.jpg")
        recs.append(Record(str(folder / f"{i}.jpg"), identity=i, label=i, split="train"))
    return {"train": recs}


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process in the middle of writing ``folder``: it holds the writer lock until its stdin closes."""
    code = (
        "import sys\nfrom datasets.shardguard import writer_lock\n"
        "with writer_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.read()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=ENV)  # fmt: skip
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_writer_and_an_impatient_trainer_are_refused_while_a_prepare_runs(tmp_path):
    out, recs = tmp_path / "shards", tiny_records(tmp_path / "img")
    prep = PrepareConfig(workers=1)
    prepare_shards(recs, out, prep, progress=False)
    child = hold_lock(out)
    try:
        with pytest.raises(ShardsBusy, match=rf"{out} is being written by pid {child.pid} on .*datasets\.prepare"):
            prepare_shards(recs, out, prep, progress=False)
        start = time.monotonic()
        with pytest.raises(ShardsBusy, match=r"waited 1 s\. Wait for it to finish"):
            prepare_shards(recs, out, prep, progress=False, guard=Guard(wait_s=1.0))
        assert time.monotonic() - start >= 1.0
        cli = [sys.executable, "-m", "datasets.prepare", "--config", "retr_demo", f"data.shards={out}"]
        done = subprocess.run(cli, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        assert f"error: shards folder {out} is being written by pid {child.pid}" in done.stderr
        cfg = load_config("reid_demo", ["data.reader=folders", f"data.shards={out}", "data.shards_wait_s=0"])
        with pytest.raises(ShardsBusy, match=rf"still being written by pid {child.pid}"):
            prepare_mod.ensure_shards(cfg)  # what the trainer calls first
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    assert prepare_shards(recs, out, prep, progress=False)["splits"]["train"]["count"] == 3
    assert read_manifest(out)["splits"]["train"]["count"] == 3


def test_a_trainer_waits_for_a_prepare_and_goes_on_once_it_has_finished(tmp_path, caplog):
    """The trainer's first read of the shards waits for the writer, saying which folder and which process."""
    out, recs = tmp_path / "shards", tiny_records(tmp_path / "img")
    prepare_shards(recs, out, PrepareConfig(workers=1), progress=False)
    child = hold_lock(out)
    finish = threading.Timer(1.5, child.stdin.close)  # the prepare finishes 1.5 s into the trainer's wait
    cfg = load_config("reid_demo", ["data.reader=folders", f"data.shards={out}", "data.shards_wait_s=60"])
    start = time.monotonic()
    finish.start()
    try:
        with caplog.at_level(logging.INFO, logger="datasets.shardguard"):
            manifest = prepare_mod.ensure_shards(cfg)
    finally:
        finish.cancel()
        child.stdin.close()
        child.wait(timeout=30)
    assert time.monotonic() - start >= 1.5 and manifest["splits"]["train"]["count"] == 3
    said = caplog.text
    assert f"shards folder {out} is being written by pid {child.pid}" in said, said
    assert "waiting for it to finish (up to 60 s, data.shards_wait_s)" in said and "complete after" in said


def test_the_trainer_gives_up_after_its_bound_with_one_line_naming_the_folder(tmp_path):
    out = tmp_path / "shards"
    prepare_shards(tiny_records(tmp_path / "img"), out, PrepareConfig(workers=1), progress=False)
    child = hold_lock(out)
    try:
        cmd = [sys.executable, str(REPO / "trainers" / "retrieval.py"), "--config", "retr_demo",
               f"data.shards={out}", "data.shards_wait_s=1"]  # fmt: skip
        done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        child.stdin.close()
        child.wait(timeout=30)
    err = done.stdout + done.stderr
    assert done.returncode == 2 and "Traceback" not in err, err
    assert f"shards folder {out} is being written by pid {child.pid}" in err  # the log line while it waits
    line = next(x for x in done.stderr.splitlines() if x.startswith("error: "))
    assert line.startswith(f"error: shards folder {out} is still being written by pid {child.pid}"), line
    assert "waited 1 s (data.shards_wait_s=1)" in line and "raise data.shards_wait_s" in line


@pytest.mark.slow  # two real prepare processes: about 13 s on 2 busy cores
def test_concurrent_prepares_into_one_folder_leave_a_verified_manifest(tmp_path):
    root, out = shared_dataset("market1501_mini"), tmp_path / "shards"
    argv = [sys.executable, "-m", "datasets.prepare", "--config", "reid_demo", "data.reader=market1501",
            f"data.root={root}", f"data.shards={out}", "data.prepare.shard_size=8", "data.prepare.workers=1",
            "--no-progress", "--wait", "120"]  # fmt: skip
    procs = [subprocess.Popen(argv, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]  # fmt: skip
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert verify_shards(out) == 12
    manifest = read_manifest(out)
    for entry in manifest["splits"].values():
        assert all(sha256_file(out / s["file"]) == s["sha256"] for s in entry["shards"])
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_shard_changed_behind_the_writer_fails_the_reverification(tmp_path, monkeypatch):
    out, recs = tmp_path / "shards", tiny_records(tmp_path / "img")
    real = prepare_mod.remove_stale

    def and_another_writer(folder, keep, splits):
        real(folder, keep, splits)
        with open(folder / sorted(keep)[0], "ab") as fh:  # another process rewrote a shard meanwhile
            fh.write(b"\0" * 512)

    monkeypatch.setattr(prepare_mod, "remove_stale", and_another_writer)
    with pytest.raises(ValueError, match=r"re-verification after writing failed .*corrupt.*manifest was removed"):
        prepare_shards(recs, out, PrepareConfig(workers=1), progress=False)
    assert not (out / MANIFEST).exists()


def test_another_source_does_not_overwrite_a_complete_set(tmp_path):
    market, shards = shared_dataset("market1501_mini"), tmp_path / "shards"
    other = tmp_path / "other_market"
    shutil.copytree(market, other)
    common = [f"data.shards={shards}", "data.prepare.workers=1", "data.prepare.shard_size=50", "--no-progress"]
    first = prepare_mod.main(["--config", "reid_demo", "data.reader=market1501", f"data.root={market}", *common])
    assert first["source"] == {"reader": "market1501", "root": str(market)}

    def data_files() -> dict[str, str]:  # the lock file records its latest holder: not data
        return {p.name: sha256_file(p) for p in shards.iterdir() if p.name != LOCK_NAME}

    before = data_files()
    with pytest.raises(FileExistsError, match=rf"holds a complete set from reader=market1501 root={market}; this "
                       rf"run's source is reader=market1501 root={other}\. .*--replace"):  # fmt: skip
        prepare_mod.main(["--config", "reid_demo", "data.reader=market1501", f"data.root={other}", *common])
    with pytest.raises(FileExistsError, match=r"this run's source is reader=mars"):
        prepare_mod.main(["--config", "reid_demo", *common])  # reid_demo's own reader (mars) into the market set
    assert data_files() == before
    again = prepare_mod.main(["--config", "reid_demo", "data.reader=market1501", f"data.root={market}",
                              "data.prepare.padding=0.1", *common])  # fmt: skip
    assert again["settings"]["padding"] == 0.1  # the same source with other settings: re-prepared
    replaced = prepare_mod.main(["--config", "reid_demo", "data.reader=market1501", f"data.root={other}", "--replace",
                                 *common])  # fmt: skip
    assert read_manifest(shards)["source"]["root"] == str(other) == replaced["source"]["root"]


def test_a_manifest_without_a_recorded_source_is_protected_by_its_root(tmp_path):
    out = tmp_path / "shards"
    prepare_shards(tiny_records(tmp_path / "img"), out, PrepareConfig(workers=1), root=str(tmp_path / "a"),
                   progress=False)  # fmt: skip
    cfg = load_config("reid_demo", ["data.reader=market1501", f"data.root={tmp_path / 'b'}", f"data.shards={out}"])
    with pytest.raises(FileExistsError, match=rf"holds a complete set from root={tmp_path / 'a'}"):
        prepare_mod.prepare_from_config(cfg, progress=False)
    assert json.loads((out / MANIFEST).read_text())["splits"]["train"]["count"] == 3


def test_grocery_query_list_is_selectable_and_the_lists_are_named(tmp_path):
    root = make_grocery(tmp_path / "g", "train/a1.jpg, 0, 0")
    (root / "dataset" / "test.txt").write_text("train/a1.jpg, 0, 0\ntrain/a1.jpg, 0, 0\n")
    assert len(read_grocery(root)["query"]) == 1  # query = val.txt by default
    splits = read_records(DataConfig(reader="grocery", root=str(root), query_split="test"))
    assert sorted(splits) == ["gallery", "test", "train"] and len(splits["test"]) == 2
    assert {r.split for r in splits["test"]} == {"test"}
    with pytest.raises(ValueError, match=r"data.query_split='official' needs the list official\.txt.*the lists here "
                       r"are test\.txt, train\.txt, val\.txt"):  # fmt: skip
        read_grocery(root, query="official")


def test_indexing_an_old_manifest_in_place_holds_the_writer_lock(tmp_path, monkeypatch):
    """``datasets.shard_index`` rewrites the manifest: a prepare starting meanwhile must not be overwritten by it."""
    import datasets.shard_index as index_mod

    out = tmp_path / "shards"
    prepare_shards(tiny_records(tmp_path / "img"), out, PrepareConfig(workers=1), progress=False)
    manifest = json.loads((out / MANIFEST).read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        del shard["members"]
    (out / MANIFEST).write_text(json.dumps(manifest))
    real, seen = index_mod.verify_once, []

    def while_indexing(folder, shards, *args, **kwargs):  # a second writer tries to start half-way through
        code = (
            "import sys\nfrom datasets.shardguard import ShardsBusy, writer_lock\n"
            "try:\n    with writer_lock(sys.argv[1]):\n        print('writing')\n"
            "except ShardsBusy:\n    print('refused')\n"
        )
        done = subprocess.run([sys.executable, "-c", code, str(out)], env=ENV, capture_output=True, text=True)
        seen.append(done.stdout.strip())
        return real(folder, shards, *args, **kwargs)

    monkeypatch.setattr(index_mod, "verify_once", while_indexing)
    assert index_mod.add_index(out) == 1
    assert seen == ["refused"]


def test_training_on_shards_of_another_source_says_so(tmp_path, caplog):
    """A forgotten data.shards at training time: the shards of another reader/root are read, but not silently."""
    out = tmp_path / "shards"
    guard = Guard({"reader": "folders", "root": str(tmp_path / "img")})
    prepare_shards(tiny_records(tmp_path / "img"), out, PrepareConfig(workers=1), progress=False, guard=guard)
    same = load_config("reid_demo", ["data.reader=folders", f"data.root={tmp_path / 'img'}", f"data.shards={out}"])
    with caplog.at_level("WARNING"):
        prepare_mod.ensure_shards(same)
    assert "were made from" not in caplog.text
    other = load_config("reid_demo", ["data.reader=market1501", f"data.root={tmp_path / 'm'}", f"data.shards={out}"])
    with caplog.at_level("WARNING"):
        assert prepare_mod.ensure_shards(other)["splits"]["train"]["count"] == 3
    assert f"{out} were made from reader=folders root={tmp_path / 'img'}, not from this config's " in caplog.text
    assert "reader=market1501" in caplog.text


def test_a_full_disk_while_preparing_names_the_folder_and_frees_the_partial_shard(tmp_path, monkeypatch):
    """Like a checkpoint: the error says so with the folder, and no partial file keeps holding the space (nor one
    that a killed prepare left: it is removed before writing starts)."""
    import errno

    from datasets import shards as shards_mod

    out, recs = tmp_path / "shards", tiny_records(tmp_path / "img")
    out.mkdir()
    (out / ".train-000000.tar.999-deadbeef.tmp").write_bytes(b"\0" * 4096)  # left by a killed prepare
    real, calls = shards_mod.wds.TarWriter.write, []

    def full_after_one(self, obj):
        calls.append(obj["__key__"])
        if len(calls) == 2:
            self.tarstream.fileobj.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, obj)

    monkeypatch.setattr(shards_mod.wds.TarWriter, "write", full_after_one)
    with pytest.raises(OSError, match=rf"no space left on device while writing shards into {out}") as err:
        prepare_shards(recs, out, PrepareConfig(workers=1, shard_size=10), progress=False)
    assert err.value.errno == errno.ENOSPC
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")] and not (out / MANIFEST).exists()
