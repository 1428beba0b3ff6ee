"""Two CPU processes (torchrun, gloo) train in sync and match one process with the same global batch.

The model has no BatchNorm (test_vit: LayerNorm only, neck=none), because BN statistics are per process
without SyncBN (which needs CUDA); triplets are mined over all ranks (loss.triplet_all_ranks) and the
center-loss gradient is averaged by hand, so the two runs compute the same global loss.
"""

import os
import subprocess
import sys
import textwrap

import torch

from tests.conftest import REPO

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from configs import load_config
    import trainers.setup as setup
    from trainers.retrieval import run

    out = sys.argv[1]
    captured = {}
    build = setup.build_model
    def capture(*args, **kwargs):
        captured["model"] = build(*args, **kwargs)
        captured["init"] = {k: v.clone() for k, v in captured["model"].state_dict().items()}
        return captured["model"]
    setup.build_model = capture

    class Loader:
        # the same global batch of 16 (4 identities x 4) at each step; rank r takes the r-th slice
        def __init__(self, cfg, rank, world, epoch):
            self.rank, self.world, self.epoch = rank, world, epoch
        def __len__(self):
            return 3
        def __iter__(self):
            for step in range(3):
                g = torch.Generator().manual_seed(1000 * self.epoch + step)
                images = torch.randn(16, 3, 32, 32, generator=g)
                labels = torch.arange(4).repeat_interleave(4) + 4 * (step % 2)
                per = 16 // self.world
                part = slice(self.rank * per, (self.rank + 1) * per)
                yield {"image": images[part], "label": labels[part]}

    cfg = load_config("retr_demo", [
        "model.backbone=test_vit", "model.neck=none", "data.height=32", "data.width=32",
        "data.batch_size=16", "data.num_instances=4", "loss.triplet_all_ranks=true", "loss.center_weight=5e-4",
        "optim.name=sgd", "optim.lr=0.05", "schedule.epochs=2", "schedule.warmup_epochs=1",
        "eval.enabled=false", "checkpoint.every_steps=100",
    ])
    run(cfg, run_dir=os.path.join(out, "run"), loader_fn=Loader, num_classes=8)
    rank = int(os.environ.get("RANK", "0"))
    torch.save(captured["model"].state_dict(), os.path.join(out, f"rank{rank}.pt"))
    torch.save(captured["init"], os.path.join(out, f"init{rank}.pt"))
    """
)


def _torchrun(nproc: int, out, script) -> None:
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    proc = subprocess.run([*cmd, str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_processes_sync_and_match_one(tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT)
    _torchrun(2, tmp_path / "two", script)
    _torchrun(1, tmp_path / "one", script)
    r0, r1 = (torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    single = torch.load(tmp_path / "one" / "rank0.pt", weights_only=True)
    for key in r0:
        assert torch.equal(r0[key], r1[key]), f"ranks differ at {key}"
        assert torch.allclose(r0[key], single[key], atol=1e-5, rtol=1e-4), key
    init = torch.load(tmp_path / "one" / "init0.pt", weights_only=True)
    assert sum(not torch.allclose(v, single[k]) for k, v in init.items()) > 10  # training moved the weights
    log = (tmp_path / "two" / "run" / "train.log").read_text()
    assert "2 process(es)" in log and "Iteration[3/3]" in log
