"""``optim.lr_scaling``: the learning rate follows the global batch, not the number of processes."""

from __future__ import annotations

import json
import math

import pytest
import torch

from configs import load_config
from tests.test_retrieval_distributed import SCRIPT, _torchrun
from trainers.optim import scaled_lr
from trainers.setup import resolved_optim


@pytest.mark.parametrize(
    ("scaling", "batch", "expected"),
    [("none", 64, 1e-3), ("linear", 64, 2e-3), ("linear", 16, 5e-4), ("sqrt", 64, 1e-3 * math.sqrt(2))],
)
def test_scaled_lr(scaling, batch, expected):
    cfg = load_config("retr_demo", [f"optim.lr_scaling={scaling}", "optim.reference_batch=32", "optim.lr=1e-3"])
    assert scaled_lr(cfg.optim, batch) == pytest.approx(expected)


def test_resolved_lr_depends_on_the_global_batch_only():
    cfg = load_config("retr_demo", ["optim.lr_scaling=linear", "optim.reference_batch=16", "data.batch_size=64"])
    one, four = resolved_optim(cfg, 1), resolved_optim(cfg, 4)
    assert one["lr"] == four["lr"] == pytest.approx(4 * cfg.optim.lr)
    assert one["global_batch"] == 64 and four["world_size"] == 4


def test_scaling_without_a_reference_batch_is_refused():
    with pytest.raises(ValueError, match="optim.reference_batch"):
        load_config("retr_demo", ["optim.lr_scaling=sqrt"])
    with pytest.raises(ValueError, match="optim.lr_scaling"):
        load_config("retr_demo", ["optim.lr_scaling=cubic"])


def _resolved(folder) -> dict:
    return json.loads((folder / "run" / "config.json").read_text())["resolved"]


@pytest.mark.slow
def test_one_and_two_processes_at_one_global_batch_take_one_lr_and_end_equal(tmp_path):
    """Same global batch (16) with 1 and 2 gloo processes: the same scaled lr and the same weights; a run at
    double the global batch takes the linearly scaled rate (0.05 x 32/8)."""
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    scaling = ["optim.lr_scaling=linear", "optim.reference_batch=8"]
    _torchrun(2, tmp_path / "two", script, *scaling)
    _torchrun(1, tmp_path / "one", script, *scaling)
    two, one = _resolved(tmp_path / "two"), _resolved(tmp_path / "one")
    assert two["lr"] == one["lr"] == pytest.approx(0.1) and two["global_batch"] == one["global_batch"] == 16
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert (
        "global batch 16, lr 0.1 (optim.lr=0.05, optim.lr_scaling=linear"
        in (tmp_path / "two" / "run" / "train.log").read_text()
    )
    r0 = torch.load(tmp_path / "two" / "rank0.pt", weights_only=True)
    single = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    for key in r0:  # within the tolerance the 1-vs-2-process test uses (reduction order, per-process BN)
        assert torch.allclose(r0[key], single[key], atol=1e-5, rtol=1e-4), key
    _torchrun(1, tmp_path / "double", script, *scaling, "data.batch_size=32")
    assert _resolved(tmp_path / "double")["lr"] == pytest.approx(0.2)
    init = torch.load(tmp_path / "one" / "init0.pt", weights_only=True)
    double = torch.load(tmp_path / "double" / "rank0.pt", weights_only=True)
    assert sum(not torch.allclose(double[k], single[k]) for k in init) > 10  # the doubled rate trained differently
