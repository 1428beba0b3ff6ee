"""Checkpoint writes under faults: full disk, killed writes, truncated states, the best weights' order."""

from __future__ import annotations

import errno
import logging
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from trainers import checkpoint as ckpt


def tiny_state(step: int) -> dict:
    return {"model": {"w": torch.full((64,), float(step))}, "optimizer": {}, "global_step": step, "epoch": 0,
            "config": {}}  # fmt: skip


def full_disk_save(obj, fh, *args, **kwargs):
    """What torch.save does on a full disk: a partial write, then 'unexpected pos' with the OSError as context."""
    fh.write(b"PK\x03\x04" + b"\0" * 100)
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_full_disk_says_so_with_path_and_bytes_and_leaves_no_temp(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", full_disk_save)
    state = {"model": {"w": torch.zeros(1000)}}
    with pytest.raises(OSError, match=r"no space left on device: writing .*state-000000003\.pt needs about") as err:
        ckpt.save_state(state, tmp_path, 3, keep_last=2)
    assert err.value.errno == errno.ENOSPC and "unexpected pos" not in str(err.value)
    needed = int(str(err.value).split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert needed >= 4000
    assert leftovers(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_full_disk_on_a_real_small_filesystem(tmp_path):
    """A 256 KiB tmpfs (needs root to mount; CI runs as root)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        with pytest.raises(OSError, match=r"no space left on device: writing .*small.*needs about 1,04\d,\d{3} bytes"):
            ckpt.save_state({"model": {"w": torch.zeros(2**18)}}, mnt / "checkpoints", 1, keep_last=2)
        assert leftovers(mnt / "checkpoints") == []
        ckpt.save_state(tiny_state(2), mnt / "checkpoints", 2, keep_last=2)  # the space came back
        assert [p.name for p in ckpt.list_states(mnt / "checkpoints")] == ["state-000000002.pt"]
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_a_killed_write_is_cleaned_at_the_next_start(tmp_path, caplog):
    folder = tmp_path / "run" / "checkpoints"
    ckpt.save_state(tiny_state(1), folder, 1, keep_last=2)
    code = (
        "import os, sys, torch\n"
        "from trainers import checkpoint as ckpt\n"
        "def killed(obj, fh, *a, **k):\n"
        "    fh.write(b'PK' * 1000); fh.flush(); os._exit(9)\n"
        "torch.save = killed\n"
        "ckpt.save_state({'model': {}}, sys.argv[1], 2, keep_last=2)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    assert subprocess.run([sys.executable, "-c", code, str(folder)], env=env).returncode == 9
    assert len(leftovers(folder)) == 1 and leftovers(folder)[0].startswith(".state-000000002.pt.")
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume("auto", tmp_path / "run") == folder / "state-000000001.pt"
    assert leftovers(folder) == [] and "removed 1 partial file(s)" in caplog.text


def test_resume_auto_falls_back_from_a_truncated_newest_state(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        ckpt.save_state(tiny_state(step), folder, step, keep_last=3)
    newest = folder / "state-000000003.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        path = ckpt.resolve_resume("auto", tmp_path)
    assert path == folder / "state-000000002.pt" and ckpt.load_state(path)["global_step"] == 2
    assert "state-000000003.pt is truncated" in caplog.text and "newest intact state" in caplog.text
    assert ckpt.resolve_resume(str(folder), tmp_path) == path  # a folder given explicitly too
    for p in ckpt.list_states(folder):
        p.write_bytes(b"")
    with pytest.raises(ValueError, match="every state under .* is truncated"):
        ckpt.resolve_resume("auto", tmp_path)


def test_best_weights_new_written_before_old_removed(tmp_path, monkeypatch):
    old = ckpt.save_best({"w": torch.zeros(4)}, tmp_path, 0.100)
    assert old.name == "mAP10.0.pth"
    monkeypatch.setattr(torch, "save", full_disk_save)  # the new best fails (or is killed) half-way
    with pytest.raises(OSError, match="no space left on device"):
        ckpt.save_best({"w": torch.ones(4)}, tmp_path, 0.200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mAP10.0.pth"]  # the old best survives
    monkeypatch.undo()
    new = ckpt.save_best({"w": torch.ones(4)}, tmp_path, 0.200)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mAP20.0.pth"]
    same = ckpt.save_best({"w": torch.full((4,), 2.0)}, tmp_path, 0.2004)  # same name: replaced, not deleted
    assert same == new and torch.load(same, weights_only=True)["w"][0] == 2.0


def test_the_folder_is_synced_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode))),
                                                 real_fsync(fd))[1])  # fmt: skip
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b))[1])
    ckpt.save_atomic({"x": torch.zeros(2)}, tmp_path / f"{uuid.uuid4().hex}.pt")
    assert [e[0] for e in events] == ["fsync", "replace", "fsync"] and events[0][1] is False and events[2][1] is True


def test_resuming_before_a_truncated_state_keeps_the_states_it_writes(tmp_path):
    """After falling back from a truncated newest state, the next save must not prune the state it just wrote."""
    folder = tmp_path / "checkpoints"
    for step in (1, 3):
        ckpt.save_state(tiny_state(step), folder, step, keep_last=2)
    newest = folder / "state-000000003.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a write cut short
    assert ckpt.resolve_resume("auto", tmp_path) == folder / "state-000000001.pt"
    written = ckpt.save_state(tiny_state(2), folder, 2, keep_last=1)
    assert written.is_file(), "the state just written was pruned as 'old'"
    assert ckpt.resolve_resume("auto", tmp_path) == written
