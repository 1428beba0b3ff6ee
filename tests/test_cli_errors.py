"""What a user sees when a command fails on something they can fix: one line naming the key or file, no
traceback unless --debug; and files that could run code are refused without torch's weights_only advice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs.cli import run_cli
from inference.serialization import load_weights_only
from trainers import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]


def _fails(message: str):
    def main(argv):
        assert "--debug" not in argv
        raise ValueError(message)

    return main


def test_user_errors_are_one_line_and_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.delenv("DETRETR_DEBUG", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert run_cli(_fails("unknown config key 'optim.lrx'"), ["--config", "x"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "error: unknown config key 'optim.lrx'" and "Traceback" not in err
    with pytest.raises(ValueError, match="optim.lrx"):
        run_cli(_fails("unknown config key 'optim.lrx'"), ["--config", "x", "--debug"])
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert run_cli(_fails("bad"), []) == 2
    assert capsys.readouterr().err.startswith("rank 1: error: bad")
    assert run_cli(lambda argv: {"mAP": 0.5}, []) == 0 and run_cli(lambda argv: {}, []) == 0


class _Planted:
    """Unpickling this creates a file: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_refuses_foreign_truncated_and_code_carrying_files(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=f"--resume state file {text} is not a torch file, or it is truncated"):
        ckpt.load_state(text)
    state = {"model": {"w": torch.zeros(64, 64)}, "optimizer": {}, "global_step": 3, "epoch": 0, "config": {}}
    whole = ckpt.save_atomic(state, tmp_path / "state-000000003.pt")
    assert ckpt.load_state(whole)["global_step"] == 3
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match="is not a torch file, or it is truncated"):
        ckpt.load_state(cut)
    marker = tmp_path / "code-ran"
    crafted = tmp_path / "crafted.pt"
    torch.save({**state, "extra": _Planted(marker)}, crafted)
    with pytest.raises(ValueError, match=r"holds Python objects .*it needs io.open") as err:
        ckpt.load_state(crafted)
    assert "weights_only" not in str(err.value) and not marker.exists()
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="is not a resumable state"):
        ckpt.load_state(tmp_path / "list.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_weights_only(tmp_path / "missing.pt")


def test_missing_data_root_is_one_line(tmp_path, capsys):
    from datasets import prepare

    args = ["--config", "reid_demo", f"data.root={tmp_path / 'nowhere'}", f"data.shards={tmp_path / 'shards'}"]
    assert run_cli(prepare.main, args) == 2
    err = capsys.readouterr().err
    assert f"directory {tmp_path / 'nowhere'} does not exist" in err and "Traceback" not in err


@pytest.mark.slow  # two interpreters start torch and Accelerate: about 10 s on an idle 2-core machine
def test_config_error_through_accelerate_launch_has_no_traceback_of_ours(tmp_path):
    """``accelerate launch -q`` (quiet: Accelerate prints no traceback of its own) shows our one line only."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "1"}
    env.pop("DETRETR_DEBUG", None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "trainers" / "retrieval.py"), "--config", "retr_demo", "optim.lrx=1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error: unknown config key 'optim.lrx'" in proc.stderr and "optim.lr" in proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def test_busy_shards_and_a_full_disk_are_one_line_too(tmp_path, capsys, monkeypatch):
    """The trainer's two fault messages a user acts on: shards another process writes, and a full disk."""
    from datasets.shardguard import ShardsBusy

    monkeypatch.delenv("DETRETR_DEBUG", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)

    def busy(argv):
        raise ShardsBusy("shards folder /x is still being written by pid 1 on h")

    def full(argv):
        raise ckpt.no_space_error(tmp_path / "state-000000001.pt", 2**20)

    for main, text in ((busy, "still being written by pid 1"), (full, "no space left on device: writing")):
        assert run_cli(main, []) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and text in err.splitlines()[0] and "Traceback" not in err
    with pytest.raises(OSError, match="Permission denied|Bad file"):  # other system errors keep their traceback
        run_cli(lambda argv: os.close(-1), [])


def test_fully_unpickled_state_must_be_private(tmp_path):
    """DeepSpeed unpickles its ZeRO shards fully: they are loaded only when no other user could have written them."""
    from inference.serialization import require_private

    zero = tmp_path / "checkpoints" / "state-000000006.zero"
    (zero / "pytorch_model").mkdir(parents=True)
    shard = zero / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"")
    shard.chmod(0o644)
    require_private(zero, "DeepSpeed state")
    shard.chmod(0o666)
    with pytest.raises(ValueError, match=f"DeepSpeed state {zero} is not loaded: {shard} is owned by uid"):
        require_private(zero, "DeepSpeed state")
    shard.chmod(0o644)
    zero.parent.chmod(0o777)  # a checkpoints folder others can write: they could have swapped the whole state
    with pytest.raises(ValueError, match="mode 777"):
        require_private(zero, "DeepSpeed state")
